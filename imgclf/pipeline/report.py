"""Stage ``report``: judge the candidate on the test split; choose the operating threshold.

Predictions are streamed in batches (``tf.data`` + ``model.predict``); only the scores are
kept, never the images. Serving decides at a threshold, so the report does too:

- ``operating_point.json``: the highest score threshold of the positive class whose
  one-sided lower confidence bound (Clopper-Pearson, at ``report.recall_confidence``) of
  *val* recall reaches ``report.target_recall`` (too few val positives: the lowest val
  positive score, ``bound_met: false``); what it promises (``expected``) and the
  precision/recall it gives on val and test. The positive class is
  ``report.positive_class``, or when null the rarest class of the training data (the log
  says which);
- ``test.json`` (the headline ``dvc exp show`` lists): at the operating threshold (what
  serving answers) accuracy, macro F1, the positive class's recall and precision; ROC AUC
  and PR AUC. ``report/test_detail.json``: per-class precision/recall/F1/support, and under
  ``argmax`` the same figures for the plain top class, for comparison;
- ``report/confusion_matrix.png`` (both rules, counts and row-normalised, each labelled) and
  ``report/classification_report.txt`` (scikit-learn format, both rules, labelled);
- plots: ``plots/predictions.csv`` (actual / predicted at the threshold, DVC's confusion
  template), ``plots/roc.csv``, ``plots/pr.csv``.

The quality gate is the next stage's (``promote``). MLflow: resumes the run ``train``
created and logs the report params, test metrics and report files.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import beta as beta_dist
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from imgclf.config import (
    PATHS,
    StageError,
    import_tensorflow,
    load_params,
    setup_logging,
    stage_main,
)
from imgclf.files import replacing, write_bytes, write_csv, write_json
from imgclf.params import Report
from imgclf.pipeline.dataset import encode_labels, make_dataset, read_list

log = logging.getLogger(__name__)


def _rounded(value: float) -> float | None:
    """Rounded float, None for NaN (JSON has no NaN)."""
    return None if value is None or math.isnan(value) else round(float(value), 6)


def choose_positive(named: str | None, class_counts: dict[str, int]) -> tuple[str, str]:
    """The positive class and why: ``named`` when set, else the rarest class in training
    (ties: the last name in sort order). A named class that is not a class is an error."""
    if named is not None:
        if named not in class_counts:
            raise StageError(
                f"report.positive_class {named!r} is not a class of the candidate: "
                f"{sorted(class_counts)}"
            )
        return named, "report.positive_class"
    rarest = min(sorted(class_counts, reverse=True), key=class_counts.__getitem__)
    total = sum(class_counts.values())
    why = f"the rarest class ({class_counts[rarest]} of {total} training images)"
    return rarest, why


def decisions_at_threshold(probs: np.ndarray, positive: int, threshold: float) -> np.ndarray:
    """Class index per row as serving decides: ``positive`` when its score reaches the
    threshold, else the most probable other class."""
    others = probs.copy()
    others[:, positive] = -1.0
    return np.where(probs[:, positive] >= threshold, positive, others.argmax(axis=1))


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
    return _rounded(roc), _rounded(pr)


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
        "accuracy": _rounded(accuracy_score(y_true, y_pred)),
        "macro_f1": _rounded(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "roc_auc": roc,
        "pr_auc": pr,
        "n": len(y_true),
        "per_class": {
            name: {
                "precision": _rounded(p[i]),
                "recall": _rounded(r[i]),
                "f1": _rounded(f[i]),
                "support": int(s[i]),
            }
            for i, name in enumerate(class_names)
        },
    }


def threshold_for_recall(scores: np.ndarray, is_positive: np.ndarray, target: float) -> float:
    """The *old* rule, kept for comparison (``benchmarks/bench_threshold.py``): the highest
    threshold ``t`` with recall(``score >= t``) >= ``target`` on these scores.

    It is the ``ceil(target * n_pos)``-th highest score of a positive example, so recall on
    unseen data lands on the target's edge (below it about half the time).
    """
    _check_target(target)
    pos = np.sort(np.asarray(scores)[np.asarray(is_positive, dtype=bool)])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive example to choose a threshold from")
    need = max(1, math.ceil(target * len(pos) - 1e-9))
    return float(pos[need - 1])


BOUND_RULE = "clopper_pearson_lower_bound"
FALLBACK_RULE = "lowest_positive_fallback"


def _check_target(target: float) -> None:
    if not 0.0 < target <= 1.0:
        raise ValueError(f"report.target_recall must be in (0, 1], got {target}")


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"report.recall_confidence must be in (0, 1), got {confidence}")


def recall_lower_bound(hits: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower confidence bound of a recall of ``hits`` out of
    ``n`` positives: the true recall is at least this with probability ``confidence``.

    It is the ``1 - confidence`` quantile of Beta(hits, n - hits + 1) (0 when ``hits`` is 0);
    for ``hits == n`` that is ``(1 - confidence) ** (1 / n)``.
    """
    _check_confidence(confidence)
    if n < 1 or not 0 <= hits <= n:
        raise ValueError(f"need n >= 1 and 0 <= hits <= n, got hits={hits}, n={n}")
    if hits == 0:
        return 0.0
    return float(beta_dist.ppf(1.0 - confidence, hits, n - hits + 1))


