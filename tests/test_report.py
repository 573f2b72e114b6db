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
    m = rep.compute_metrics(y, p, NAMES, "sensitive")
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
    m = rep.compute_metrics(np.array([0, 0]), probs_of([0.2, 0.6]), NAMES, "sensitive")
    assert m["roc_auc"] is None and m["accuracy"] == pytest.approx(0.5)


def test_multiclass_metrics():
    y = np.array([0, 1, 2, 2])
    p = np.eye(3)[[0, 1, 2, 1]] * 0.8 + 0.2 / 3
    m = rep.compute_metrics(y, p, ["a", "b", "c"], "c")
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class"]["c"]["recall"] == pytest.approx(0.5)
    assert 0 < m["roc_auc"] <= 1


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
    assert all(0 <= r["precision"] <= 1 for r in pr)
    rep.write_csv(roc, ("fpr", "tpr", "threshold"), tmp_path / "roc.csv")
    with (tmp_path / "roc.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(roc)
    png = tmp_path / "cm.png"
    rep.plot_confusion(np.array([[5, 1], [0, 3]]), NAMES, png)
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 400


def test_flat_metric_names():
    m = rep.compute_metrics(np.array([0, 1]), probs_of([0.2, 0.7]), NAMES, "sensitive")
    flat = rep.flat(m)
    assert flat["test_accuracy"] == 1.0 and flat["test_sensitive_recall"] == 1.0
    assert "test_per_class" not in flat
