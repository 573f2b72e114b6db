"""promote's decisions: the absolute gate explaining itself, and the champion race."""

from __future__ import annotations

import pytest

from imgclf.bundle import Bundle
from imgclf.params import Promote
from imgclf.pipeline.champion import (
    BELOW_GATE,
    PROMOTED,
    REGRESSION,
    Champion,
    decide,
    not_comparable,
    recorded_value,
)
from imgclf.pipeline.promote import gate_verdict

pytestmark = pytest.mark.unit

# a 10-class candidate whose threshold rests on 35 val positives (not vouched for)
OP = {
    "positive_class": "shirt",
    "threshold": 0.00041234,
    "target_recall": 0.95,
    "min_precision": 0.5,
    "recall_confidence": 0.9,
    "bound_met": False,
    "raw_positives_short": 95,
    "val": {"n_positive": 35},
}
ACCURACY = Promote(metric="accuracy", min_value=0.8, max_regression=0.0)


def test_a_passing_gate_says_so():
    got = gate_verdict({"accuracy": 0.85}, ACCURACY, {"accuracy": 0.86}, OP)
    assert got == {
        "metric": "accuracy",
        "min_value": 0.8,
        "value": 0.85,
        "passed": True,
        "reason": "test accuracy 0.85 >= promote.min_value",
    }


def test_a_gate_the_threshold_fails_names_both_figures_and_what_to_change():
    got = gate_verdict({"accuracy": 0.165327}, ACCURACY, {"accuracy": 0.8}, OP)
    assert got["passed"] is False
    assert got["reason"] == (
        "QUALITY GATE FAILED: test accuracy 0.165327 at the operating threshold (shirt >= "
        "0.00041234, chosen on 35 val positives, TARGET NOT VOUCHED FOR) < promote.min_value "
        "0.8; by argmax it is 0.8 >= 0.8: the threshold, not the model, fails the gate: lower "
        "report.target_recall (now 0.95) or raise report.min_precision (now 0.5), or add "
        "about 95 shirt images"
    )


def test_a_vouched_threshold_that_fails_the_gate_points_at_the_target():
    vouched = OP | {"bound_met": True, "raw_positives_short": None, "threshold": 0.0921576}
    vouched["val"] = {"n_positive": 108}
    got = gate_verdict({"accuracy": 0.764331}, ACCURACY, {"accuracy": 0.842887}, vouched)
    assert got["reason"] == (
        "QUALITY GATE FAILED: test accuracy 0.764331 at the operating threshold (shirt >= "
        "0.0921576, chosen on 108 val positives) < promote.min_value 0.8; by argmax it is "
        "0.842887 >= 0.8: the threshold, not the model, fails the gate: lower "
        "report.target_recall (now 0.95) or report.recall_confidence (now 0.9)"
    )


def test_a_gate_the_model_fails_says_so():
    vouched = OP | {"bound_met": True, "raw_positives_short": None, "threshold": 0.5}
    got = gate_verdict({"accuracy": 0.6}, ACCURACY, {"accuracy": 0.62}, vouched)
    assert got["reason"] == (
        "QUALITY GATE FAILED: test accuracy 0.6 at the operating threshold (shirt >= 0.5, "
        "chosen on 35 val positives) < promote.min_value 0.8; by argmax it is 0.62: the model "
        "falls short: more or cleaner data (see the audit), more training (train.*), or "
        "promote.min_value below 0.8 if 0.6 will do"
    )
    auc = Promote(metric="roc_auc", min_value=0.9, max_regression=0.0)
    got = gate_verdict({"roc_auc": None}, auc, {}, vouched)
    assert got["passed"] is False
    assert "roc_auc does not depend on the threshold: the model falls short" in got["reason"]


GATE = {"metric": "accuracy", "min_value": 0.8, "value": 0.9376, "passed": True, "reason": "ok"}


def test_a_worse_candidate_does_not_replace_the_champion():
    champion = Champion(0.9927, "recorded on the same test images", "abc")
    got = decide(GATE, champion, 0.0)
    assert got == {
        "promoted": False,
        "verdict": REGRESSION,
        "metric": "accuracy",
        "candidate": 0.9376,
        "champion": 0.9927,
        "min_value": 0.8,
        "max_regression": 0.0,
        "reason": (
            "REGRESSION: test accuracy 0.9376 vs the served bundle's 0.9927 (recorded on the "
            "same test images, bundle md5 abc): worse by 0.0551 > promote.max_regression 0; "
            "to promote it anyway rerun with -S promote.max_regression=0.056"
        ),
    }
    assert decide(GATE, champion, 0.056)["verdict"] == PROMOTED
    assert decide(GATE, champion, 0.055)["verdict"] == REGRESSION


def test_an_equal_or_better_candidate_replaces_it_and_an_incomparable_one_meets_the_gate_alone():
    assert decide(GATE, Champion(0.9376, "re-scored", "abc"), 0.0)["promoted"] is True
    alone = decide(GATE, Champion(None, "the classes differ (...)", "abc"), 0.0)
    assert alone["promoted"] is True and alone["champion"] is None
    assert alone["reason"] == (
        "passed the gate; not compared with the served bundle: the classes differ (...)"
    )
    failed = GATE | {"passed": False, "reason": "QUALITY GATE FAILED: ..."}
    got = decide(failed, Champion(0.5, "recorded", "abc"), 1.0)
    assert (got["promoted"], got["verdict"], got["reason"]) == (
        False,
        BELOW_GATE,
        "QUALITY GATE FAILED: ...",
    )


def bundle(**info) -> Bundle:
    base = {"class_names": ["a", "b"], "image_size": 32, "data_hash": "d1"}
    return Bundle(base | info, b"", "md5")


def test_what_can_be_compared():
    meta = {"class_names": ["a", "b"], "image_size": 32, "data_hash": "d1"}
    assert not_comparable(meta, bundle()) is None
    assert not_comparable(meta, bundle(class_names=["a", "c"])) == (
        "the classes differ (served ['a', 'c'], candidate ['a', 'b'])"
    )
    assert not_comparable(meta, bundle(image_size=64)) == (
        "the input size differs (served 64 px, candidate 32 px)"
    )
    recorded = bundle(metrics={"accuracy": 0.97})
    assert recorded_value(recorded, meta, "accuracy") == 0.97
    assert recorded_value(recorded, meta | {"data_hash": "d2"}, "accuracy") is None
    assert recorded_value(recorded, meta, "roc_auc") is None