def positives_needed(target_recall: float, confidence: float) -> int | None:
    """Fewest positives for which recall 1 has a lower bound reaching ``target_recall``:
    the smallest ``n`` with ``(1 - confidence) ** (1 / n) >= target_recall`` (None for a
    target of 1, which no finite sample can vouch for)."""
    _check_target(target_recall)
    _check_confidence(confidence)
    if target_recall >= 1.0:
        return None
    return max(1, math.ceil(math.log(1.0 - confidence) / math.log(target_recall) - 1e-9))


def _floor8(value: float) -> float:
    """``value`` rounded to 8 decimals, never up (a rounded threshold must still flag the
    example it was taken from, as serving compares ``score >= threshold``)."""
    out = round(value, 8)
    while out > value:
        out = round(out - 1e-8, 8)
    return out


def confident_threshold(
    scores: np.ndarray, is_positive: np.ndarray, target_recall: float, confidence: float
) -> dict[str, Any]:
    """The threshold a moderator can rely on: the highest ``t`` such that the one-sided
    Clopper-Pearson lower bound (at ``confidence``) of the recall of ``score >= t`` on
    these (val) scores is at least ``target_recall``.

    Why it holds on unseen data: with ``t`` the k-th highest of the n positive scores, the
    true recall at ``t`` is Beta(k, n - k + 1) distributed whatever the model's score
    distribution, and k depends on n, the target and the confidence only. So the true
    recall reaches the bound, hence the target, with probability ``confidence``.

    ``t`` is a positive's score rounded down to 8 decimals (what ``operating_point.json``
    stores). When even ``t`` = the lowest positive score (recall 1) cannot give that bound
    (fewer positives than :func:`positives_needed`), ``t`` is that lowest score, ``rule``
    is ``FALLBACK_RULE`` and ``bound_met`` is False; no error.

    Returns ``threshold``, ``rule``, ``bound_met``, ``hits`` (positives flagged),
    ``n_positive``, ``recall`` and ``recall_lower_bound`` (of the returned threshold).
    A score array without a positive is a ``ValueError``.
    """
    _check_target(target_recall)
    _check_confidence(confidence)
    values = np.asarray(scores, dtype=np.float64)
    pos = np.sort(values[np.asarray(is_positive, dtype=bool)])[::-1]
    n = len(pos)
    if n == 0:
        raise ValueError("no positive example to choose a threshold from")
    k = np.arange(1, n + 1)
    bounds = beta_dist.ppf(1.0 - confidence, k, n - k + 1)  # increasing in k
    reaching = np.flatnonzero(bounds >= target_recall - 1e-12)
    met = reaching.size > 0
    t = _floor8(float(pos[reaching[0]] if met else pos[-1]))
    hits = int(np.sum(pos >= t))  # ties and rounding down can only add positives
    bound = recall_lower_bound(hits, n, confidence)
    return {
        "threshold": t,
        "rule": BOUND_RULE if met else FALLBACK_RULE,
        "bound_met": bool(met),
        "hits": hits,
        "n_positive": n,
        "recall": round(hits / n, 6),
        "recall_lower_bound": round(bound, 6),
    }


def precision_recall_at(
    scores: np.ndarray, is_positive: np.ndarray, threshold: float
) -> dict[str, float | None]:
    """Precision and recall of ``score >= threshold`` (precision None if nothing is flagged)."""
    flagged = np.asarray(scores) >= threshold
    truth = np.asarray(is_positive, dtype=bool)
    tp = int(np.sum(flagged & truth))
    precision = tp / int(flagged.sum()) if flagged.any() else None
    recall = tp / int(truth.sum()) if truth.any() else None
    return {
        "precision": None if precision is None else round(precision, 6),
        "recall": None if recall is None else round(recall, 6),
    }


