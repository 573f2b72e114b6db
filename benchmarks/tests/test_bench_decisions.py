"""The decisions benchmark's table on made-up outputs (no pipeline run): it reads the
operating point and the gate as the code wrote them before ``metrics/promote.json`` and
``positives_short`` existed, and after."""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench_decisions as bd
from imgclf.testing.realdata import Written

ERROR = (
    "error: QUALITY GATE FAILED: test accuracy 0.6 < promote.min_value 0.8; the candidate "
    "is neither promoted nor registered, and no bundle is promoted yet"
)


def outcome(op: dict, returncode: int, error: str | None, promote: dict | None) -> bd.Outcome:
    written = Written("ten_class", Path("raw"), {"shirt": 300, "coat": 300}, "shirt")
    return bd.Outcome(
        written, returncode, error, {"report", "promote"}, 61.2, op, {"accuracy": 0.6},
        {"argmax": {"accuracy": 0.84}}, promote, {"epochs_run": 19, "best_epoch": 13},
    )  # fmt: skip


OP = {
    "positive_class": "shirt",
    "threshold": 0.00237531,
    "rule": "lowest_positive_fallback",
    "bound_met": False,
    "val": {"n_positive": 36},
    "test": {"recall": 1.0, "precision": 0.23},
}


def test_old_outputs_the_gate_from_the_error_line():
    cells = dict(zip(bd.COLUMNS, bd.row(outcome(OP, 255, ERROR, None)), strict=True))
    assert cells["gate"] == "QUALITY GATE FAILED: test accuracy 0.6 < promote.min_value 0.8"
    assert cells["positives short"] == "-" and cells["val positives"] == "36"
    assert (cells["accuracy at threshold"], cells["argmax accuracy"]) == ("0.6", "0.84")
    assert cells["rule"] == "lowest_positive_fallback" and cells["bound met"] == "no"
    assert bd.outcome_promoted(outcome(OP, 0, None, None))


def test_new_outputs_the_gate_from_promote_json_and_positives_short():
    op = OP | {"rule": "precision_floor", "positives_short": 9}
    promote = {"promoted": False, "verdict": "failed", "reason": "accuracy 0.6 < 0.8"}
    o = outcome(op, 255, ERROR, promote)
    cells = dict(zip(bd.COLUMNS, bd.row(o), strict=True))
    assert cells["gate"] == "not promoted; failed; accuracy 0.6 < 0.8"
    assert cells["positives short"] == "9" and cells["rule"] == "precision_floor"
    assert not bd.outcome_promoted(o)
    assert "metrics/promote_detail.json" in bd.shape_note(o)
    table = bd.table([o, outcome(OP, 0, None, {"promoted": True})])
    assert len(table.splitlines()) == 4 and "| promoted |" in table
