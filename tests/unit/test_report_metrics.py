"""The report's figures against hand-computed values: metrics, AUCs, curves, reports."""

from __future__ import annotations

import numpy as np
import pytest

from imgclf.pipeline.report_metrics import (
    PR_FIELDS,
    ROC_FIELDS,
    auc_scores,
    classification_reports,
    compute_metrics,
    curve_rows,
)
from tests.unit.report_cases import NAMES, probs_of


def test_metrics_by_hand():
    # truth: 0 0 0 1 1; predicted (score >= .5): 0 1 0 1 0
    y = np.array([0, 0, 0, 1, 1])
    p = probs_of([0.1, 0.7, 0.2, 0.9, 0.4])
    m = compute_metrics(y, p.argmax(1), p, NAMES, "sensitive")
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


def test_metrics_with_an_absent_class_have_no_auc():
    p = probs_of([0.2, 0.6])
    m = compute_metrics(np.array([0, 0]), p.argmax(1), p, NAMES, "sensitive")
    assert m["roc_auc"] is None and m["pr_auc"] is None and m["accuracy"] == 0.5
    three = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])  # class c absent
    assert auc_scores(np.array([0, 1]), three, ["a", "b", "c"], "c") == (None, None)


def test_multiclass_metrics():
    y = np.array([0, 1, 2, 2])
    p = np.eye(3)[[0, 1, 2, 1]] * 0.8 + 0.2 / 3
    m = compute_metrics(y, p.argmax(1), p, ["a", "b", "c"], "c")
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class"]["c"]["recall"] == pytest.approx(0.5)
    # one-vs-rest AUC by pairs: a 3/3; b: its positive (.87) beats .07, .07, ties .87 -> 2.5/3;
    # c: positives .87 and .07 against .07, .07 -> (2 + 2 * 0.5) / 4
    assert m["roc_auc"] == pytest.approx((1 + 2.5 / 3 + 0.75) / 3, abs=1e-6)


def test_curve_rows():
    positive = np.array([0, 0, 1, 1], bool)
    roc, pr = curve_rows(positive, np.array([0.1, 0.4, 0.35, 0.8]), "sensitive")
    # scores .8(P) .4(N) .35(P) .1(N): ROC (fpr, tpr) steps at each score from the top
    assert [(r["fpr"], r["tpr"], r["threshold"]) for r in roc] == [
        (0.0, 0.0, 1.0), (0.0, 0.5, 0.8), (0.5, 0.5, 0.4), (0.5, 1.0, 0.35), (1.0, 1.0, 0.1),
    ]  # fmt: skip
    # precision 1/2 at t=.1, 2/3 at .35, 1/2 at .4, 1 at .8 (lowest threshold first)
    assert [(r["recall"], r["precision"], r["threshold"]) for r in pr] == [
        (1.0, 0.5, 0.1), (1.0, 0.666667, 0.35), (0.5, 0.5, 0.4), (0.5, 1.0, 0.8),
    ]  # fmt: skip
    assert {r["positive_class"] for r in roc + pr} == {"sensitive"}
    assert list(roc[0]) == list(ROC_FIELDS) and list(pr[0]) == list(PR_FIELDS)
    bare, _ = curve_rows(positive, np.array([0.1, 0.4, 0.35, 0.8]))
    assert list(bare[0]) == ["fpr", "tpr", "threshold"]


def test_classification_reports_label_each_rule():
    y = np.array([0, 1, 1])
    text = classification_reports(
        y,
        {"at the operating threshold (b >= 0.3000)": np.array([1, 1, 1]), "argmax (top class)": y},
        ["a", "b"],
    )
    first, second = text.split("== argmax (top class) ==")
    assert first.startswith("== at the operating threshold (b >= 0.3000) ==")
    assert "accuracy                         0.6667" in first
    assert "accuracy                         1.0000" in second