def operating_point(
    val_scores: np.ndarray,
    val_positive: np.ndarray,
    test_scores: np.ndarray,
    test_positive: np.ndarray,
    positive: str,
    target_recall: float,
    recall_confidence: float,
) -> dict[str, Any]:
    """``operating_point.json``: the threshold of :func:`confident_threshold` chosen on val,
    what it promises (``expected``: recall = the val recall's lower bound, precision = the
    val precision) and what it gives on val and test."""
    choice = confident_threshold(val_scores, val_positive, target_recall, recall_confidence)
    t = choice["threshold"]
    val = precision_recall_at(val_scores, val_positive, t)
    test = precision_recall_at(test_scores, test_positive, t)
    return {
        "positive_class": positive,
        "target_recall": float(target_recall),
        "recall_confidence": float(recall_confidence),
        "threshold": t,
        "rule": choice["rule"],
        "bound_met": choice["bound_met"],
        "val": val
        | {"recall_lower_bound": choice["recall_lower_bound"], "n_positive": choice["n_positive"]},
        "test": test | {"n_positive": int(np.asarray(test_positive, dtype=bool).sum())},
        "expected": {"recall": choice["recall_lower_bound"], "precision": val["precision"]},
    }


def describe_operating_point(op: dict[str, Any]) -> str:
    """One line for the log and the report: the rule, its promise, and what test gave."""
    conf = f"{100 * op['recall_confidence']:g}%"
    val, test = op["val"], op["test"]
    head = f"{op['positive_class']} >= {op['threshold']:.6g}: "
    if op["bound_met"]:
        rule = (
            f"val recall {val['recall']} ({conf} lower bound {val['recall_lower_bound']} "
            f">= target {op['target_recall']:g}, {val['n_positive']} val positives)"
        )
    else:
        need = positives_needed(op["target_recall"], op["recall_confidence"])
        rule = (
            f"TARGET NOT VOUCHED FOR: only {val['n_positive']} val positives (a {conf} bound "
            f"of {op['target_recall']:g} needs {need or 'infinitely many'}); threshold = the "
            f"lowest val positive score, {conf} lower bound {val['recall_lower_bound']}"
        )
    return (
        f"{head}{rule}; expected precision {op['expected']['precision']}; test recall "
        f"{test['recall']} precision {test['precision']} ({test['n_positive']} positives)"
    )


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
            "fpr": _rounded(fpr),
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
    return _rounded(roc.roc_auc), _rounded(prc.average_precision)


MISTAKE_FIELDS = ("path", "true", "predicted", "score")
# layout of the mistakes grid, pixels: cell = padding, thumbnail, padding, three caption
# lines, padding; a header line above the cells
GRID_PAD, GRID_LINE, GRID_HEADER = 6, 14, 22


def most_confident_errors(
    paths: Sequence[str],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    limit: int = 24,
) -> list[dict[str, Any]]:
    """The ``limit`` errors (``y_pred != y_true``) given the highest probability for the
    class they were wrongly decided as, highest first, ties by path: rows of
    :data:`MISTAKE_FIELDS` (``score`` is that probability)."""
    y_true, y_pred, probs = np.asarray(y_true), np.asarray(y_pred), np.asarray(probs)
    wrong = np.flatnonzero(y_true != y_pred)
    scored = [(float(probs[i, y_pred[i]]), str(paths[i]), int(i)) for i in wrong]
    scored.sort(key=lambda x: (-x[0], x[1]))
    return [
        {
            "path": p,
            "true": class_names[int(y_true[i])],
            "predicted": class_names[int(y_pred[i])],
            "score": round(s, 6),
        }
        for s, p, i in scored[: max(0, limit)]
    ]


