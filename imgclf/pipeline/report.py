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

import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
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

log = logging.getLogger(__name__)


def _num(value: float) -> float | None:
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


def decide(probs: np.ndarray, positive: int, threshold: float) -> np.ndarray:
    """Class index per row as serving decides: ``positive`` when its score reaches the
    threshold, else the most probable other class."""
    others = probs.copy()
    others[:, positive] = -1.0
    return np.where(probs[:, positive] >= threshold, positive, others.argmax(axis=1))


def compute_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    positive: str,
) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class P/R/F1 of the decisions ``y_pred``; ROC AUC and PR
    AUC of the scores ``probs``.

    Two classes: the AUCs are of ``positive``'s score; more: macro one-vs-rest. An AUC that is
    undefined (a class absent from ``y_true``) is ``None``.
    """
    k = len(class_names)
    labels = list(range(k))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    onehot = np.eye(k)[y_true]
    try:
        if k == 2:
            pos = list(class_names).index(positive)
            roc = roc_auc_score(onehot[:, pos], probs[:, pos])
            pr = average_precision_score(onehot[:, pos], probs[:, pos])
        else:
            roc = roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels)
            pr = average_precision_score(onehot, probs, average="macro")
    except ValueError:
        roc = pr = float("nan")
    return {
        "accuracy": _num(accuracy_score(y_true, y_pred)),
        "macro_f1": _num(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "roc_auc": _num(roc),
        "pr_auc": _num(pr),
        "n": len(y_true),
        "per_class": {
            name: {
                "precision": _num(p[i]),
                "recall": _num(r[i]),
                "f1": _num(f[i]),
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


RULE = "clopper_pearson_lower_bound"
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
        "rule": RULE if met else FALLBACK_RULE,
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


def plot_confusion(matrices: dict[str, np.ndarray], class_names: Sequence[str], path: Path) -> None:
    """One row per decision rule (its name is the row's title): counts and row-normalised
    confusion matrices, drawn with scikit-learn's ``ConfusionMatrixDisplay``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    k = len(class_names)
    side = max(4.0, 0.6 * k + 2.5)
    rows = len(matrices)
    fig, axes = plt.subplots(rows, 2, figsize=(2 * side + 1, side * rows), squeeze=False)
    for (rule, cm), (left, right) in zip(matrices.items(), axes, strict=True):
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        for ax, data, what, fmt in ((left, cm, "counts", "d"), (right, norm, "row share", ".2f")):
            ConfusionMatrixDisplay(data, display_labels=list(class_names)).plot(
                ax=ax, cmap="Blues", colorbar=False, values_format=fmt, xticks_rotation=45
            )
            ax.set_title(f"{rule}\n{what}", fontsize=10)
            ax.set_xlabel("predicted")
            ax.set_ylabel("actual")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

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
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5))
    roc = RocCurveDisplay.from_predictions(
        truth, scores, pos_label=True, name=positive, ax=left, plot_chance_level=True
    )
    prc = PrecisionRecallDisplay.from_predictions(
        truth, y_score=scores, pos_label=True, name=positive, ax=right, plot_chance_level=True
    )
    mark = f"operating point ({positive} >= {threshold:.4f})"
    left.plot([fpr], [at["recall"]], "o", color="crimson", markersize=8, label=mark)
    if at["precision"] is not None:
        right.plot([at["recall"]], [at["precision"]], "o", color="crimson", ms=8, label=mark)
    left.set_title(f"ROC of {positive} ({split})", fontsize=10)
    left.set_xlabel(f"false positive rate (others flagged as {positive})")
    left.set_ylabel(f"recall of {positive}")
    right.set_title(f"precision-recall of {positive} ({split})", fontsize=10)
    right.set_xlabel(f"recall of {positive}")
    right.set_ylabel(f"precision of {positive}")
    for ax in (left, right):
        ax.legend(loc="lower right" if ax is left else "lower left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {
        "title": title,
        "roc_auc": _num(roc.roc_auc),
        "average_precision": _num(prc.average_precision),
        "operating_point": {"fpr": _num(fpr), "recall": at["recall"], "precision": at["precision"]},
    }


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
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    rows = most_confident_errors(paths, y_true, y_pred, probs, class_names, limit)
    n_errors = int(np.sum(np.asarray(y_true) != np.asarray(y_pred)))
    cols = max(1, min(columns, len(rows)))
    lines = max(1, math.ceil(len(rows) / cols))
    cell_w = thumb + 2 * GRID_PAD
    cell_h = thumb + 3 * GRID_PAD + 3 * GRID_LINE
    canvas = Image.new("RGB", (cols * cell_w, GRID_HEADER + lines * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=11)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()

    def text(xy: tuple[int, int], value: str, width: int, fill: str = "black") -> None:
        if draw.textlength(value, font=font) > width:  # cut to fit, marked by an ellipsis
            while len(value) > 1 and draw.textlength(value + "…", font=font) > width:
                value = value[:-1]
            value += "…"
        draw.text(xy, value, fill=fill, font=font)

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
        source = Path(row["path"]) if root is None else Path(root) / row["path"]
        try:
            with Image.open(source) as img:
                small = ImageOps.contain(img.convert("RGB"), (thumb, thumb))
        except (OSError, ValueError):
            small = Image.new("RGB", (thumb, thumb), (160, 160, 160))
        canvas.paste(small, (x + (thumb - small.width) // 2, y + (thumb - small.height) // 2))
        y += thumb + GRID_PAD
        text((x, y), f"true: {row['true']}", thumb)
        text((x, y + GRID_LINE), f"pred: {row['predicted']}", thumb, fill="crimson")
        text((x, y + 2 * GRID_LINE), f"score {row['score']:.3f}", thumb)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png, format="PNG")
    return rows


def write_csv(rows: Sequence[dict[str, Any]], fields: Sequence[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def write_json(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def predict(model, paths: Sequence[str], image_size: int, batch_size: int) -> np.ndarray:
    """Class probabilities of the images at ``paths``, streamed batch by batch."""
    from imgclf.pipeline.train import make_dataset

    if not paths:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    ds = make_dataset(paths, np.zeros(len(paths), np.int32), image_size, batch_size, cache=False)
    return model.predict(ds.map(lambda x, _y: x), verbose=0)


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


def headline(metrics: dict[str, Any], op: dict[str, Any]) -> dict[str, Any]:
    """``test.json``, the columns of ``dvc exp show``: accuracy and macro F1 at the operating
    threshold, ROC and PR AUC, and the positive class's test recall and precision there.
    Per-class and argmax figures go to ``report/test_detail.json``."""
    return {k: metrics[k] for k in HEADLINE} | {
        "recall": op["test"]["recall"],
        "precision": op["test"]["precision"],
    }


def report_text(
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


@stage_main
def main() -> None:
    params = load_params()
    setup_logging(params.base.log_level)
    cfg = params.report
    if not PATHS.model_metadata.is_file():
        raise StageError(f"no candidate in {PATHS.candidate}: run the train stage first")
    meta = json.loads(PATHS.model_metadata.read_text(encoding="utf-8"))
    class_names, size = list(meta["class_names"]), int(meta["image_size"])
    positive, why = choose_positive(cfg.positive_class, meta["class_counts"])
    log.info("operating threshold for %r: %s", positive, why)
    pos = class_names.index(positive)

    import_tensorflow()
    import keras

    from imgclf import tracking
    from imgclf.pipeline.train import encode_labels, read_list

    run = tracking.resume(tracking.read_run_link(), params.mlflow.experiment)
    with tracking.taken(run):
        model = keras.models.load_model(PATHS.model_file)
        root = str(PATHS.root)
        sides = {}
        for side in ("val", "test"):
            paths, labels = read_list(PATHS.split_list(side))
            probs = predict(model, [f"{root}/{p}" for p in paths], size, cfg.batch_size)
            sides[side] = (paths, encode_labels(labels, class_names), probs)
        test_paths, y_test, p_test = sides["test"]
        _, y_val, p_val = sides["val"]
        if len(y_test) == 0:
            raise StageError("the test list is empty: rerun the split stage")

        op = operating_point(
            p_val[:, pos], y_val == pos, p_test[:, pos], y_test == pos, positive,
            cfg.target_recall, cfg.recall_confidence,
        )  # fmt: skip
        at_threshold = f"at the operating threshold ({positive} >= {op['threshold']:.4f})"
        decisions = {
            at_threshold: decide(p_test, pos, op["threshold"]),
            "argmax (top class)": p_test.argmax(axis=1),
        }
        y_thr, y_arg = decisions.values()
        metrics = compute_metrics(y_test, y_thr, p_test, class_names, positive)
        argmax = compute_metrics(y_test, y_arg, p_test, class_names, positive)
        metrics["argmax"] = {k: argmax[k] for k in ("accuracy", "macro_f1", "per_class")}
        out = PATHS.metrics
        write_json(headline(metrics, op), PATHS.test_metrics)
        write_json({"positive_class": positive, **metrics}, out / "report" / "test_detail.json")
        write_json(op, PATHS.operating_point)
        text = report_text(y_test, decisions, class_names)
        (out / "report").mkdir(parents=True, exist_ok=True)
        (out / "report" / "classification_report.txt").write_text(text, encoding="utf-8")
        labels = list(range(len(class_names)))
        plot_confusion(
            {rule: confusion_matrix(y_test, y, labels=labels) for rule, y in decisions.items()},
            class_names,
            out / "report" / "confusion_matrix.png",
        )
        write_csv(
            [
                {
                    "path": p, "actual": class_names[a], "predicted": class_names[b],
                    "argmax": class_names[c], "score": round(float(s), 6),
                }
                for p, a, b, c, s in zip(
                    test_paths, y_test, y_thr, y_arg, p_test[:, pos], strict=True
                )
            ],
            ("path", "actual", "predicted", "argmax", "score"),
            out / "plots" / "predictions.csv",
        )  # fmt: skip
        roc, pr = curve_rows(y_test == pos, p_test[:, pos], positive)
        write_csv(roc, ROC_FIELDS, out / "plots" / "roc.csv")
        write_csv(pr, PR_FIELDS, out / "plots" / "pr.csv")
        curves = out / "report" / "curves.png"
        plot_curves(y_test, p_test, class_names, positive, op["threshold"], curves)
        mistakes = mistakes_grid(
            test_paths, y_test, y_thr, p_test, class_names, out / "report" / "mistakes.png",
            root=PATHS.root,
        )  # fmt: skip
        write_csv(mistakes, MISTAKE_FIELDS, out / "report" / "mistakes.csv")
        log.info(
            "test accuracy %.4f %s (argmax %.4f), macro F1 %.4f\n%s",
            metrics["accuracy"], at_threshold, argmax["accuracy"], metrics["macro_f1"], text,
        )  # fmt: skip
        (log.info if op["bound_met"] else log.warning)(
            "operating point: %s", describe_operating_point(op)
        )

        run.log_params(tracking.flatten({"report": cfg.model_dump()}))
        run.log_metrics(
            mlflow_metrics(metrics)
            | {"op_threshold": op["threshold"]}
            | mlflow_metrics({s: op[s] for s in ("val", "test", "expected")}, "op_")
        )
        run.set_tags({"positive_class": positive})
        for path in (
            out / "report" / "confusion_matrix.png",
            curves,
            out / "report" / "mistakes.png",
            out / "report" / "mistakes.csv",
            out / "report" / "test_detail.json",
            out / "report" / "classification_report.txt",
            PATHS.test_metrics,
            PATHS.operating_point,
            out / "plots" / "predictions.csv",
            out / "plots" / "roc.csv",
            out / "plots" / "pr.csv",
        ):
            run.log_artifact(path, "report")
    tracking.check_required(run, params.mlflow.required)


if __name__ == "__main__":
    sys.exit(main())
