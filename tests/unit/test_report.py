"""The report stage: its params, the positive class, and its steps on a hand-sized
evaluation (the evaluation, the files it writes, what MLflow gets)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from imgclf.config import Paths, StageError
from imgclf.params import Params, ParamsError, Report, validate
from imgclf.pipeline import report as rep
from imgclf.pipeline.operating_point import describe_operating_point
from imgclf.pipeline.report_metrics import compute_metrics
from tests.unit.report_cases import NAMES, SCORES10, TEST_SCORES, TEST_TRUTH, TRUTH10, probs_of

ROOT = Path(__file__).resolve().parents[2]


def test_recall_confidence_is_a_checked_param():
    good = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert validate(good, Params, "params.yaml").report.recall_confidence == 0.9
    for bad in (0.3, 1.0, "0.9"):
        report = {**good["report"], "recall_confidence": bad}
        with pytest.raises(ParamsError, match=r"params.yaml: report.recall_confidence: "):
            validate({**good, "report": report}, Params, "params.yaml")
    missing = {k: v for k, v in good["report"].items() if k != "recall_confidence"}
    with pytest.raises(ParamsError, match=r"report\.recall_confidence: missing"):
        validate({**good, "report": missing}, Params, "params.yaml")


@pytest.mark.parametrize(
    ("named", "counts", "expected"),
    [
        (
            None,
            {"safe": 900, "sensitive": 300},
            ("sensitive", "the rarest class (300 of 1200 training images)"),
        ),
        (
            None,
            {"cats": 40, "dogs": 12, "foxes": 12},
            ("foxes", "the rarest class (12 of 64 training images)"),
        ),
        ("safe", {"safe": 900, "sensitive": 300}, ("safe", "report.positive_class")),
    ],
)
def test_positive_class_defaults_to_the_rarest(named, counts, expected):
    assert rep.choose_positive(named, counts) == expected


def test_a_positive_class_the_candidate_lacks_is_a_clear_error():
    with pytest.raises(StageError, match=r"report.positive_class 'nsfw' is not a class"):
        rep.choose_positive("nsfw", {"cats": 1, "dogs": 2})


def test_mlflow_metric_names():
    p = probs_of([0.2, 0.7])
    m = compute_metrics(np.array([0, 1]), p.argmax(1), p, NAMES, "sensitive")
    m["argmax"] = {"accuracy": 0.5, "per_class": {"safe": {"recall": 0.25, "f1": None}}}
    names = rep.mlflow_metrics(m)
    assert names["test_accuracy"] == 1.0 and names["test_sensitive_recall"] == 1.0
    assert names["test_argmax_accuracy"] == 0.5 and names["test_argmax_safe_recall"] == 0.25
    assert "test_argmax_safe_f1" not in names and "test_per_class" not in names


# -- the stage's steps on a hand-sized evaluation: val = SCORES10/TRUTH10, test = TEST_* ----

TEST_PATHS = [f"data/processed/{i}.jpg" for i in range(7)]


CFG = Report(
    positive_class=None, target_recall=0.6, recall_confidence=0.9, min_precision=0.5, batch_size=8
)


@pytest.fixture
def evaluation() -> rep.Evaluation:
    val = rep.Scored([f"v{i}" for i in range(14)], TRUTH10.astype(int), probs_of(SCORES10))
    test = rep.Scored(TEST_PATHS, np.array(TEST_TRUTH), probs_of(TEST_SCORES))
    return rep.evaluate(val, test, NAMES, "sensitive", CFG)


def test_evaluate_decides_test_at_the_val_threshold(evaluation):
    ev = evaluation
    assert ev.operating_point["threshold"] == 0.55  # see test_operating_point.py
    # sensitive >= .55: .95 .58 (positives) and .9 .6 (negatives); argmax: >= .5
    assert {rule: y.tolist() for rule, y in ev.decisions.items()} == {
        "at the operating threshold (sensitive >= 0.5500)": [1, 1, 0, 0, 1, 1, 0],
        "argmax (top class)": [1, 1, 1, 0, 1, 1, 0],
    }
    # at the threshold 3 of 7 right; safe: P 1/3, R 1/3; sensitive: P 1/2, R 1/2
    # ROC AUC: 6 of 12 (positive, negative) pairs ranked right; AP: ranking
    # .95(P) .9(N) .6(N) .58(P) .52(P) .45(P) .1(N): (1 + 2/4 + 3/5 + 4/6) / 4
    assert {k: ev.metrics[k] for k in ("accuracy", "macro_f1", "roc_auc", "pr_auc", "n")} == {
        "accuracy": 0.428571, "macro_f1": 0.416667, "roc_auc": 0.5, "pr_auc": 0.691667, "n": 7,
    }  # fmt: skip
    assert ev.metrics["argmax"]["accuracy"] == 0.571429  # 4 of 7
    assert ev.metrics["argmax"]["per_class"]["sensitive"]["recall"] == 0.75


def test_metric_and_plot_files(evaluation, tmp_path, monkeypatch):
    monkeypatch.setattr(rep, "PATHS", Paths(tmp_path))
    files = rep.write_metrics(evaluation) + rep.write_plot_data(evaluation, tmp_path / "plots")
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "metrics/test.json", "metrics/operating_point.json", "metrics/report/test_detail.json",
        "plots/predictions.csv", "plots/roc.csv", "plots/pr.csv",
    ]  # fmt: skip
    # the headline, in the order dvc exp show lists it
    assert (tmp_path / "metrics" / "test.json").read_text() == (
        '{\n  "accuracy": 0.428571,\n  "argmax_accuracy": 0.571429,\n  "recall": 0.5,\n'
        '  "precision": 0.5,\n  "macro_f1": 0.416667,\n  "roc_auc": 0.5,\n'
        '  "pr_auc": 0.691667\n}\n'
    )
    detail = json.loads((tmp_path / "metrics" / "report" / "test_detail.json").read_text())
    assert list(detail) == ["positive_class", "accuracy", "macro_f1", "roc_auc", "pr_auc",
                            "n", "per_class", "argmax"]  # fmt: skip
    with (tmp_path / "plots" / "predictions.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == list(rep.PREDICTION_FIELDS)
    assert rows[1] == ["data/processed/0.jpg", "sensitive", "sensitive", "sensitive", "0.95"]
    assert rows[3] == ["data/processed/2.jpg", "sensitive", "safe", "sensitive", "0.52"]
    assert len(rows) == 8


class RecordingRun:
    """What the report logs to a ``tracking.Run``."""

    def __init__(self) -> None:
        self.params: dict = {}
        self.metrics: dict = {}
        self.tags: dict = {}
        self.artifacts: list = []

    def log_params(self, params: dict) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        self.metrics.update(metrics)

    def set_tags(self, tags: dict) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path).name, artifact_path))


def test_report_files_and_what_mlflow_gets(evaluation, tmp_path, monkeypatch):
    monkeypatch.setattr(rep, "PATHS", Paths(tmp_path))  # thumbnails: none there (grey)
    files = rep.write_report_files(evaluation, tmp_path / "report")
    assert sorted(f.name for f in files) == sorted(p.name for p in (tmp_path / "report").iterdir())
    assert sorted(f.name for f in files) == [
        "classification_report.txt", "confusion_matrix.png", "curves.png", "mistakes.csv",
        "mistakes.png",
    ]  # fmt: skip
    text = (tmp_path / "report" / "classification_report.txt").read_text()
    op = evaluation.operating_point
    assert text == (
        f"operating point: {describe_operating_point(op)}\n"
        "test accuracy at the threshold 0.428571 vs argmax 0.571429 (-0.1429): val and test "
        "disagree: the threshold chosen on val gives no more test recall than argmax (0.5 vs "
        f"0.75); more val images would steady it\n\n{evaluation.report_text}"
    )
    assert evaluation.report_text.startswith("== at the operating threshold (sensitive >= 0.5500)")
    # errors at the threshold: .9 and .6 flagged (safe), .52 and .45 missed (sensitive)
    with (tmp_path / "report" / "mistakes.csv").open(newline="") as fh:
        assert [r["path"][-5:] + " " + r["score"] for r in csv.DictReader(fh)] == [
            "4.jpg 0.9", "5.jpg 0.6", "3.jpg 0.55", "2.jpg 0.48",
        ]  # fmt: skip
    run = RecordingRun()
    rep.log_to_mlflow(run, CFG, evaluation, files)
    assert run.params == {
        "report.positive_class": "None", "report.target_recall": "0.6",
        "report.recall_confidence": "0.9", "report.min_precision": "0.5",
        "report.batch_size": "8",
    }  # fmt: skip
    assert run.metrics["test_accuracy"] == 0.428571
    assert run.metrics["test_argmax_accuracy"] == 0.571429
    assert run.metrics["op_threshold"] == 0.55 and run.metrics["op_test_recall"] == 0.5
    assert run.metrics["op_expected_recall"] == 0.663152
    assert run.tags == {"positive_class": "sensitive"}
    assert {a for _, a in run.artifacts} == {"report"} and len(run.artifacts) == 5