def _font() -> Any:
    """Pillow's default font at 11 px (the fixed bitmap font without FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _fit(draw: Any, font: Any, value: str, width: int) -> str:
    """``value``, cut to ``width`` pixels and then marked by an ellipsis when too long."""
    if draw.textlength(value, font=font) <= width:
        return value
    while len(value) > 1 and draw.textlength(value + "…", font=font) > width:
        value = value[:-1]
    return value + "…"


def _thumbnail(source: Path, side: int) -> Any:
    """The image at ``source`` shrunk into a ``side`` square; a grey square if unreadable."""
    from PIL import Image, ImageOps

    try:
        with Image.open(source) as img:
            return ImageOps.contain(img.convert("RGB"), (side, side))
    except (OSError, ValueError):
        return Image.new("RGB", (side, side), (160, 160, 160))


def mistakes_grid(
    paths: Sequence[str],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    out_png: Path,
    limit: int = 24,
    *,
    root: Path | None = None,
    thumb: int = 96,
    columns: int = 6,
    split: str = "test",
) -> list[dict[str, Any]]:
    """Draw :func:`most_confident_errors` as a PNG grid of thumbnails (read from
    ``root / path``, or ``path``), each captioned with its true label, predicted label and
    score, under a header line; returns the rows (for a CSV).

    The image is ``min(columns, n)`` cells wide and ``ceil(n / columns)`` high, each cell
    ``thumb + 2 * GRID_PAD`` wide and ``thumb + 3 * GRID_PAD + 3 * GRID_LINE`` high, plus
    ``GRID_HEADER`` on top (n = 0: one cell saying there is no error). An unreadable image
    is a grey square.
    """
    from PIL import Image, ImageDraw

    rows = most_confident_errors(paths, y_true, y_pred, probs, class_names, limit)
    n_errors = int(np.sum(np.asarray(y_true) != np.asarray(y_pred)))
    cols = max(1, min(columns, len(rows)))
    cell_w, cell_h = thumb + 2 * GRID_PAD, thumb + 3 * GRID_PAD + 3 * GRID_LINE
    height = GRID_HEADER + max(1, math.ceil(len(rows) / cols)) * cell_h
    canvas = Image.new("RGB", (cols * cell_w, height), "white")
    draw, font = ImageDraw.Draw(canvas), _font()

    def text(xy: tuple[int, int], value: str, width: int, fill: str = "black") -> None:
        draw.text(xy, _fit(draw, font, value, width), fill=fill, font=font)

    header = (
        f"{len(rows)} most confident of {n_errors} errors ({split}); score = probability "
        "of the predicted class"
        if rows
        else f"no errors on {split}"
    )
    text((GRID_PAD, 4), header, canvas.width - 2 * GRID_PAD)
    for idx, row in enumerate(rows):
        x = (idx % cols) * cell_w + GRID_PAD
        y = GRID_HEADER + (idx // cols) * cell_h + GRID_PAD
        small = _thumbnail(Path(row["path"]) if root is None else Path(root) / row["path"], thumb)
        canvas.paste(small, (x + (thumb - small.width) // 2, y + (thumb - small.height) // 2))
        y += thumb + GRID_PAD
        text((x, y), f"true: {row['true']}", thumb)
        text((x, y + GRID_LINE), f"pred: {row['predicted']}", thumb, fill="crimson")
        text((x, y + 2 * GRID_LINE), f"score {row['score']:.3f}", thumb)
    with replacing(out_png, "wb") as fh:
        canvas.save(fh, format="PNG")
    return rows


def predict_probs(model: Any, files: Sequence[str], image_size: int, batch_size: int) -> np.ndarray:
    """Class probabilities of the images at ``files``, streamed batch by batch."""
    if not files:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    labels = np.zeros(len(files), np.int32)
    ds = make_dataset(files, labels, image_size, batch_size, cache=False)
    return model.predict(ds.map(lambda x, _y: x), verbose=0)


@dataclass(frozen=True)
class Scored:
    """One side of the split scored by the candidate."""

    paths: list[str]  # as listed: relative to the project root
    y: np.ndarray  # class index per image
    probs: np.ndarray  # (images, classes) probabilities


def score_candidate(
    class_names: Sequence[str], image_size: int, batch_size: int
) -> tuple[Scored, Scored]:
    """The candidate's probabilities on the val and test sides (an empty test side is a
    :class:`StageError`)."""
    import keras

    model = keras.models.load_model(PATHS.model_file)
    scored = []
    for side in ("val", "test"):
        listed = read_list(PATHS.split_list(side))
        probs = predict_probs(model, listed.files(PATHS.root), image_size, batch_size)
        scored.append(Scored(listed.paths, encode_labels(listed.labels, class_names), probs))
    val, test = scored
    if len(test.y) == 0:
        raise StageError("the test list is empty: rerun the split stage")
    return val, test


ARGMAX_RULE = "argmax (top class)"
ARGMAX_FIELDS = ("accuracy", "macro_f1", "per_class")


@dataclass(frozen=True)
class Evaluation:
    """The candidate judged on test at the operating point chosen on val."""

    class_names: list[str]
    positive: str
    test: Scored
    operating_point: dict[str, Any]
    # rule title -> decided class per test image: the operating threshold's, then argmax
    decisions: dict[str, np.ndarray]
    # compute_metrics of the threshold's decisions, with ARGMAX_FIELDS of argmax's under "argmax"
    metrics: dict[str, Any]

    @property
    def positive_index(self) -> int:
        """Column of the positive class in ``test.probs``."""
        return self.class_names.index(self.positive)

    @property
    def at_threshold(self) -> np.ndarray:
        """The decisions serving makes: at the operating threshold."""
        return next(iter(self.decisions.values()))

    @property
    def report_text(self) -> str:
        """scikit-learn's classification report of each rule."""
        return classification_reports(self.test.y, self.decisions, self.class_names)


