"""The audit in a real git + DVC repository with known label noise: the decisions file
reruns what it affects, and ``audit.exclude`` experiments compare in ``dvc metrics``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from imgclf.files import file_md5
from imgclf.testing.noisy import Noise, noisy_digits
from imgclf.testing.project import commit, copy_project, dvc, init_repo, ran, run, set_params

FAST = {"epochs": 3, "patience": 2, "cnn_filters": [8, 16], "batch_size": 16}
ALL = {"preprocess", "split", "audit", "train", "report", "promote", "export"}


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def train_count(repo: Path) -> int:
    meta = json.loads((repo / "models" / "candidate" / "metadata.json").read_text())
    return sum(meta["class_counts"].values())


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> tuple[Path, Noise]:
    repo = init_repo(copy_project(tmp_path_factory.mktemp("audit") / "repo"))
    noise = noisy_digits(repo / "data" / "raw", 0.1, 0.05, seed=3, per_digit=30)
    dvc(repo, "add", "-q", "data/raw")
    set_params(repo, {f"train.{key}": value for key, value in FAST.items()})
    set_params(repo, {"promote.min_value": 0.0})
    commit(repo, "noisy digits")
    proc = dvc(repo, "repro")
    assert ran(proc.stdout) == {"params", *ALL}, proc.stdout
    commit(repo, "first run")
    return repo, noise


def test_exclude_label_issues_is_an_experiment_of_train_report_promote(noisy):
    repo, _ = noisy
    issues = rows(repo / "metrics" / "audit" / "label_issues.csv")
    kinds = {"label_issue", "near_duplicate_conflict"}
    left_out = [
        r for r in issues if r["side"] == "train" and kinds.intersection(r["issues"].split(";"))
    ]
    assert left_out, "the noisy set must have train-side label issues"
    before = train_count(repo)
    # max_regression 1: promoted (and exported) even if leaving them out costs accuracy
    proc = dvc(
        repo, "exp", "run", "-S", "audit.exclude=label_issues", "-S", "promote.max_regression=1"
    )
    assert ran(proc.stdout) == {"params", "train", "report", "promote", "export"}, proc.stdout
    assert train_count(repo) == before - len(left_out)
    diff = json.loads(dvc(repo, "metrics", "diff", "--all", "--json").stdout)
    assert {"metrics/test.json", "metrics/audit/summary.json"} <= set(diff)
    params = json.loads(dvc(repo, "params", "diff", "--json").stdout)
    assert params["params.yaml"]["audit.exclude"] == {"old": "none", "new": "label_issues"}
    run(repo, "git", "reset", "-q", "--hard")  # back to the committed run
    dvc(repo, "checkout", "-q", "--force")
    assert ran(dvc(repo, "repro").stdout) == set()


def test_decisions_rerun_from_preprocess_and_show_in_manifest_and_split(noisy):
    repo, noise = noisy
    (wrong, (true, _)), (dropped, _) = sorted(noise.moved.items())[:2]
    overrides = repo / "data" / "labels_override.csv"
    lines = ["raw_path,action", f"data/raw/{wrong},relabel:{true}", "# reviewed"]
    overrides.write_text("\n".join([*lines, f"data/raw/{dropped},exclude", ""]))
    proc = dvc(repo, "repro")
    assert ran(proc.stdout) == ALL, proc.stdout
    manifest = {r["raw_path"]: r for r in rows(repo / "data" / "manifest.csv")}
    relabelled, excluded = manifest[f"data/raw/{wrong}"], manifest[f"data/raw/{dropped}"]
    assert (relabelled["class"], relabelled["status"]) == (true, "processed")
    assert relabelled["reason"] == f"labels_override.csv line 2: relabelled {true}"
    assert relabelled["output_path"].startswith(f"data/processed/{true}/")
    assert (excluded["status"], excluded["output_path"]) == ("excluded", "")
    listed = {
        r["path"]: r["label"]
        for side in ("train", "val", "test")
        for r in rows(repo / "data" / "split" / f"{side}.csv")
    }
    assert listed[relabelled["output_path"]] == true
    assert not [p for p in listed if p.endswith(f"/scans__{Path(dropped).stem}.jpg")]
    commit(repo, "decisions")


def test_a_bad_decision_fails_in_one_line_and_changes_nothing(noisy):
    repo, _ = noisy
    overrides = repo / "data" / "labels_override.csv"
    kept = overrides.read_text()
    before = file_md5(repo / "data" / "manifest.csv")
    overrides.write_text(kept + "data/raw/digit_1/scans/0001.png,relabel:digit_11\n")
    try:
        proc = dvc(repo, "repro", check=False)
    finally:
        overrides.write_text(kept)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: labels_override.csv line 5: relabel:digit_11 names no class (classes: "
        + ", ".join(f"digit_{d}" for d in range(10))
        + ")"
    ], proc.stderr
    assert file_md5(repo / "data" / "manifest.csv") == before
