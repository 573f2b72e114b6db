"""The operating threshold: Clopper-Pearson bounds and thresholds against hand-worked values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgclf.pipeline.operating_point import (
    BOUND_RULE,
    EMPIRICAL_RULE,
    PRECISION_RULE,
    confident_threshold,
    decisions_at_threshold,
    describe_cost,
    describe_operating_point,
    operating_point,
    positives_needed,
    precision_recall_at,
    recall_lower_bound,
    threshold_cost,
    threshold_for_recall,
    unvouched_threshold,
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
        # not reachable with 10 positives (0.8 needs 11): the empirical rule, 8 of 10
        (0.8, 0.6, 8, 0.550396, False),
    ],
)
def test_confident_threshold_constructed_case(target, threshold, hits, bound, met):
    got = confident_threshold(SCORES10, TRUTH10, target, 0.9)
    assert got == {
        "threshold": threshold,
        "rule": BOUND_RULE if met else EMPIRICAL_RULE,
        "bound_met": met,
        "hits": hits,
        "n_positive": 10,
        "recall": hits / 10,
        "recall_lower_bound": bound,
        "positives_short": 0 if met else 1,
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


def test_too_few_positives_take_the_empirical_rule_and_say_how_many_more_would_vouch():
    scores, truth = np.array([0.9, 0.4, 0.6, 0.3, 0.5]), np.array([1, 0, 1, 0, 1], bool)
    got = confident_threshold(scores, truth, 0.95, 0.9, min_precision=0.5)
    assert got == {
        "threshold": 0.5,  # recall 0.95 of 3 needs all 3; precision there 3/3
        "rule": EMPIRICAL_RULE,
        "bound_met": False,
        "hits": 3,
        "n_positive": 3,
        "recall": 1.0,
        "recall_lower_bound": 0.464159,  # 0.1 ** (1 / 3)
        "positives_short": 42,  # 45 needed
    }
    assert confident_threshold(scores, truth, 1.0, 0.9)["positives_short"] is None
    with pytest.raises(ValueError, match="no positive"):
        confident_threshold(scores, np.zeros(5, bool), 0.9, 0.9)
    with pytest.raises(ValueError, match="target_recall"):
        confident_threshold(scores, truth, 0.0, 0.9)
    with pytest.raises(ValueError, match="recall_confidence"):
        confident_threshold(scores, truth, 0.9, 0.0)


# 4 val positives, one scored far below the negatives (the 10-class case that once set
# the threshold at 0.0004 and flagged nearly every image)
LOW_POS = np.array([0.9, 0.8, 0.7, 0.05, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
LOW_TRUTH = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)


@pytest.mark.parametrize(
    ("min_precision", "threshold", "rule"),
    [
        (0.5, 0.7, PRECISION_RULE),  # at 0.05 precision is 4/10: raised to 0.7 (3/3)
        (0.4, 0.05, EMPIRICAL_RULE),  # 4/10 reaches a floor of 0.4
        (0.0, 0.05, EMPIRICAL_RULE),
    ],
)
def test_a_precision_floor_keeps_one_low_positive_from_flagging_everything(
    min_precision, threshold, rule
):
    assert unvouched_threshold(LOW_POS, LOW_TRUTH, 0.95, min_precision) == (threshold, rule)
    got = confident_threshold(LOW_POS, LOW_TRUTH, 0.95, 0.9, min_precision)
    assert (got["threshold"], got["rule"], got["bound_met"]) == (threshold, rule, False)


def test_a_floor_no_threshold_reaches_takes_the_most_precise_one():
    scores = np.array([0.9, 0.8, 0.95, 0.85])
    truth = np.array([1, 1, 0, 0], bool)
    # precision at 0.9: 1/2, at 0.8: 2/4; equal: the lower (more recall) is kept
    assert unvouched_threshold(scores, truth, 0.95, 0.9) == (0.8, PRECISION_RULE)
    # one more negative between them: 1/2 at 0.9 beats 2/5 at 0.8
    more = np.array([0.9, 0.8, 0.95, 0.85, 0.84])
    assert unvouched_threshold(more, np.append(truth, False), 0.95, 0.9) == (0.9, PRECISION_RULE)


def test_the_cost_against_argmax_says_when_the_target_demands_it():
    small = threshold_cost(0.79, 0.8, 0.9, 0.7)
    assert small == {
        "accuracy": 0.79,
        "argmax_accuracy": 0.8,
        "delta": -0.01,
        "recall": 0.9,
        "argmax_recall": 0.7,
        "why": "within 0.05 of argmax",
    }
    big = threshold_cost(0.7, 0.8, 0.97, 0.6)
    assert big["delta"] == -0.1
    assert big["why"] == (
        "the recall target demands it: it raises the positive class's test recall from 0.6 "
        "(argmax) to 0.97"
    )
    worse = threshold_cost(0.7, 0.8, 0.5, 0.75)["why"]
    assert worse == (
        "val and test disagree: the threshold chosen on val gives no more test recall than "
        "argmax (0.5 vs 0.75); more val images would steady it"
    )
    assert describe_cost(big).startswith(
        "test accuracy at the threshold 0.7 vs argmax 0.8 (-0.1000)"
    )


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
        "min_precision": 0.0,
        "threshold": 0.55,
        "rule": BOUND_RULE,
        "bound_met": True,
        "positives_short": 0,
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
    few = operating_point(SCORES10, TRUTH10, test_s, test_p, "sensitive", 0.95, 0.9, 0.5)
    # 10 of 10 needed: 0.5, where val precision is 10/12
    assert few["bound_met"] is False and few["threshold"] == 0.5 and few["rule"] == EMPIRICAL_RULE
    assert few["expected"]["recall"] == 0.794328 and few["test"]["recall"] == 0.75
    assert few["positives_short"] == 35
    assert describe_operating_point(few | {"raw_positives_short": 300}) == (
        "sensitive >= 0.5: TARGET NOT VOUCHED FOR: recall 0.95 at 90% confidence rests on only "
        "10 val positives; 35 more val positives (45; about 300 more sensitive images in "
        "data/raw) would vouch for it; threshold = where val recall reaches 0.95, val recall "
        "1.0 (90% lower bound 0.794328); expected precision 0.833333; test recall 0.75 "
        "precision 0.6 (4 positives)"
    )


def test_decisions_at_the_threshold_and_otherwise_the_best_other_class():
    p = np.array([[0.5, 0.2, 0.3], [0.6, 0.1, 0.3], [0.1, 0.15, 0.75]])
    assert decisions_at_threshold(p, 1, 0.15).tolist() == [1, 0, 1]
    assert decisions_at_threshold(p, 2, 0.5).tolist() == [0, 0, 2]
