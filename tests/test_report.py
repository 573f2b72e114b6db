"""``stages.report``: metrics against hand-computed values, the operating point, outputs."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from stages import report as rep

NAMES = ["safe", "sensitive"]


def probs_of(pos_scores: list[float]) -> np.ndarray:
    s = np.array(pos_scores)
    return np.stack([1 - s, s], axis=1)


def test_metrics_by_hand():
    # truth: 0 0 0 1 1; predicted (score >= .5): 0 1 0 1 0
    y = np.array([0, 0, 0, 1, 1])
    p = probs_of([0.1, 0.7, 0.2, 0.9, 0.4])
    m = rep.compute_metrics(y, p.argmax(1), p, NAMES, "sensitive")
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_class"]["safe"] == {
        "precision": pytest.approx(2 / 3, abs=1e-6),
        "recall": pytest.approx(2 / 3, abs=1e-6),
        "f1": pytest.approx(2 / 3, abs=1e-6),
        "support": 3,
    }
    assert m["per_class"]["sensitive"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["sensitive"]["recall"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 2, abs=1e-6)
    # ROC AUC: pairs (pos, neg) ranked right: 0.9 beats all 3; 0.4 beats 0.1 and 0.2 -> 5/6
    assert m["roc_auc"] == pytest.approx(5 / 6, abs=1e-6)
    # AP: ranking .9(P) .7(N) .4(P) ... -> precision 1 at recall .5, 2/3 at recall 1
    assert m["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-6)
    assert m["n"] == 5


@pytest.mark.filterwarnings(
    "ignore:Only one class:UserWarning", "ignore:No positive class:UserWarning"
)
def test_metrics_with_an_absent_class_has_no_auc():
    p = probs_of([0.2, 0.6])
    m = rep.compute_metrics(np.array([0, 0]), p.argmax(1), p, NAMES, "sensitive")
    assert m["roc_auc"] is None and m["accuracy"] == pytest.approx(0.5)


def test_multiclass_metrics():
    y = np.array([0, 1, 2, 2])
    p = np.eye(3)[[0, 1, 2, 1]] * 0.8 + 0.2 / 3
    m = rep.compute_metrics(y, p.argmax(1), p, ["a", "b", "c"], "c")
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class"]["c"]["recall"] == pytest.approx(0.5)
    # one-vs-rest AUC by pairs: a 3/3; b: its positive (.87) beats .07, .07, ties .87 -> 2.5/3;
    # c: positives .87 and .07 against .07, .07 -> (2 + 2 * 0.5) / 4
    assert m["roc_auc"] == pytest.approx((1 + 2.5 / 3 + 0.75) / 3, abs=1e-6)


def test_threshold_for_recall_constructed_case():
    scores = np.array([0.9, 0.85, 0.8, 0.4, 0.3, 0.2])
    positive = np.array([1, 0, 1, 1, 1, 0], bool)  # positives: .9 .8 .4 .3
    assert rep.threshold_for_recall(scores, positive, 0.5) == pytest.approx(0.8)
    assert rep.threshold_for_recall(scores, positive, 0.75) == pytest.approx(0.4)
    assert rep.threshold_for_recall(scores, positive, 0.76) == pytest.approx(0.3)
    assert rep.threshold_for_recall(scores, positive, 1.0) == pytest.approx(0.3)
    at = rep.precision_recall_at(scores, positive, 0.8)
    assert at == {"precision": pytest.approx(2 / 3, abs=1e-6), "recall": 0.5}
    with pytest.raises(ValueError, match="target_recall"):
        rep.threshold_for_recall(scores, positive, 0.0)
    with pytest.raises(ValueError, match="no positive"):
        rep.threshold_for_recall(scores, np.zeros(6, bool), 0.9)


def test_operating_point_is_chosen_on_val_and_measured_on_test():
    val_s, val_p = np.array([0.9, 0.6, 0.5, 0.1]), np.array([1, 1, 0, 0], bool)
    test_s, test_p = np.array([0.95, 0.7, 0.55, 0.65]), np.array([1, 0, 1, 0], bool)
    op = rep.operating_point(val_s, val_p, test_s, test_p, "sensitive", 1.0)
    assert op["threshold"] == pytest.approx(0.6)  # from val; test would need 0.55
    assert op["val"] == {"precision": 1.0, "recall": 1.0}
    assert op["test"] == {"precision": pytest.approx(1 / 3, abs=1e-6), "recall": 0.5}
    assert op["positive_class"] == "sensitive" and op["target_recall"] == 1.0


def test_curves_and_files(tmp_path):
    positive = np.array([0, 0, 1, 1], bool)
    roc, pr = rep.curve_rows(positive, np.array([0.1, 0.4, 0.35, 0.8]))
    assert roc[0]["fpr"] == 0.0 and roc[-1] == pytest.approx(
        {"fpr": 1.0, "tpr": 1.0, "threshold": roc[-1]["threshold"]}
    )
    # scores .8(P) .4(N) .35(P) .1(N): precision 1 at t=.8, 1/2 at .4, 2/3 at .35, 1/2 at .1
    assert [r["precision"] for r in pr] == pytest.approx([0.5, 2 / 3, 0.5, 1.0], abs=1e-6)
    rep.write_csv(roc, ("fpr", "tpr", "threshold"), tmp_path / "roc.csv")
    with (tmp_path / "roc.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(roc)
    png = tmp_path / "cm.png"
    cms = {"at the operating threshold": np.array([[5, 1], [0, 3]]), "argmax": np.eye(2, dtype=int)}
    rep.plot_confusion(cms, NAMES, png)
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 400


def test_mlflow_metric_names():
    p = probs_of([0.2, 0.7])
    m = rep.compute_metrics(np.array([0, 1]), p.argmax(1), p, NAMES, "sensitive")
    m["argmax"] = {"accuracy": 0.5, "per_class": {"safe": {"recall": 0.25, "f1": None}}}
    names = rep.mlflow_metrics(m)
    assert names["test_accuracy"] == 1.0 and names["test_sensitive_recall"] == 1.0
    assert names["test_argmax_accuracy"] == 0.5 and names["test_argmax_safe_recall"] == 0.25
    assert "test_argmax_safe_f1" not in names and "test_per_class" not in names


def test_decide_at_the_threshold_and_otherwise_the_best_other_class():
    p = np.array([[0.5, 0.2, 0.3], [0.6, 0.1, 0.3], [0.1, 0.15, 0.75]])
    assert rep.decide(p, 1, 0.15).tolist() == [1, 0, 1]
    assert rep.decide(p, 2, 0.5).tolist() == [0, 0, 2]


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
    with pytest.raises(rep.StageError, match=r"report.positive_class 'nsfw' is not a class"):
        rep.choose_positive("nsfw", {"cats": 1, "dogs": 2})


def test_report_text_labels_each_rule():
    y = np.array([0, 1, 1])
    text = rep.report_text(
        y,
        {"at the operating threshold (b >= 0.3000)": np.array([1, 1, 1]), "argmax (top class)": y},
        ["a", "b"],
    )
    first, second = text.split("== argmax (top class) ==")
    assert first.startswith("== at the operating threshold (b >= 0.3000) ==")
    assert "accuracy                         0.6667" in first
    assert "accuracy                         1.0000" in second
