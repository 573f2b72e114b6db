"""The operating threshold: which score of the positive class serving flags at.

Chosen on val by :func:`confident_threshold`: the highest threshold whose one-sided
Clopper-Pearson lower confidence bound of val recall reaches the target recall, so that
the recall holds on unseen data with that confidence (too few val positives: the lowest val
positive score, ``bound_met: false``). :func:`operating_point` is what
``metrics/operating_point.json`` holds; :func:`decisions_at_threshold` decides as serving
does. Pure numpy/scipy, no I/O.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import beta as beta_dist

# the rule behind a threshold (``rule`` in operating_point.json)
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


def decisions_at_threshold(probs: np.ndarray, positive: int, threshold: float) -> np.ndarray:
    """Class index per row as serving decides: ``positive`` when its score reaches the
    threshold, else the most probable other class."""
    others = probs.copy()
    others[:, positive] = -1.0
    return np.where(probs[:, positive] >= threshold, positive, others.argmax(axis=1))
