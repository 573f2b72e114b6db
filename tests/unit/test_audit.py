"""The data audit: the pure parts of the ``audit`` stage (near-duplicate kinds, ranking,
summary), its judge (folds, out-of-sample probabilities, cleanlab's findings), what
``audit.exclude`` leaves out of training, and the stage itself on digits with known noise."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from PIL import Image

from imgclf.config import StageError
from imgclf.files import write_csv
from imgclf.params import Audit
from imgclf.pipeline import suspects
from imgclf.pipeline.audit import (
    AuditData,
    duplicate_kinds,
    noise_rates,
    summarize,
    suspect_rows,
)
from imgclf.pipeline.audit_model import (
    LabelFindings,
    Probabilities,
    fold_of,
    knn_fit_predict,
    label_findings,
    out_of_sample_probs,
    outliers,
    pixel_features,
)
from imgclf.pipeline.dataset import data_hash, read_list
from imgclf.pipeline.split import GROUP_FIELDS, LIST_FIELDS, group_stats, groups_of
from imgclf.pipeline.split import Item as SplitItem
from imgclf.testing import images as f
from imgclf.testing.noisy import Noise, noisy_digits
from imgclf.testing.project import copy_project, python

CONFLICT, NEAR = suspects.CONFLICT, suspects.NEAR_DUPLICATE


def audit_data(
    labels: list[str],
    groups: list[str] | None = None,
    sides: list[str] | None = None,
    names: list[str] | None = None,
    blank: list[bool] | None = None,
    class_names: list[str] | None = None,
) -> AuditData:
    """Images ``data/processed/<label>/<name>.jpg`` (name: their index unless given)."""
    n = len(labels)
    names = names or [f"{i:02d}" for i in range(n)]
    return AuditData(
        paths=[
            f"data/processed/{label}/{name}.jpg" for label, name in zip(labels, names, strict=True)
        ],
        sides=sides or ["train"] * n,
        labels=list(labels),
        class_names=class_names or sorted(set(labels)),
        raw_paths=[
            f"data/raw/{label}/s/{name}.png" for label, name in zip(labels, names, strict=True)
        ],
        blank=np.array(blank or [False] * n, dtype=bool),
        groups=groups or [""] * n,
    )


# --- near-duplicate kinds ------------------------------------------------------------------


def test_a_groups_minority_labels_are_conflicts_suggesting_the_majority():
    data = audit_data(
        ["cat", "cat", "dog", "cat", "cat", "cat", "dog", "bird", "dog", "dog", "cat"],
        ["g1", "g1", "g1", "g2", "g2", "g2", "g2", "g2", "g3", "g3", ""],
    )
    assert duplicate_kinds(data) == {
        0: (NEAR, "cat"),
        1: (NEAR, "cat"),
        2: (CONFLICT, "cat"),
        3: (NEAR, "cat"),
        4: (NEAR, "cat"),
        5: (NEAR, "cat"),
        6: (CONFLICT, "cat"),
        7: (CONFLICT, "cat"),
        8: (NEAR, "dog"),  # one class: plain near-duplicates
        9: (NEAR, "dog"),
    }  # 10 has no group: no entry


def test_a_tie_at_the_top_makes_every_image_of_the_group_a_conflict():
    data = audit_data(
        ["cat", "dog", "dog", "cat", "dog", "cat", "bird"],
        ["g1", "g1", "g2", "g2", "g2", "g2", "g2"],
    )
    assert duplicate_kinds(data) == {
        0: (CONFLICT, "dog"),  # 1 : 1
        1: (CONFLICT, "cat"),
        2: (CONFLICT, "cat"),  # 2 : 2 : 1, each suggests the first other top label
        3: (CONFLICT, "dog"),
        4: (CONFLICT, "cat"),
        5: (CONFLICT, "dog"),
        6: (CONFLICT, "dog"),
    }


# --- ranking and summary -------------------------------------------------------------------


@pytest.fixture
def judged() -> tuple[AuditData, LabelFindings, np.ndarray, np.ndarray]:
    """Seven images (test last, as the stage orders them) and a made-up verdict on each."""
    data = audit_data(
        labels=["cat", "cat", "dog", "cat", "dog", "cat", "dog"],
        groups=["", "g", "g", "g2", "g2", "", "g"],
        sides=["train", "train", "val", "train", "train", "val", "test"],
        names=["a0", "a1", "b2", "c3", "d4", "e5", "a6"],
        blank=[False, False, True, False, False, False, False],
        class_names=["bird", "cat", "dog"],
    )
    findings = LabelFindings(
        is_issue=np.array([True, False, False, True, False, False, False]),
        quality=np.array([0.3, 0.4, 0.9, 0.1, 0.6, 0.95, 0.9]),
        suggested=np.array([2, 1, 2, 0, 2, 1, 2]),
        noise_rate=np.array([0.0, 0.123456, 0.5]),
    )
    scores = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.55555, 0.01])
    is_outlier = np.array([False, False, False, False, False, False, True])
    return data, findings, scores, is_outlier


def test_suspect_rows_rank_by_label_quality_and_suggest_labels(judged):
    rows = suspect_rows(*judged)
    assert [tuple(r) for r in rows] == [suspects.FIELDS] * len(rows)
    keys = ("rank", "side", "issues", "given_label", "suggested_label", "label_quality")
    shown = [" ".join([r["path"].rsplit("/", 1)[1], *(r[k] for k in keys)]) for r in rows]
    assert shown == [
        # the model's suggestion wins over the group's
        "c3.jpg 1 train label_issue;near_duplicate_conflict cat bird 0.1000",
        "a0.jpg 2 train label_issue cat dog 0.3000",
        # no label issue: the group's majority label
        "a1.jpg 3 train near_duplicate_conflict cat dog 0.4000",
        "d4.jpg 4 train near_duplicate_conflict dog cat 0.6000",
        # e5 has no issue; a6 before b2: the same quality, by path
        "a6.jpg 5 test outlier;near_duplicate dog dog 0.9000",
        "b2.jpg 6 val blank;near_duplicate dog dog 0.9000",
    ]
    assert [(r["outlier_score"], r["group"]) for r in rows] == [
        ("0.8000", "g2"),
        ("0.5000", ""),
        ("0.6000", "g"),
        ("0.9000", "g2"),
        ("0.0100", "g"),
        ("0.7000", "g"),
    ]
    assert rows[0]["raw_path"] == "data/raw/cat/s/c3.png"


def test_summary_counts_each_kind_of_the_rows(judged):
    data, findings, scores, is_outlier = judged
    rows = suspect_rows(data, findings, scores, is_outlier)
    y = data.y
    train_val = np.eye(3)[[2, 1, 2, 1, 1, 1]]  # right on 1, 2, 3 and 5 (4 of 6), wrong on 0, 4
    probs = Probabilities(train_val, np.eye(3)[[2]])
    summary = summarize(data, rows, findings, probs)
    assert y.tolist() == [1, 1, 2, 1, 2, 1, 2]
    assert summary == {
        "images": 7,
        "suspects": 6,
        "by_kind": {
            "label_issue": 2,
            "near_duplicate_conflict": 3,
            "outlier": 1,
            "blank": 1,
            "near_duplicate": 2,
        },
        "noise_rate_max": 0.5,
        "cv_accuracy": 0.6667,
    }
    assert noise_rates(data, findings) == {"bird": 0.0, "cat": 0.1235, "dog": 0.5}
    kinds = Counter(k for r in rows for k in r["issues"].split(";"))
    assert summary["by_kind"] == {kind: kinds[kind] for kind in suspects.KINDS}


# --- what audit.exclude leaves out ------------------------------------------------------


def issues_csv(path: Path) -> Path:
    rows = [
        ("train", "label_issue"),
        ("val", "near_duplicate_conflict"),
        ("test", "label_issue"),  # test: never excluded
        ("train", "outlier"),
        ("val", "blank"),
        ("train", "near_duplicate"),  # a plain near-duplicate: never excluded
        ("train", "label_issue;outlier"),
        ("test", "outlier;blank;near_duplicate_conflict"),
    ]
    table = [
        (
            str(k),
            f"data/raw/a/s/{k}.png",
            f"data/processed/a/{k}.jpg",
            side,
            issues,
            "a",
            "b",
            "0.1",
            "0.5",
            "",
        )
        for k, (side, issues) in enumerate(rows, start=1)
    ]
    return write_csv(path, suspects.FIELDS, table)


def excluded_paths_sorted(path: Path, mode: str) -> list[str]:
    return sorted(suspects.excluded_paths(path, mode), key=lambda p: int(Path(p).stem))


@pytest.mark.parametrize(
    ("mode", "excluded"),
    [("none", []), ("label_issues", [1, 2, 7]), ("suspects", [1, 2, 4, 5, 7])],
)
def test_excluded_paths_by_mode_never_from_test(tmp_path: Path, mode, excluded):
    path = issues_csv(tmp_path / "label_issues.csv")
    assert excluded_paths_sorted(path, mode) == [f"data/processed/a/{k}.jpg" for k in excluded]


def test_excluded_paths_reads_the_file_only_when_it_excludes_something(tmp_path: Path):
    missing = tmp_path / "label_issues.csv"
    assert suspects.excluded_paths(missing, "none") == frozenset()
    for mode in ("label_issues", "suspects"):
        with pytest.raises(StageError, match=r"label_issues\.csv not found: run the audit stage"):
            suspects.excluded_paths(missing, mode)


def test_every_audit_exclude_value_has_its_kinds():
    assert set(suspects.EXCLUDED_KINDS) == set(get_args(Audit.model_fields["exclude"].annotation))
    for kinds in suspects.EXCLUDED_KINDS.values():
        assert kinds <= set(suspects.KINDS) - {suspects.NEAR_DUPLICATE}


# --- the judge --------------------------------------------------------------------------


def test_folds_never_split_a_group_and_cover_every_fold():
    y = np.repeat([0, 1, 2], 14)
    groups = [f"g{i // 3}" if i % 7 < 3 else f"own{i}" for i in range(len(y))]
    groups[13] = groups[14] = "across"  # a group spanning two classes
    fold = fold_of(y, groups, 5, seed=1)
    by_group: dict[str, set[int]] = {}
    for g, k in zip(groups, fold.tolist(), strict=True):
        by_group.setdefault(g, set()).add(k)
    assert [g for g, ks in by_group.items() if len(ks) > 1] == []
    assert sorted(set(fold.tolist())) == [0, 1, 2, 3, 4]
    assert np.array_equal(fold, fold_of(y, groups, 5, seed=1))
    assert not np.array_equal(fold, fold_of(y, groups, 5, seed=2))


@pytest.mark.parametrize(
    ("y", "folds", "message"),
    [
        (
            [0, 0, 0, 1],
            5,
            "needs at least 5 train+val images and 2 of each class; found 4 "
            "images, the smallest class with 1",
        ),
        (
            [0] * 9 + [1],
            3,
            "needs at least 3 train+val images and 2 of each class; found 10 "
            "images, the smallest class with 1",
        ),
        (
            [],
            2,
            "needs at least 2 train+val images and 2 of each class; found 0 images, the "
            "smallest class with 0",
        ),
    ],
)
def test_too_few_images_for_the_folds_is_one_line(y, folds, message):
    with pytest.raises(ValueError, match=f"^audit.folds {folds} {re.escape(message)}$"):
        fold_of(np.array(y, dtype=np.int64), [str(i) for i in range(len(y))], folds, 0)


def test_out_of_sample_probs_hold_each_image_out_once_and_average_test():
    fold = np.array([0, 1, 2, 0, 1, 2])
    calls = []

    def fit_predict(train, predict):
        held, test = predict
        calls.append((train.tolist(), held.tolist(), test.tolist()))
        k = int(fold[held[0]])
        return [np.stack([[i / 10, 1 - i / 10] for i in held]), np.full((len(test), 2), k)]

    probs = out_of_sample_probs(fold, np.array([6, 7]), 2, fit_predict)
    assert calls == [
        ([1, 2, 4, 5], [0, 3], [6, 7]),
        ([0, 2, 3, 5], [1, 4], [6, 7]),
        ([0, 1, 3, 4], [2, 5], [6, 7]),
    ]
    assert probs.train_val.tolist() == [[i / 10, 1 - i / 10] for i in range(6)]
    assert probs.test.tolist() == [[1.0, 1.0], [1.0, 1.0]]  # mean of 0, 1 and 2


def test_knn_gives_probabilities_of_every_class():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [5.0, 5.0], [0.0, 9.0]])
    y = np.repeat([0, 1, 2], 12)
    x = centres[y] + rng.normal(0, 0.3, (len(y), 2))
    train = np.flatnonzero(y != 2)  # a fold without class 2
    probs, other = knn_fit_predict(x, y)(train, [np.array([0, 12]), np.array([30])])
    assert probs.shape == (2, 3) and other.shape == (1, 3)
    assert probs.argmax(axis=1).tolist() == [0, 1]
    assert probs[:, 2].tolist() == [0.0, 0.0]
    assert np.allclose(probs.sum(axis=1), 1.0)


def test_knn_fits_a_fold_smaller_than_its_neighbour_count():
    y = np.repeat([0, 1], 6)
    x = np.repeat([[0.0], [1.0]], 6, axis=0)
    (probs,) = knn_fit_predict(x, y)(np.arange(0, 12, 2), [np.array([1, 11])])
    assert probs.argmax(axis=1).tolist() == [0, 1]


def test_label_findings_flag_the_label_the_probabilities_contradict():
    labels = np.repeat([0, 1], 10)
    probs = np.where(labels[:, None] == 0, [0.9, 0.1], [0.1, 0.9])
    probs[3] = [0.05, 0.95]  # labelled 0, looks like a 1
    found = label_findings(labels, probs)
    assert np.flatnonzero(found.is_issue).tolist() == [3]
    assert found.quality.tolist() == [0.9, 0.9, 0.9, 0.05] + [0.9] * 16
    assert found.suggested.tolist() == [0, 0, 0, 1] + [0] * 6 + [1] * 10
    assert found.noise_rate.round(4).tolist() == [0.1, 0.0]


def test_outliers_flag_the_image_unlike_the_others():
    rng = np.random.default_rng(1)
    features = 1 + rng.uniform(0, 0.05, (60, 16))
    features[17] = [1, -1] * 8
    scores, is_outlier = outliers(features)
    assert np.flatnonzero(is_outlier).tolist() == [17]
    assert int(np.argmin(scores)) == 17


def test_pixel_features_box_reduce_to_rgb_rows(tmp_path: Path):
    halves = f.solid((0, 0, 0), (8, 8))
    halves.paste((255, 255, 255), (4, 0, 8, 8))
    paths = [
        f.write(tmp_path / "halves.png", f.encode(halves, "PNG")),
        f.write(tmp_path / "red.png", f.encode(f.solid((255, 0, 0), (6, 6)), "PNG")),
        f.write(tmp_path / "grey.png", f.encode(Image.new("L", (4, 4), 51), "PNG")),
    ]
    rows = pixel_features(paths, 2)
    assert rows.dtype == np.float32 and rows.shape == (3, 12)
    assert rows[0].tolist() == [0, 0, 0, 1, 1, 1] * 2
    assert rows[1].tolist() == [1, 0, 0] * 4
    assert np.allclose(rows[2], 0.2)


# --- split lists without the excluded suspects ------------------------------------------


def split_list(path: Path, names: list[str]) -> Path:
    rows = [
        (f"data/processed/a/{n}.jpg", "a", hashlib.sha256(n.encode()).hexdigest()) for n in names
    ]
    return write_csv(path, LIST_FIELDS, rows)


def test_read_list_leaves_out_the_excluded_paths(tmp_path: Path):
    path = split_list(tmp_path / "train.csv", ["3", "1", "2"])
    assert read_list(path).paths == [f"data/processed/a/{n}.jpg" for n in ("3", "1", "2")]
    kept = read_list(path, frozenset({"data/processed/a/1.jpg", "data/processed/a/9.jpg"}))
    assert (kept.paths, kept.labels) == (
        ["data/processed/a/3.jpg", "data/processed/a/2.jpg"],
        ["a", "a"],
    )


def test_data_hash_is_unchanged_without_exclusions_and_changed_with_them(tmp_path: Path):
    lists = [split_list(tmp_path / f"{s}.csv", [s, f"{s}2"]) for s in ("train", "val", "test")]
    decode = f.preprocess_options()
    old = hashlib.sha256(json.dumps(decode.to_dict(), sort_keys=True).encode())
    for path in lists:  # the hash before audit.exclude existed
        old.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    assert data_hash(lists, decode) == data_hash(lists, decode, frozenset()) == old.hexdigest()[:16]
    one = data_hash(lists, decode, frozenset({"data/processed/a/train.jpg"}))
    two = data_hash(
        lists, decode, frozenset({"data/processed/a/train.jpg", "data/processed/a/val.jpg"})
    )
    assert len({old.hexdigest()[:16], one, two}) == 3


# --- the stage on digits with known noise (subprocesses: integration tier) ------------------

MOVE_FRACTION, COPY_FRACTION, SEED, PER_DIGIT = 0.05, 0.05, 8, 40


def stage_env(tmp: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "IMGCLF_CACHE_DIR": f"{tmp}/cache"}


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> tuple[Path, Noise]:
    """400 digits, 5% of them moved into a wrong class and 5% with a near copy beside them,
    through preprocess, split and audit (knn, the project's params)."""
    tmp = tmp_path_factory.mktemp("audit")
    repo = copy_project(tmp / "repo")
    noise = noisy_digits(repo / "data" / "raw", MOVE_FRACTION, COPY_FRACTION, SEED, PER_DIGIT)
    for stage in ("preprocess", "split", "audit"):
        python(repo, "-m", f"imgclf.pipeline.{stage}", extra_env=stage_env(tmp), timeout=120)
    return repo, noise


@pytest.mark.integration
def test_the_audit_run_is_in_an_experiment_of_its_own(audited):
    """``imgclf-audit``, so the pipeline's experiment lists one run per pipeline run."""
    from mlflow import MlflowClient

    repo, _ = audited
    client = MlflowClient(f"sqlite:///{repo.parent}/mlflow.db")
    experiments = {e.name: e.experiment_id for e in client.search_experiments()}
    assert "imgclf" not in experiments  # train never ran: the pipeline's has no run
    (run,) = client.search_runs([experiments["imgclf-audit"]])
    assert run.info.run_name.startswith("audit-repro-") and run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "audit" and run.data.params["audit.model"] == "knn"


@pytest.mark.integration
def test_label_issues_csv_is_ranked_by_label_quality(audited):
    repo, _ = audited
    path = repo / "metrics" / "audit" / "label_issues.csv"
    with path.open(newline="", encoding="utf-8") as fh:
        assert tuple(next(csv.reader(fh))) == suspects.FIELDS
    rows = read_rows(path)
    assert [r["rank"] for r in rows] == [str(k) for k in range(1, len(rows) + 1)]
    quality = [float(r["label_quality"]) for r in rows]
    assert quality == sorted(quality)
    assert {k for r in rows for k in r["issues"].split(";")} <= set(suspects.KINDS)
    assert all(r["raw_path"].startswith("data/raw/digit_") for r in rows)


@pytest.mark.integration
def test_most_moved_files_rank_among_the_first(audited):
    """Measured (seed 8, 400 digits, 20 moved, 20 copies): 18 of the 20 moved files are in
    the first 20 rows (seeds 1-12: 15 to 18); 16 (80%) leaves room for other libraries."""
    repo, noise = audited
    rows = read_rows(repo / "metrics" / "audit" / "label_issues.csv")
    moved = {f"data/raw/{rel}" for rel in noise.moved}
    assert len(moved) == 20
    first = {r["raw_path"] for r in rows[: len(moved)]}
    assert len(moved & first) >= 16, sorted(moved - first)


@pytest.mark.integration
def test_summary_counts_what_label_issues_csv_lists(audited):
    repo, _ = audited
    rows = read_rows(repo / "metrics" / "audit" / "label_issues.csv")
    summary = json.loads((repo / "metrics" / "audit" / "summary.json").read_text())
    # no column a class in dvc exp show: the per-class rates are in the gallery and the log
    assert list(summary) == ["images", "suspects", "by_kind", "noise_rate_max", "cv_accuracy"]
    kinds = Counter(k for r in rows for k in r["issues"].split(";"))
    assert summary["by_kind"] == {kind: kinds[kind] for kind in suspects.KINDS}
    listed = sum(
        len(read_rows(repo / "data" / "split" / f"{s}.csv")) for s in ("train", "val", "test")
    )
    assert (summary["images"], summary["suspects"]) == (listed, len(rows))
    assert listed == 420
    page = (repo / "metrics" / "audit" / "index.html").read_text(encoding="utf-8")
    noise_table = page.split("estimated label noise by class")[1].split("</table>")[0]
    assert [f"digit_{d}" in noise_table for d in range(10)] == [True] * 10


@pytest.mark.integration
def test_gallery_has_one_card_per_row_in_rank_order(audited):
    repo, _ = audited
    rows = read_rows(repo / "metrics" / "audit" / "label_issues.csv")
    page = (repo / "metrics" / "audit" / "index.html").read_text(encoding="utf-8")
    ranks = re.findall(r'<figure class="card" data-rank="(\d+)"', page)
    assert ranks == [r["rank"] for r in rows]
    assert page.count('<img class="thumb" src="data:image/jpeg;base64,') == len(rows)
    assert [p for p in (r["raw_path"] for r in rows) if f">{p}</code>" not in page] == []


@pytest.mark.integration
def test_near_copies_share_a_group_and_a_side_with_their_originals(audited):
    repo, noise = audited
    manifest = {r["raw_path"]: r for r in read_rows(repo / "data" / "manifest.csv")}
    grouped = {r["path"]: r for r in read_rows(repo / "data" / "split" / "groups.csv")}
    with (repo / "data" / "split" / "groups.csv").open(encoding="utf-8") as fh:
        assert tuple(next(csv.reader(fh))) == GROUP_FIELDS
    assert len(noise.copies) == 20
    for original, copy in noise.copies:
        a, b = (grouped[manifest[f"data/raw/{rel}"]["output_path"]] for rel in (original, copy))
        assert (a["group"], a["side"]) == (b["group"], b["side"]), (original, copy)
    items = [SplitItem(r["path"], r["label"], "", r["group"]) for r in grouped.values()]
    split = json.loads((repo / "metrics" / "split.json").read_text())
    assert split["near_duplicates"] == group_stats(groups_of(items))


@pytest.mark.integration
def test_more_folds_than_train_and_val_images_is_one_error_line(tmp_path: Path):
    repo = copy_project(tmp_path / "repo", {"audit": {"folds": 20}})
    for i in range(10):
        f.write(repo / "data" / "raw" / "a" / "s" / f"{i}.png", f.png(i))
        f.write(repo / "data" / "raw" / "b" / "s" / f"{i}.png", f.png(500 + i))
    for stage in ("preprocess", "split"):
        python(repo, "-m", f"imgclf.pipeline.{stage}", extra_env=stage_env(tmp_path))
    proc = python(repo, "-m", "imgclf.pipeline.audit", extra_env=stage_env(tmp_path), check=False)
    labels = [
        r["label"]
        for s in ("train", "val")
        for r in read_rows(repo / "data" / "split" / f"{s}.csv")
    ]
    smallest = min(Counter(labels).values())
    assert (len(labels), smallest) == (17, 8)  # the split of these 20 images
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert (proc.returncode, errors) == (
        1,
        [
            "error: audit.folds 20 needs at least 20 train+val images and 2 of each class; "
            "found 17 images, the smallest class with 8"
        ],
    ), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (repo / "metrics" / "audit").exists()
