"""Real `dvc repro` of the data stages in a temporary git + DVC repository."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from imgclf.pipeline.split import SIDES
from imgclf.testing.project import commit, dvc, make_repo, ran, set_params


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("pipeline") / "repo", per_digit=6)
    out = dvc(repo, "repro", "split").stdout
    assert ran(out) == {"params", "preprocess", "split"}
    commit(repo, "first run")
    return repo


def test_first_run_outputs_and_up_to_date(repo: Path):
    manifest = rows(repo / "data" / "manifest.csv")
    assert len(manifest) == 60 and {r["status"] for r in manifest} == {"processed"}
    total = sum(len(rows(repo / "data" / "split" / f"{s}.csv")) for s in ("train", "val", "test"))
    assert total == 60
    counts = json.loads((repo / "metrics" / "split.json").read_text())
    assert list(counts) == ["train", "val", "test", "near_duplicates"]
    assert all(list(counts[side]) == ["safe", "sensitive"] for side in SIDES)
    per_class = {c: sum(counts[side][c] for side in SIDES) for c in ("safe", "sensitive")}
    assert per_class == {"safe": 42, "sensitive": 18}  # 6 images of each digit: 0-6, 7-9
    status = dvc(repo, "status", "preprocess", "split").stdout
    assert "up to date" in status.lower(), status


def test_test_size_change_reruns_split_only(repo: Path):
    set_params(repo, {"split.test_size": 0.5})
    out = dvc(repo, "repro", "split").stdout
    assert ran(out) == {"params", "split"}, out
    assert "Stage 'preprocess' didn't change" in out
    set_params(repo, {"split.test_size": 0.3})
    dvc(repo, "repro", "split")
    commit(repo, "back to 0.3")


def test_moving_a_subclass_relabels_and_decodes_nothing_again(repo: Path):
    raw = repo / "data" / "raw"
    os.rename(raw / "sensitive" / "digit_7", raw / "safe" / "digit_7")
    try:
        proc = dvc(repo, "repro", "split")
        assert ran(proc.stdout) == {"preprocess", "split"}
        assert "60 file(s), 0 decoded" in proc.stderr + proc.stdout, proc.stderr
        moved = [r for r in rows(repo / "data" / "manifest.csv") if r["subclass"] == "digit_7"]
        assert len(moved) == 6 and {r["class"] for r in moved} == {"safe"}
        assert all(r["output_path"].startswith("data/processed/safe/digit_7__") for r in moved)
        listed = {
            r["label"]
            for s in ("train", "val", "test")
            for r in rows(repo / "data" / "split" / f"{s}.csv")
            if "digit_7" in r["path"]
        }
        assert listed == {"safe"}
    finally:
        os.rename(raw / "safe" / "digit_7", raw / "sensitive" / "digit_7")
        dvc(repo, "repro", "split")


def test_preprocess_params_rerun_preprocess_but_never_move_the_split(repo: Path):
    """Sides are keyed on raw content: new processed bytes, same manifest, split skipped."""
    before = {
        side: (repo / "data" / "split" / f"{side}.csv").read_bytes() for side in ("train", "test")
    }
    processed = sorted((repo / "data" / "processed").rglob("*.jpg"))[0]
    old_bytes = processed.read_bytes()
    for key, value in (("preprocess.jpeg_quality", 70), ("preprocess.size", 24)):
        set_params(repo, {key: value})
        out = dvc(repo, "repro", "split").stdout
        assert ran(out) == {"params", "preprocess"}, out
        assert "Stage 'split' didn't change" in out
    assert processed.read_bytes() != old_bytes
    after = {
        side: (repo / "data" / "split" / f"{side}.csv").read_bytes() for side in ("train", "test")
    }
    assert after == before
    set_params(repo, {"preprocess.jpeg_quality": 95, "preprocess.size": 32})
    dvc(repo, "repro", "split")


def test_a_class_with_one_image_fails_at_split_naming_it(repo: Path):
    tiny = repo / "data" / "raw" / "tiny"
    first = sorted((repo / "data" / "raw" / "safe" / "digit_0").glob("*.png"))[0]
    tiny.mkdir()
    # the same bytes under two classes would be a label conflict: change one pixel
    with Image.open(first) as img:
        img = img.copy()
    img.putpixel((0, 0), (1, 2, 3) if img.mode == "RGB" else 7)
    img.save(tiny / "only.png")
    try:
        proc = dvc(repo, "repro", "split", check=False)
        assert proc.returncode != 0
        errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(
            "error: class 'tiny' has 1 usable image(s) ("
        ), proc.stderr
        assert "every class needs at least 1 in train, val and test, about 10 images" in errors[0]
    finally:
        (tiny / "only.png").unlink()
        tiny.rmdir()
    dvc(repo, "repro", "split")


def test_a_positive_class_that_is_no_class_fails_before_any_work(repo: Path):
    text = (repo / "params.yaml").read_text()
    set_params(repo, {"report.positive_class": "nsfw"})
    try:
        proc = dvc(repo, "repro", "-f", "preprocess", check=False)
        assert proc.returncode != 0
        assert (
            "error: params.yaml: report.positive_class: 'nsfw' is not a class; raw/ has "
            "'safe', 'sensitive' (set one of them, or null for the rarest)"
        ) in proc.stderr.splitlines()
    finally:
        (repo / "params.yaml").write_text(text)
