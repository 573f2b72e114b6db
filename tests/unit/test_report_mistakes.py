"""The mistakes grid: which errors, in which order, drawn where."""

from __future__ import annotations

import numpy as np
from PIL import Image

from imgclf.pipeline.report_mistakes import MISTAKE_FIELDS, mistakes_grid, most_confident_errors
from tests.unit.report_cases import NAMES, probs_of

COLORS = {"a.png": "white", "b.png": "red", "c.png": "blue", "d.png": "green", "e.png": "yellow"}


def test_mistakes_grid_shows_the_most_confident_errors_first(tmp_path):
    for name, color in COLORS.items():
        Image.new("RGB", (8, 8), color).save(tmp_path / name)
    paths = ["c.png", "b.png", "a.png", "d.png", "e.png", "f.png"]
    y_true = np.array([0, 1, 0, 1, 0, 1])
    y_pred = np.array([1, 0, 0, 0, 1, 1])  # e.png decided positive at a low threshold
    probs = probs_of([0.9, 0.1, 0.01, 0.4, 0.3, 0.8])
    out = tmp_path / "report" / "mistakes.png"
    rows = mistakes_grid(
        paths, y_true, y_pred, probs, NAMES, out, 3, root=tmp_path, thumb=20, columns=2
    )
    # errors c (.9 for sensitive), b (.9 for safe), d (.6 for safe), e (.3): ties by path
    assert rows == [
        {"path": "b.png", "true": "sensitive", "predicted": "safe", "score": 0.9},
        {"path": "c.png", "true": "safe", "predicted": "sensitive", "score": 0.9},
        {"path": "d.png", "true": "sensitive", "predicted": "safe", "score": 0.6},
    ]
    assert list(rows[0]) == list(MISTAKE_FIELDS)
    # 2 columns x 2 rows of cells 20 + 2 * 6 = 32 wide, 20 + 3 * 6 + 3 * 14 = 80 high,
    # under a 22 px header
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (64, 22 + 160)
        rgb = img.convert("RGB")
        centre = 6 + 10  # padding + half a thumbnail
        assert rgb.getpixel((centre, 22 + centre)) == (255, 0, 0)  # b
        assert rgb.getpixel((32 + centre, 22 + centre)) == (0, 0, 255)  # c
        assert rgb.getpixel((centre, 22 + 80 + centre)) == (0, 128, 0)  # d
        assert rgb.getpixel((32 + centre, 22 + 80 + centre)) == (255, 255, 255)  # empty cell
    everything = most_confident_errors(paths, y_true, y_pred, probs, NAMES, limit=10)
    assert [r["path"] for r in everything] == ["b.png", "c.png", "d.png", "e.png"]
    assert everything[-1]["score"] == 0.3


def test_mistakes_grid_without_errors_or_with_an_unreadable_image(tmp_path):
    y = np.array([0, 1])
    rows = mistakes_grid(
        ["x.png", "y.png"], y, y, probs_of([0.1, 0.9]), NAMES, tmp_path / "none.png", thumb=20
    )
    assert rows == []
    with Image.open(tmp_path / "none.png") as img:
        assert img.size == (32, 22 + 80)
    rows = mistakes_grid(
        ["gone.png"], np.array([1]), np.array([0]), probs_of([0.2]), NAMES,
        tmp_path / "grey.png", thumb=20,
    )  # fmt: skip
    assert rows == [{"path": "gone.png", "true": "sensitive", "predicted": "safe", "score": 0.8}]
    with Image.open(tmp_path / "grey.png") as img:
        assert img.convert("RGB").getpixel((16, 22 + 16)) == (160, 160, 160)
