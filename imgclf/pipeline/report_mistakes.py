"""The report's picture of its mistakes: the test images decided wrongly with the highest
probability, as a captioned thumbnail grid (Pillow) and as rows for ``mistakes.csv``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.files import replacing

# columns of report/mistakes.csv
MISTAKE_FIELDS = ("path", "true", "predicted", "score")
# layout of the mistakes grid, pixels: cell = padding, thumbnail, padding, three caption
# lines, padding; a header line above the cells
GRID_PAD, GRID_LINE, GRID_HEADER = 6, 14, 22


def most_confident_errors(
    paths: Sequence[str],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    limit: int = 24,
) -> list[dict[str, Any]]:
    """The ``limit`` errors (``y_pred != y_true``) given the highest probability for the
    class they were wrongly decided as, highest first, ties by path: rows of
    :data:`MISTAKE_FIELDS` (``score`` is that probability)."""
    y_true, y_pred, probs = np.asarray(y_true), np.asarray(y_pred), np.asarray(probs)
    wrong = np.flatnonzero(y_true != y_pred)
    scored = [(float(probs[i, y_pred[i]]), str(paths[i]), int(i)) for i in wrong]
    scored.sort(key=lambda x: (-x[0], x[1]))
    return [
        {
            "path": p,
            "true": class_names[int(y_true[i])],
            "predicted": class_names[int(y_pred[i])],
            "score": round(s, 6),
        }
        for s, p, i in scored[: max(0, limit)]
    ]


def _font() -> Any:
    """Pillow's default font at 11 px (the fixed bitmap font without FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _fit(draw: Any, font: Any, value: str, width: int) -> str:
    """``value``, cut to ``width`` pixels and then marked by an ellipsis when too long."""
    if draw.textlength(value, font=font) <= width:
        return value
    while len(value) > 1 and draw.textlength(value + "…", font=font) > width:
        value = value[:-1]
    return value + "…"


def _thumbnail(source: Path, side: int) -> Any:
    """The image at ``source`` shrunk into a ``side`` square; a grey square if unreadable."""
    from PIL import Image, ImageOps

    try:
        with Image.open(source) as img:
            return ImageOps.contain(img.convert("RGB"), (side, side))
    except (OSError, ValueError):
        return Image.new("RGB", (side, side), (160, 160, 160))


def mistakes_grid(
    paths: Sequence[str],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    out_png: Path,
    limit: int = 24,
    *,
    root: Path | None = None,
    thumb: int = 96,
    columns: int = 6,
    split: str = "test",
) -> list[dict[str, Any]]:
    """Draw :func:`most_confident_errors` as a PNG grid of thumbnails (read from
    ``root / path``, or ``path``), each captioned with its true label, predicted label and
    score, under a header line; returns the rows (for a CSV).

    The image is ``min(columns, n)`` cells wide and ``ceil(n / columns)`` high, each cell
    ``thumb + 2 * GRID_PAD`` wide and ``thumb + 3 * GRID_PAD + 3 * GRID_LINE`` high, plus
    ``GRID_HEADER`` on top (n = 0: one cell saying there is no error). An unreadable image
    is a grey square.
    """
    from PIL import Image, ImageDraw

    rows = most_confident_errors(paths, y_true, y_pred, probs, class_names, limit)
    n_errors = int(np.sum(np.asarray(y_true) != np.asarray(y_pred)))
    cols = max(1, min(columns, len(rows)))
    cell_w, cell_h = thumb + 2 * GRID_PAD, thumb + 3 * GRID_PAD + 3 * GRID_LINE
    height = GRID_HEADER + max(1, math.ceil(len(rows) / cols)) * cell_h
    canvas = Image.new("RGB", (cols * cell_w, height), "white")
    draw, font = ImageDraw.Draw(canvas), _font()

    def text(xy: tuple[int, int], value: str, width: int, fill: str = "black") -> None:
        draw.text(xy, _fit(draw, font, value, width), fill=fill, font=font)

    header = (
        f"{len(rows)} most confident of {n_errors} errors ({split}); score = probability "
        "of the predicted class"
        if rows
        else f"no errors on {split}"
    )
    text((GRID_PAD, 4), header, canvas.width - 2 * GRID_PAD)
    for idx, row in enumerate(rows):
        x = (idx % cols) * cell_w + GRID_PAD
        y = GRID_HEADER + (idx // cols) * cell_h + GRID_PAD
        small = _thumbnail(Path(row["path"]) if root is None else Path(root) / row["path"], thumb)
        canvas.paste(small, (x + (thumb - small.width) // 2, y + (thumb - small.height) // 2))
        y += thumb + GRID_PAD
        text((x, y), f"true: {row['true']}", thumb)
        text((x, y + GRID_LINE), f"pred: {row['predicted']}", thumb, fill="crimson")
        text((x, y + 2 * GRID_LINE), f"score {row['score']:.3f}", thumb)
    with replacing(out_png, "wb") as fh:
        canvas.save(fh, format="PNG")
    return rows
