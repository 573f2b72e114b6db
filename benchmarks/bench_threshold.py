"""Benchmark 7: does the operating threshold keep its recall promise on unseen data?

``report`` chooses the positive class's score threshold on the val split and serving
decides with it. The old rule took the *highest* threshold whose val recall reaches
``report.target_recall``: a point estimate, so test recall lands on the target's edge and
below it about half the time. The new rule
(:func:`imgclf.pipeline.operating_point.confident_threshold`) takes the highest threshold whose
one-sided Clopper-Pearson lower bound (at ``report.recall_confidence``) of val recall
reaches the target.

Each draw is a fresh stratified split of scikit-learn's handwritten digits (the bundled
sample's task: digits 7-9 are ``sensitive``, the positive class; the pipeline's
``split.test_size`` and ``split.val_size``), an RBF SVM trained on its train side, and both
rules applied to its val scores, then measured on its test side. The SVM stands in for the
CNN (seconds instead of hours for hundreds of draws; its top-class test recall, about 0.97,
is close to the pipeline's); both rules only rank scores, so its uncalibrated margins act as
probabilities would. The figure that matters is how often test recall reaches the target.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from benchmarks.common import PROJECT, Figure, Result, Settings
from benchmarks.corpus import Corpus
from imgclf.params import load_params
from imgclf.pipeline.operating_point import (
    confident_threshold,
    positives_needed,
    precision_recall_at,
    threshold_for_recall,
)

log = logging.getLogger(__name__)

DRAWS, QUICK_DRAWS = 200, 5
# "meets the target on test for most seeds": most taken as 4 in 5
SHARE_GOAL = 0.8
SWEEP_CONFIDENCE = (0.5, 0.8, 0.9, 0.95)
OLD = "old rule: highest val threshold whose val recall reaches the target"


@dataclass(frozen=True)
class Draw:
    """One split's scores of the positive class (val and test) and their truth."""

    val_scores: np.ndarray
    val_positive: np.ndarray
    test_scores: np.ndarray
    test_positive: np.ndarray
    argmax_threshold: float = 0.0  # the SVM's decision boundary (its "top class")


def draws(n: int, test_size: float, val_size: float) -> list[Draw]:
    """``n`` splits (seeds 0..n-1) of the digits, each with its own model's scores."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    x, digit = load_digits(return_X_y=True)
    x, positive = x / 16.0, digit >= 7
    out = []
    for seed in range(n):
        idx = np.arange(len(x))
        rest, test = train_test_split(idx, test_size=test_size, random_state=seed, stratify=digit)
        train, val = train_test_split(
            rest, test_size=val_size, random_state=seed, stratify=digit[rest]
        )
        model = SVC(C=10.0, gamma="scale").fit(x[train], positive[train])
        out.append(
            Draw(
                model.decision_function(x[val]),
                positive[val],
                model.decision_function(x[test]),
                positive[test],
            )
        )
    return out


@dataclass(frozen=True)
class Outcome:
    """One rule over all draws: test recall / precision per draw."""

    recall: list[float]
    precision: list[float]
    bound_met: int = 0  # draws whose val bound reached the target (new rule)

    def met_share(self, target: float) -> float:
        return sum(r >= target - 1e-12 for r in self.recall) / len(self.recall)

    @property
    def mean_recall(self) -> float:
        return float(np.mean(self.recall))

    @property
    def mean_precision(self) -> float:
        return float(np.nanmean(self.precision))

    @property
    def recall_p05(self) -> float:
        return float(np.quantile(self.recall, 0.05))


def measure(samples: list[Draw], rule: str, target: float, confidence: float) -> Outcome:
    """Test recall and precision of ``rule`` (old, new or argmax) on every draw."""
    recall, precision, met = [], [], 0
    for d in samples:
        if rule == "old":
            t = threshold_for_recall(d.val_scores, d.val_positive, target)
        elif rule == "new":
            choice = confident_threshold(d.val_scores, d.val_positive, target, confidence)
            t, met = choice["threshold"], met + choice["bound_met"]
        else:
            t = d.argmax_threshold
        at = precision_recall_at(d.test_scores, d.test_positive, t)
        recall.append(float(at["recall"]))
        precision.append(math.nan if at["precision"] is None else float(at["precision"]))
    return Outcome(recall, precision, met)


def _span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _line(o: Outcome, target: float) -> str:
    return (
        f"met on {100 * o.met_share(target):.0f}%, mean test recall {o.mean_recall:.4f} "
        f"(5th percentile {o.recall_p05:.4f}), mean precision {o.mean_precision:.4f}"
    )


def bench(settings: Settings, corpus: Corpus | None) -> Result:
    params = load_params(PROJECT / "params.yaml")
    target, conf = params.report.target_recall, params.report.recall_confidence
    test_size, val_size = params.split.test_size, params.split.val_size
    n = QUICK_DRAWS if settings.quick else DRAWS
    log.info("%d draws: target recall %g at confidence %g", n, target, conf)
    samples = draws(n, test_size, val_size)
    old, new, argmax = (measure(samples, r, target, conf) for r in ("old", "new", "argmax"))
    name = f"{n} splits"
    figures = [
        Figure(
            f"share of {name} with test recall ≥ target_recall {target:g}",
            "",
            new.met_share(target),
            old.met_share(target),
            OLD,
            goal_on="ours",
            goal_value=SHARE_GOAL,
        ),
        Figure(f"mean test recall, {name}", "", new.mean_recall, old.mean_recall, OLD),
        Figure(f"5th percentile of test recall, {name}", "", new.recall_p05, old.recall_p05, OLD),
        Figure(f"mean test precision, {name}", "", new.mean_precision, old.mean_precision, OLD),
    ]
    val_pos = [int(d.val_positive.sum()) for d in samples]
    test_pos = [int(d.test_positive.sum()) for d in samples]
    notes = [
        f"Ours: report.recall_confidence {conf:g} (params.yaml), the highest val threshold whose "
        f"one-sided Clopper-Pearson lower bound of val recall reaches {target:g}; its val "
        f"bound was reachable on {new.bound_met} of {n} splits (else: the lowest val "
        f"positive score). A {conf:g} bound of {target:g} needs "
        f"{positives_needed(target, conf)} val positives; the splits had "
        f"{_span(val_pos)} (test {_span(test_pos)}).",
        f"Setup: scikit-learn digits, 7-9 positive; split test_size {test_size:g}, val_size "
        f"{val_size:g} (params.yaml), stratified by digit, seed = draw number; RBF SVC (C 10) "
        "trained per split on its train side.",
        f"Old rule: {_line(old, target)}.",
        f"New rule: {_line(new, target)}.",
        f"For reference, the SVM's own decision (margin ≥ 0, the 'argmax'): "
        f"{_line(argmax, target)}.",
    ]
    if not settings.quick:  # how the rule trades precision for confidence, and val size
        bigger = min(0.5, 2 * val_size)
        for size, sample in ((val_size, samples), (bigger, draws(n, test_size, bigger))):
            positives = int(np.median([d.val_positive.sum() for d in sample]))
            where = f"Sweep, val_size {size:g} (median {positives} val positives)"
            notes.append(
                f"{where}, old rule: {_line(measure(sample, 'old', target, conf), target)}."
            )
            for c in SWEEP_CONFIDENCE:
                o = measure(sample, "new", target, c)
                notes.append(
                    f"{where}, new rule at recall_confidence {c:g}: {_line(o, target)}; "
                    f"bound reachable on {o.bound_met} of {n}."
                )
    return Result("threshold", "Operating threshold", figures=figures, notes=notes)
