"""Real `dvc repro` of the data stages in a temporary git + DVC repository."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dvcrepo import commit, dvc, make_repo, ran

pytestmark = pytest.mark.integration


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def set_param(repo: Path, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    section, name = key.split(".")
    params[section][name] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("pipeline") / "repo", per_digit=6)
    out = dvc(repo, "repro", "split").stdout
    assert ran(out) == {"preprocess", "split"}
    commit(repo, "first run")
    return repo


def test_first_run_outputs_and_up_to_date(repo: Path):
    manifest = rows(repo / "data" / "manifest.csv")
    assert len(manifest) == 60 and {r["status"] for r in manifest} == {"processed"}
    total = sum(len(rows(repo / "data" / "split" / f"{s}.csv")) for s in ("train", "val", "test"))
    assert total == 60
    counts = json.loads((repo / "metrics" / "split.json").read_text())
    assert set(counts) == {"train", "val", "test"} and set(counts["train"]) == {"safe", "sensitive"}
    status = dvc(repo, "status", "preprocess", "split").stdout
    assert "up to date" in status.lower(), status


def test_test_size_change_reruns_split_only(repo: Path):
    set_param(repo, "split.test_size", 0.5)
    out = dvc(repo, "repro", "split").stdout
    assert ran(out) == {"split"}, out
    assert "Stage 'preprocess' didn't change" in out
    set_param(repo, "split.test_size", 0.3)
    dvc(repo, "repro", "split")
    commit(repo, "back to 0.3")


def test_moving_a_subclass_relabels_and_decodes_nothing_again(repo: Path):
    raw = repo / "data" / "raw"
    os.rename(raw / "sensitive" / "digit_7", raw / "safe" / "digit_7")
    try:
        proc = dvc(repo, "repro", "split")
        assert ran(proc.stdout) == {"preprocess", "split"}
        assert "0 decoded" in proc.stderr + proc.stdout, proc.stderr
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


def test_raw_change_with_identical_processed_output_skips_split(repo: Path):
    raw = repo / "data" / "raw" / "safe" / "digit_0"
    first = sorted(raw.glob("*.png"))[0]
    with Image.open(first) as img:
        img.load()
        img.save(first, format="PNG", compress_level=1)  # new bytes, same pixels
    (raw / "caption.txt").write_text("a handwritten zero", encoding="utf-8")
    out = dvc(repo, "repro", "split").stdout
    assert ran(out) == {"preprocess"}, out
    assert "Stage 'split' didn't change" in out
