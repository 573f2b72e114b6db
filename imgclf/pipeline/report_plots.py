"""The report's charts (matplotlib, file-only Agg backend; 100 dpi PNGs written atomically):
the confusion matrices of each decision rule, and the positive class's ROC and
precision-recall curves with the operating point marked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.files import replacing
from imgclf.pipeline.operating_point import precision_recall_at
from imgclf.pipeline.report_metrics import rounded


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` as a 100 dpi PNG (atomically) and close it."""
    fig.tight_layout()
    with replacing(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    _pyplot().close(fig)
    return path


def plot_confusion(matrices: dict[str, np.ndarray], class_names: Sequence[str], path: Path) -> Path:
    """One row per decision rule (its name is the row's title): counts and row-normalised
    confusion matrices, drawn with scikit-learn's ``ConfusionMatrixDisplay``."""
    from sklearn.metrics import ConfusionMatrixDisplay

    k = len(class_names)
    side = max(4.0, 0.6 * k + 2.5)
    rows = len(matrices)
    fig, axes = _pyplot().subplots(rows, 2, figsize=(2 * side + 1, side * rows), squeeze=False)
    for (rule, cm), (left, right) in zip(matrices.items(), axes, strict=True):
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        for ax, data, what, fmt in ((left, cm, "counts", "d"), (right, norm, "row share", ".2f")):
            ConfusionMatrixDisplay(data, display_labels=list(class_names)).plot(
                ax=ax, cmap="Blues", colorbar=False, values_format=fmt, xticks_rotation=45
            )
            ax.set_title(f"{rule}\n{what}", fontsize=10)
            ax.set_xlabel("predicted")
            ax.set_ylabel("actual")
    return _save(fig, path)


def plot_curves(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    positive: str,
    threshold: float,
    path: Path,
    split: str = "test",
) -> dict[str, Any]:
    """ROC and precision-recall curves of ``positive``'s score (one-vs-rest when there are
    more than two classes), drawn with scikit-learn's ``RocCurveDisplay`` and
    ``PrecisionRecallDisplay``, the operating point ``score >= threshold`` marked on both;
    the title names the positive class, the classes it is told from, and ``split``.

    Returns what was drawn: ``title``, ``roc_auc``, ``average_precision`` and
    ``operating_point`` (``fpr``, ``recall``, ``precision`` at ``threshold``).
    """
    pos = list(class_names).index(positive)
    truth = np.asarray(y_true) == pos
    scores = np.asarray(probs)[:, pos]
    others = [c for c in class_names if c != positive]
    against = f"vs {others[0]}" if len(others) == 1 else f"one vs rest: {', '.join(others)}"
    flagged = scores >= threshold
    fpr = float(np.mean(flagged[~truth])) if (~truth).any() else float("nan")
    at = precision_recall_at(scores, truth, threshold)
    title = (
        f"positive class: {positive} ({against}), {split} split, "
        f"{int(truth.sum())} of {len(truth)} positive; operating point {positive} >= "
        f"{threshold:.4f}"
    )
    marked = (fpr, at["recall"], at["precision"])
    roc_auc, average_precision = _draw_curves(
        truth, scores, positive, threshold, marked, (title, split), path
    )
    return {
        "title": title,
        "roc_auc": roc_auc,
        "average_precision": average_precision,
        "operating_point": {
            "fpr": rounded(fpr),
            "recall": at["recall"],
            "precision": at["precision"],
        },
    }


def _draw_curves(
    truth: np.ndarray,
    scores: np.ndarray,
    positive: str,
    threshold: float,
    marked: tuple[float, float | None, float | None],
    titles: tuple[str, str],
    path: Path,
) -> tuple[float | None, float | None]:
    """The two panels of :func:`plot_curves` (``marked``: the operating point's fpr,
    recall and precision; ``titles``: the figure's title and the split), saved to
    ``path``; returns the ROC AUC and average precision drawn."""
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    title, split = titles
    fpr, recall, precision = marked
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(11, 5))
    roc = RocCurveDisplay.from_predictions(
        truth, scores, pos_label=True, name=positive, ax=left, plot_chance_level=True
    )
    prc = PrecisionRecallDisplay.from_predictions(
        truth, y_score=scores, pos_label=True, name=positive, ax=right, plot_chance_level=True
    )
    mark = f"operating point ({positive} >= {threshold:.4f})"
    left.plot([fpr], [recall], "o", color="crimson", markersize=8, label=mark)
    if precision is not None:
        right.plot([recall], [precision], "o", color="crimson", ms=8, label=mark)
    left.set_title(f"ROC of {positive} ({split})", fontsize=10)
    left.set_xlabel(f"false positive rate (others flagged as {positive})")
    left.set_ylabel(f"recall of {positive}")
    right.set_title(f"precision-recall of {positive} ({split})", fontsize=10)
    right.set_xlabel(f"recall of {positive}")
    right.set_ylabel(f"precision of {positive}")
    for ax in (left, right):
        ax.legend(loc="lower right" if ax is left else "lower left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return rounded(roc.roc_auc), rounded(prc.average_precision)
