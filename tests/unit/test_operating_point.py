"""The operating threshold: Clopper-Pearson bounds and thresholds against hand-worked values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgclf.pipeline.operating_point import (
    BOUND_RULE,
    FALLBACK_RULE,
    confident_threshold,
    decisions_at_threshold,
    describe_operating_point,
    operating_point,
    positives_needed,
    precision_recall_at,
    recall_lower_bound,
    threshold_for_recall,
)
from tests.unit.report_cases import SCORES10, TEST_SCORES, TEST_TRUTH, TRUTH10


def test_threshold_for_recall_constructed_case():
    scores = np.array([0.9, 0.85, 0.8, 0.4, 0.3, 0.2])
    positive = np.array([1, 0, 1, 1, 1, 0], bool)  # positives: .9 .8 .4 .3
    assert threshold_for_recall(scores, positive, 0.5) == pytest.approx(0.8)
    assert threshold_for_recall(scores, positive, 0.75) == pytest.approx(0.4)
    assert threshold_for_recall(scores, positive, 0.76) == pytest.approx(0.3)
    assert threshold_for_recall(scores, positive, 1.0) == pytest.approx(0.3)
    at = precision_recall_at(scores, positive, 0.8)
    assert at == {"precision": pytest.approx(2 / 3, abs=1e-6), "recall": 0.5}
    with pytest.raises(ValueError, match="target_recall"):
        threshold_for_recall(scores, positive, 0.0)
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_recall(scores, np.zeros(6, bool), 0.9)


def test_recall_lower_bound_closed_forms():
    # all hits: Beta(n, 1) has cdf x**n, so the bound is (1 - c) ** (1 / n)
    assert recall_lower_bound(10, 10, 0.9) == pytest.approx(0.1**0.1, abs=1e-12)
    assert round(recall_lower_bound(10, 10, 0.9), 6) == 0.794328  # as the JSON shows it
    assert recall_lower_bound(3, 3, 0.9) == pytest.approx(0.1 ** (1 / 3), abs=1e-12)
    # 9 of 10: Beta(9, 2) has cdf 10 x**9 - 9 x**10, which is 1 - c at the bound
    lb = recall_lower_bound(9, 10, 0.9)
    assert 10 * lb**9 - 9 * lb**10 == pytest.approx(0.1, abs=1e-9)
    assert round(lb, 6) == 0.663152
    # one hit: Beta(1, n) has cdf 1 - (1 - x)**n
    assert recall_lower_bound(1, 4, 0.9) == pytest.approx(1 - 0.9**0.25, abs=1e-12)
    assert recall_lower_bound(0, 5, 0.9) == 0.0
    with pytest.raises(ValueError, match="recall_confidence"):
        recall_lower_bound(3, 3, 1.0)
    with pytest.raises(ValueError, match="hits"):
        recall_lower_bound(4, 3, 0.9)


def test_positives_needed():
    # (1 - c) ** (1 / n) >= target  <=>  n >= log(1 - c) / log(target)
    assert positives_needed(0.95, 0.9) == 45  # 44.89
    assert positives_needed(0.6, 0.9) == 5  # 4.51
    assert positives_needed(1.0, 0.9) is None


@pytest.mark.parametrize(
    ("target", "threshold", "hits", "bound", "met"),
    [
        # bounds at 90%: 8 of 10 -> 0.550396, 9 -> 0.663152, 10 -> 0.794328
        (0.55, 0.6, 8, 0.550396, True),
        (0.6, 0.55, 9, 0.663152, True),  # the old rule (point estimate) says 0.70
        (0.67, 0.5, 10, 0.794328, True),
        (0.7943, 0.5, 10, 0.794328, True),
        (0.8, 0.5, 10, 0.794328, False),  # not reachable with 10 positives: fall back
    ],
)
def test_confident_threshold_constructed_case(target, threshold, hits, bound, met):
    got = confident_threshold(SCORES10, TRUTH10, target, 0.9)
    assert got == {
        "threshold": threshold,
        "rule": BOUND_RULE if met else FALLBACK_RULE,
        "bound_met": met,
        "hits": hits,
        "n_positive": 10,
        "recall": hits / 10,
        "recall_lower_bound": bound,
    }


def test_the_old_rule_stops_at_the_point_estimate():
    assert threshold_for_recall(SCORES10, TRUTH10, 0.6) == pytest.approx(0.7)
    assert confident_threshold(SCORES10, TRUTH10, 0.6, 0.5)["threshold"] == 0.65


def test_confident_threshold_with_tied_scores_counts_every_tie():
    scores = np.array([0.9, 0.8, 0.7, 0.7, 0.75, 0.1])
    truth = np.array([1, 1, 1, 1, 0, 0], bool)
    # 3 of 4 gives 0.320461 >= 0.3 (2 of 4: 0.142559); at 0.7 all 4 positives are flagged
    got = confident_threshold(scores, truth, 0.3, 0.9)
    assert got["threshold"] == 0.7 and got["hits"] == 4 and got["recall"] == 1.0
    assert got["recall_lower_bound"] == 0.562341  # 0.1 ** (1 / 4), rounded


def test_too_few_positives_fall_back_to_the_lowest_positive_and_say_so():
    scores, truth = np.array([0.9, 0.4, 0.6, 0.3, 0.5]), np.array([1, 0, 1, 0, 1], bool)
    got = confident_threshold(scores, truth, 0.95, 0.9)
    assert got == {
        "threshold": 0.5,
        "rule": FALLBACK_RULE,
        "bound_met": False,
        "hits": 3,
        "n_positive": 3,
        "recall": 1.0,
        "recall_lower_bound": 0.464159,  # 0.1 ** (1 / 3)
    }
    with pytest.raises(ValueError, match="no positive"):
        confident_threshold(scores, np.zeros(5, bool), 0.9, 0.9)
    with pytest.raises(ValueError, match="target_recall"):
        confident_threshold(scores, truth, 0.0, 0.9)
    with pytest.raises(ValueError, match="recall_confidence"):
        confident_threshold(scores, truth, 0.9, 0.0)


def test_the_threshold_is_rounded_down_so_it_still_flags_its_positive():
    # round(0.123456786, 8) is 0.12345679, above the score: serving would miss it
    got = confident_threshold(np.array([0.123456786, 0.1]), np.array([1, 0], bool), 0.5, 0.5)
    assert got["threshold"] == 0.12345678 and got["hits"] == 1
    f32 = np.array([0.3, 0.2], np.float32)  # float32 0.3 is 0.300000011920...
    got = confident_threshold(f32, np.array([1, 0], bool), 0.5, 0.5)
    assert got["threshold"] == 0.30000001 and (f32 >= got["threshold"]).tolist() == [True, False]


def test_operating_point_is_chosen_on_val_and_measured_on_test():
    test_s, test_p = np.array(TEST_SCORES), np.array(TEST_TRUTH, bool)
    op = operating_point(SCORES10, TRUTH10, test_s, test_p, "sensitive", 0.6, 0.9)
    assert op == {
        "positive_class": "sensitive",
        "target_recall": 0.6,
        "recall_confidence": 0.9,
        "threshold": 0.55,
        "rule": BOUND_RULE,
        "bound_met": True,
        # val: flagged the 9 positives >= .55 and the negatives .88, .62
        "val": {
            "precision": 0.818182,
            "recall": 0.9,
            "recall_lower_bound": 0.663152,
            "n_positive": 10,
        },
        # test: flagged .95 .58 (positives) and .9 .6 (negatives)
        "test": {"precision": 0.5, "recall": 0.5, "n_positive": 4},
        "expected": {"recall": 0.663152, "precision": 0.818182},
    }
    assert json.loads(json.dumps(op)) == op  # plain JSON types only
    line = describe_operating_point(op)
    assert line.startswith("sensitive >= 0.55: val recall 0.9 (90% lower bound 0.663152 >= ")
    assert "test recall 0.5 precision 0.5 (4 positives)" in line
    few = operating_point(SCORES10, TRUTH10, test_s, test_p, "sensitive", 0.95, 0.9)
    assert few["bound_met"] is False and few["threshold"] == 0.5
    assert few["expected"]["recall"] == 0.794328 and few["test"]["recall"] == 0.75
    assert "TARGET NOT VOUCHED FOR: only 10 val positives" in describe_operating_point(few)
    assert "needs 45" in describe_operating_point(few)


def test_decisions_at_the_threshold_and_otherwise_the_best_other_class():
    p = np.array([[0.5, 0.2, 0.3], [0.6, 0.1, 0.3], [0.1, 0.15, 0.75]])
    assert decisions_at_threshold(p, 1, 0.15).tolist() == [1, 0, 1]
    assert decisions_at_threshold(p, 2, 0.5).tolist() == [0, 0, 2]
