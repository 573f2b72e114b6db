"""The operating threshold: which score of the positive class serving flags at.

Chosen on val by :func:`confident_threshold`: the highest threshold whose one-sided
Clopper-Pearson lower confidence bound of val recall reaches the target recall, so that
the recall holds on unseen data with that confidence. With too few val positives to vouch
for the target (``bound_met: false``), the plain empirical rule (val recall reaches the
target), raised where needed until val precision reaches ``min_precision``, so that a
handful of low-scoring positives never drags the threshold down to flag nearly everything.
:func:`operating_point` is what ``metrics/operating_point.json`` holds;
:func:`decisions_at_threshold` decides as serving does. Pure numpy/scipy, no I/O.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import beta as beta_dist

# the rule behind a threshold (``rule`` in operating_point.json)
BOUND_RULE = "clopper_pearson_lower_bound"
EMPIRICAL_RULE = "empirical_recall"  # not vouched for: val recall reaches the target
PRECISION_RULE = "precision_floor"  # not vouched for: raised until val precision >= the floor


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
    scores: np.ndarray,
    is_positive: np.ndarray,
    target_recall: float,
    confidence: float,
    min_precision: float = 0.0,
) -> dict[str, Any]:
    """The threshold a moderator can rely on: the highest ``t`` such that the one-sided
    Clopper-Pearson lower bound (at ``confidence``) of the recall of ``score >= t`` on
    these (val) scores is at least ``target_recall``.

    Why it holds on unseen data: with ``t`` the k-th highest of the n positive scores, the
    true recall at ``t`` is Beta(k, n - k + 1) distributed whatever the model's score
    distribution, and k depends on n, the target and the confidence only. So the true
    recall reaches the bound, hence the target, with probability ``confidence``.

    ``t`` is a positive's score rounded down to 8 decimals (what ``operating_point.json``
    stores). When no threshold can give that bound (fewer positives than
    :func:`positives_needed`), ``bound_met`` is False and ``t`` comes from
    :func:`unvouched_threshold` (``rule`` says which of its two rules); no error.

    Returns ``threshold``, ``rule``, ``bound_met``, ``hits`` (positives flagged),
    ``n_positive``, ``recall``, ``recall_lower_bound`` (of the returned threshold) and
    ``positives_short`` (more val positives that would vouch for the target: 0 when met,
    None when no number can, as for a target of 1). A score array without a positive is a
    ``ValueError``.
    """
    _check_target(target_recall)
    _check_confidence(confidence)
    values = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(is_positive, dtype=bool)
    pos = np.sort(values[truth])[::-1]
    n = len(pos)
    if n == 0:
        raise ValueError("no positive example to choose a threshold from")
    k = np.arange(1, n + 1)
    bounds = beta_dist.ppf(1.0 - confidence, k, n - k + 1)  # increasing in k
    reaching = np.flatnonzero(bounds >= target_recall - 1e-12)
    met = reaching.size > 0
    if met:
        t, rule = _floor8(float(pos[reaching[0]])), BOUND_RULE
    else:
        t, rule = unvouched_threshold(values, truth, target_recall, min_precision)
    hits = int(np.sum(pos >= t))  # ties and rounding down can only add positives
    need = positives_needed(target_recall, confidence)
    return {
        "threshold": t,
        "rule": rule,
        "bound_met": bool(met),
        "hits": hits,
        "n_positive": n,
        "recall": round(hits / n, 6),
        "recall_lower_bound": round(recall_lower_bound(hits, n, confidence), 6),
        "positives_short": 0 if met else (None if need is None else max(need - n, 1)),
    }


def unvouched_threshold(
    scores: np.ndarray, is_positive: np.ndarray, target_recall: float, min_precision: float
) -> tuple[float, str]:
    """The threshold when the target cannot be vouched for, and its rule: the plain
    empirical rule (the highest positive score whose val recall reaches the target,
    :data:`EMPIRICAL_RULE`) when val precision there is at least ``min_precision``; else
    the lowest positive score above it whose val precision reaches ``min_precision`` (the
    most recall the floor allows, :data:`PRECISION_RULE`), or, when none does, the one of
    highest precision. Candidates are the positives' scores rounded down to 8 decimals."""
    values = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(is_positive, dtype=bool)
    pos = np.sort(values[truth])[::-1]
    need = max(1, math.ceil(target_recall * len(pos) - 1e-9))
    candidates = np.array([_floor8(float(v)) for v in pos[:need]])
    flagged = (values[None, :] >= candidates[:, None]).sum(axis=1)
    hits = (values[truth][None, :] >= candidates[:, None]).sum(axis=1)
    precision = hits / flagged
    if precision[-1] >= min_precision:
        return float(candidates[-1]), EMPIRICAL_RULE
    ok = np.flatnonzero(precision >= min_precision)
    best = ok[-1] if ok.size else int(np.flatnonzero(precision == precision.max())[-1])
    return float(candidates[best]), PRECISION_RULE


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
    min_precision: float = 0.0,
) -> dict[str, Any]:
    """``operating_point.json``: the threshold of :func:`confident_threshold` chosen on val,
    what it promises (``expected``: recall = the val recall's lower bound, precision = the
    val precision) and what it gives on val and test."""
    choice = confident_threshold(
        val_scores, val_positive, target_recall, recall_confidence, min_precision
    )
    t = choice["threshold"]
    val = precision_recall_at(val_scores, val_positive, t)
    test = precision_recall_at(test_scores, test_positive, t)
    return {
        "positive_class": positive,
        "target_recall": float(target_recall),
        "recall_confidence": float(recall_confidence),
        "min_precision": float(min_precision),
        "threshold": t,
        "rule": choice["rule"],
        "bound_met": choice["bound_met"],
        "positives_short": choice["positives_short"],
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
        rule = f"{not_vouched(op)}; {UNVOUCHED_WORDS[op['rule']].format(**op)}"
        rule += f", val recall {val['recall']} ({conf} lower bound {val['recall_lower_bound']})"
    return (
        f"{head}{rule}; expected precision {op['expected']['precision']}; test recall "
        f"{test['recall']} precision {test['precision']} ({test['n_positive']} positives)"
    )


def _raw_words(op: dict[str, Any]) -> str:
    raw = op.get("raw_positives_short")
    return "" if raw is None else f"; about {raw} more {op['positive_class']} images in data/raw"


UNVOUCHED_WORDS = {
    EMPIRICAL_RULE: "threshold = where val recall reaches {target_recall:g}",
    PRECISION_RULE: (
        "threshold raised until val precision reaches report.min_precision {min_precision:g} "
        "(val recall {target_recall:g} would flag too many others)"
    ),
}


def not_vouched(op: dict[str, Any]) -> str:
    """``TARGET NOT VOUCHED FOR: ...``: how many val positives there are and how many more
    would vouch for the target recall."""
    conf = f"{100 * op['recall_confidence']:g}%"
    n, short = op["val"]["n_positive"], op["positives_short"]
    more = (
        "no number of positives can vouch for recall 1"
        if short is None
        else f"{short} more val positives ({n + short}{_raw_words(op)}) would vouch for it"
    )
    return (
        f"TARGET NOT VOUCHED FOR: recall {op['target_recall']:g} at {conf} confidence rests on "
        f"only {n} val positives; {more}"
    )


# an accuracy cost of the threshold against argmax above this is said to be the target's
NOTABLE_COST = 0.05


def threshold_cost(
    accuracy: float, argmax_accuracy: float, recall: float | None, argmax_recall: float | None
) -> dict[str, Any]:
    """What deciding at the threshold costs against argmax on test (``cost`` in
    ``operating_point.json``): both accuracies, their difference, the positive class's
    recall by both rules, and ``why`` in words: a cost above :data:`NOTABLE_COST` is what
    the recall target demands when it buys recall, else a sign that val misled the choice."""
    delta = round(accuracy - argmax_accuracy, 6)
    if delta >= -NOTABLE_COST:
        why = f"within {NOTABLE_COST:g} of argmax"
    elif recall is not None and argmax_recall is not None and recall > argmax_recall:
        why = (
            f"the recall target demands it: it raises the positive class's test recall from "
            f"{argmax_recall} (argmax) to {recall}"
        )
    else:
        why = (
            f"val and test disagree: the threshold chosen on val gives no more test recall "
            f"than argmax ({recall} vs {argmax_recall}); more val images would steady it"
        )
    return {
        "accuracy": accuracy,
        "argmax_accuracy": argmax_accuracy,
        "delta": delta,
        "recall": recall,
        "argmax_recall": argmax_recall,
        "why": why,
    }


def describe_cost(cost: dict[str, Any]) -> str:
    """One line: test accuracy at the threshold against argmax, and why."""
    return (
        f"test accuracy at the threshold {cost['accuracy']} vs argmax "
        f"{cost['argmax_accuracy']} ({cost['delta']:+.4f}): {cost['why']}"
    )


def decisions_at_threshold(probs: np.ndarray, positive: int, threshold: float) -> np.ndarray:
    """Class index per row as serving decides: ``positive`` when its score reaches the
    threshold, else the most probable other class."""
    others = probs.copy()
    others[:, positive] = -1.0
    return np.where(probs[:, positive] >= threshold, positive, others.argmax(axis=1))