def evaluate(
    val: Scored, test: Scored, class_names: list[str], positive: str, cfg: Report
) -> Evaluation:
    """Choose the operating threshold on ``val`` (:func:`operating_point`); decide ``test``
    at it and by argmax; the metrics of both."""
    pos = class_names.index(positive)
    op = operating_point(
        val.probs[:, pos], val.y == pos, test.probs[:, pos], test.y == pos, positive,
        cfg.target_recall, cfg.recall_confidence,
    )  # fmt: skip
    at_threshold = decisions_at_threshold(test.probs, pos, op["threshold"])
    decisions = {
        f"at the operating threshold ({positive} >= {op['threshold']:.4f})": at_threshold,
        ARGMAX_RULE: test.probs.argmax(axis=1),
    }
    metrics = compute_metrics(test.y, at_threshold, test.probs, class_names, positive)
    argmax = compute_metrics(test.y, decisions[ARGMAX_RULE], test.probs, class_names, positive)
    metrics["argmax"] = {k: argmax[k] for k in ARGMAX_FIELDS}
    return Evaluation(class_names, positive, test, op, decisions, metrics)


def mlflow_metrics(metrics: dict[str, Any], prefix: str = "test_") -> dict[str, float]:
    """MLflow metric names: ``test_accuracy``, ``test_safe_recall``,
    ``test_argmax_accuracy``, ... (None values left out)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(mlflow_metrics(value, prefix if key == "per_class" else f"{prefix}{key}_"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


HEADLINE = ("accuracy", "macro_f1", "roc_auc", "pr_auc")


def headline_metrics(metrics: dict[str, Any], op: dict[str, Any]) -> dict[str, Any]:
    """``test.json``, the columns of ``dvc exp show``: accuracy and macro F1 at the operating
    threshold, ROC and PR AUC, and the positive class's test recall and precision there.
    Per-class and argmax figures go to ``report/test_detail.json``."""
    return {k: metrics[k] for k in HEADLINE} | {
        "recall": op["test"]["recall"],
        "precision": op["test"]["precision"],
    }


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


PREDICTION_FIELDS = ("path", "actual", "predicted", "argmax", "score")


def prediction_rows(ev: Evaluation) -> list[list[Any]]:
    """Rows of :data:`PREDICTION_FIELDS`: each test image's class, its decisions at the
    threshold and by argmax, and its positive-class score (DVC's confusion template)."""
    names, test = ev.class_names, ev.test
    argmax = ev.decisions[ARGMAX_RULE]
    scores = test.probs[:, ev.positive_index]
    return [
        [path, names[a], names[b], names[c], round(float(s), 6)]
        for path, a, b, c, s in zip(
            test.paths, test.y, ev.at_threshold, argmax, scores, strict=True
        )
    ]


def write_metrics(ev: Evaluation) -> list[Path]:
    """``test.json`` (the headline), ``operating_point.json`` and the details,
    ``report/test_detail.json``."""
    return [
        write_json(PATHS.test_metrics, headline_metrics(ev.metrics, ev.operating_point)),
        write_json(PATHS.operating_point, ev.operating_point),
        write_json(
            PATHS.metrics / "report" / "test_detail.json",
            {"positive_class": ev.positive, **ev.metrics},
        ),
    ]


def write_plot_data(ev: Evaluation, folder: Path) -> list[Path]:
    """What ``dvc plots`` draws: ``predictions.csv`` (confusion matrix), ``roc.csv``,
    ``pr.csv`` (the positive class's curves)."""
    pos = ev.positive_index
    roc, pr = curve_rows(ev.test.y == pos, ev.test.probs[:, pos], ev.positive)
    return [
        write_csv(folder / "predictions.csv", PREDICTION_FIELDS, prediction_rows(ev)),
        write_csv(folder / "roc.csv", ROC_FIELDS, roc),
        write_csv(folder / "pr.csv", PR_FIELDS, pr),
    ]


def write_report_files(ev: Evaluation, folder: Path) -> list[Path]:
    """The human-readable report: classification reports, confusion matrices, ROC and PR
    curves with the operating point, and the most confident mistakes (PNG and CSV)."""
    test, labels = ev.test, list(range(len(ev.class_names)))
    matrices = {
        rule: confusion_matrix(test.y, y, labels=labels) for rule, y in ev.decisions.items()
    }
    mistakes = mistakes_grid(
        test.paths, test.y, ev.at_threshold, test.probs, ev.class_names, folder / "mistakes.png",
        root=PATHS.root,
    )  # fmt: skip
    threshold = ev.operating_point["threshold"]
    plot_curves(test.y, test.probs, ev.class_names, ev.positive, threshold, folder / "curves.png")
    return [
        write_bytes(folder / "classification_report.txt", ev.report_text.encode()),
        plot_confusion(matrices, ev.class_names, folder / "confusion_matrix.png"),
        folder / "curves.png",
        folder / "mistakes.png",
        write_csv(folder / "mistakes.csv", MISTAKE_FIELDS, mistakes),
    ]


def log_evaluation(ev: Evaluation) -> None:
    """The test figures and classification reports, then the operating point (a warning
    when its recall target is not vouched for)."""
    rule = next(iter(ev.decisions))
    log.info(
        "test accuracy %.4f %s (argmax %.4f), macro F1 %.4f\n%s",
        ev.metrics["accuracy"], rule, ev.metrics["argmax"]["accuracy"], ev.metrics["macro_f1"],
        ev.report_text,
    )  # fmt: skip
    op = ev.operating_point
    (log.info if op["bound_met"] else log.warning)(
        "operating point: %s", describe_operating_point(op)
    )


def log_to_mlflow(run: Any, cfg: Report, ev: Evaluation, files: Sequence[Path]) -> None:
    """The report params, the test metrics (``test_*``), the operating point (``op_*``) and
    ``files`` (under ``report/``) to the candidate's MLflow run."""
    from imgclf import tracking

    op = ev.operating_point
    run.log_params(tracking.flatten({"report": cfg.model_dump()}))
    run.log_metrics(
        mlflow_metrics(ev.metrics)
        | {"op_threshold": op["threshold"]}
        | mlflow_metrics({s: op[s] for s in ("val", "test", "expected")}, "op_")
    )
    run.set_tags({"positive_class": ev.positive})
    for path in files:
        run.log_artifact(path, "report")


def read_candidate_metadata() -> dict[str, Any]:
    """``models/candidate/metadata.json`` (a clear error before any train run)."""
    if not PATHS.model_metadata.is_file():
        raise StageError(f"no candidate in {PATHS.candidate}: run the train stage first")
    return json.loads(PATHS.model_metadata.read_text(encoding="utf-8"))


@stage_main
def main() -> None:
    params = load_params()
    setup_logging(params.base.log_level)
    cfg, meta = params.report, read_candidate_metadata()
    class_names = list(meta["class_names"])
    positive, why = choose_positive(cfg.positive_class, meta["class_counts"])
    log.info("operating threshold for %r: %s", positive, why)
    import_tensorflow()
    from imgclf import tracking

    run = tracking.resume(tracking.read_run_link(), params.mlflow.experiment)
    with tracking.taken(run):
        val, test = score_candidate(class_names, int(meta["image_size"]), cfg.batch_size)
        ev = evaluate(val, test, class_names, positive, cfg)
        files = write_metrics(ev) + write_plot_data(ev, PATHS.metrics / "plots")
        files += write_report_files(ev, PATHS.metrics / "report")
        log_evaluation(ev)
        log_to_mlflow(run, cfg, ev, files)
    tracking.check_required(run, params.mlflow.required)


if __name__ == "__main__":
    sys.exit(main())
