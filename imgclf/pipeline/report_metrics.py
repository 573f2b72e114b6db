"""The report's figures: metrics of decisions and scores, as ``metrics/test.json`` and
``report/test_detail.json`` hold them, and the ROC and PR points ``dvc plots`` draws.

Floats are rounded to 6 decimals and undefined ones are None (:func:`rounded`), so the
files are plain JSON and the same from run to run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)


def rounded(value: float | None) -> float | None:
    """``value`` rounded to 6 decimals; None for None or NaN (JSON has no NaN)."""
    return None if value is None or math.isnan(value) else round(float(value), 6)


def compute_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    positive: str,
) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class P/R/F1 of the decisions ``y_pred``; ROC AUC and PR
    AUC of the scores ``probs`` (:func:`auc_scores`)."""
    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    roc, pr = auc_scores(y_true, probs, class_names, positive)
    return {
        "accuracy": rounded(accuracy_score(y_true, y_pred)),
        "macro_f1": rounded(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "roc_auc": roc,
        "pr_auc": pr,
        "n": len(y_true),
        "per_class": {
            name: {
                "precision": rounded(p[i]),
                "recall": rounded(r[i]),
                "f1": rounded(f[i]),
                "support": int(s[i]),
            }
            for i, name in enumerate(class_names)
        },
    }


def auc_scores(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], positive: str
) -> tuple[float | None, float | None]:
    """ROC AUC and PR AUC (average precision) of the scores ``probs``: of ``positive``'s
    score for two classes, else macro one-vs-rest. Both are undefined (None) when a class
    is absent from ``y_true``."""
    k = len(class_names)
    onehot = np.eye(k)[np.asarray(y_true, dtype=int)]
    if len(y_true) == 0 or not onehot.any(axis=0).all():
        return None, None
    if k == 2:
        pos = list(class_names).index(positive)
        roc = roc_auc_score(onehot[:, pos], probs[:, pos])
        pr = average_precision_score(onehot[:, pos], probs[:, pos])
    else:
        roc = roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=range(k))
        pr = average_precision_score(onehot, probs, average="macro")
    return rounded(roc), rounded(pr)


# the figures test.json takes from compute_metrics (headline_metrics adds three of its own)
HEADLINE = ("accuracy", "macro_f1", "roc_auc", "pr_auc")


def headline_metrics(metrics: dict[str, Any], op: dict[str, Any]) -> dict[str, Any]:
    """``test.json``, the columns of ``dvc exp show``: accuracy at the operating threshold
    and by argmax (the threshold's cost), macro F1 at the threshold, ROC and PR AUC, and
    the positive class's test recall and precision there. Per-class figures go to
    ``report/test_detail.json``."""
    return {
        "accuracy": metrics["accuracy"],
        "argmax_accuracy": metrics["argmax"]["accuracy"],
        "recall": op["test"]["recall"],
        "precision": op["test"]["precision"],
    } | {k: metrics[k] for k in HEADLINE[1:]}


def classification_reports(
    y_true: np.ndarray, decisions: dict[str, np.ndarray], class_names: Sequence[str]
) -> str:
    """scikit-learn's classification report once per decision rule, each under its title."""
    labels = list(range(len(class_names)))
    parts = []
    for rule, y_pred in decisions.items():
        body = classification_report(
            y_true, y_pred, labels=labels, target_names=list(class_names), digits=4,
            zero_division=0,
        )  # fmt: skip
        parts.append(f"== {rule} ==\n\n{body}")
    return "\n".join(parts)


# columns of plots/roc.csv and plots/pr.csv
ROC_FIELDS = ("positive_class", "fpr", "tpr", "threshold")
PR_FIELDS = ("positive_class", "recall", "precision", "threshold")


def curve_rows(
    is_positive: np.ndarray, scores: np.ndarray, positive: str | None = None
) -> tuple[list[dict], list[dict]]:
    """ROC (``fpr, tpr, threshold``) and PR (``recall, precision, threshold``) points of
    ``positive``'s scores; with ``positive`` given every row names it (``positive_class``,
    the first of :data:`ROC_FIELDS` / :data:`PR_FIELDS`)."""
    fpr, tpr, roc_t = roc_curve(is_positive, scores)
    prec, rec, pr_t = precision_recall_curve(is_positive, scores)
    label = {} if positive is None else {"positive_class": positive}
    roc = [
        label | {"fpr": round(a, 6), "tpr": round(b, 6), "threshold": round(min(c, 1.0), 6)}
        for a, b, c in zip(fpr, tpr, roc_t, strict=True)
    ]
    pr = [
        label | {"recall": round(a, 6), "precision": round(b, 6), "threshold": round(c, 6)}
        for a, b, c in zip(rec[:-1], prec[:-1], pr_t, strict=True)
    ]
    return roc, pr
