"""The runtimes benchmark's figures and notes on made-up measurements (no model, no server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import bench_runtimes as br
from benchmarks.bench_serving import Round
from benchmarks.common import Result, Settings
from benchmarks.report import render
from imgclf.testing.images import preprocess_options


def _measured(key: str, fast_rps: float, fast_p50: float) -> br.Measured:
    model = br.Model(key, f"{key} model", 224, lambda: None)
    exports = {
        name: {"path": f"{name}.bin", "bytes": 1_000_000, "max_abs_diff": 0.0, "passed": True}
        for name in ("tflite", "saved_model", "onnx")
    }
    exports["tflite_dynamic"] = {
        "path": "d.bin", "bytes": 300_000, "max_abs_diff": 0.01, "decision_agreement": 1.0
    }  # fmt: skip
    art = br.Exported(model, Path("b.zip"), 1_200_000, 30.0, exports, preprocess_options(size=224))
    raw = {rt: br.Calls([10.0, 12.0, 14.0], [12.0]) for rt in (*br.RAW, br.DIAGNOSTIC)}
    raw["keras"] = br.Calls([25.0, 26.0, 27.0], [26.0])
    batched = {rt: br.Batched(9.0, 9.0) for rt in raw} | {"keras": br.Batched(15.0, 15.0)}

    def served(rt: str, rps: float, p50: float) -> br.Served:
        rounds = [Round(rps, p50, p50 * 1.2)]
        return br.Served(rt, rounds, rounds, {"name": rt}, 10.0, 2.0, 3.0, 1.0, "x.py 50%")

    servers = {"keras": served("keras", 50.0, 28.0)}
    servers |= {rt: served(rt, fast_rps, fast_p50) for rt in br.FAST}
    auto = {"name": "tflite", "why": "fastest batch-1 call: tflite 8 ms"}
    return br.Measured(art, raw, batched, 1.5, servers, auto)


def test_goals_apply_to_mobilenet_only():
    small = br.figures(_measured("cnn", 60.0, 13.0))
    assert all(f.goal_value is None for f in small)
    goals = [f for f in br.figures(_measured(br.GOAL_MODEL, 160.0, 16.0)) if f.goal_value]
    throughput = [f for f in goals if "throughput" in f.name]
    overhead = [f for f in goals if "vs its raw" in f.name]
    assert len(throughput) == len(overhead) == len(br.FAST)
    assert all(f.met for f in throughput)  # 160 / 50 = 3.2x
    assert all(f.checked == pytest.approx(4.0) and f.met for f in overhead)  # 16 - 12 ms


def test_notes_say_which_goal_missed_and_render(tmp_path):
    measured = [_measured("cnn", 60.0, 13.0), _measured(br.GOAL_MODEL, 70.0, 20.0)]
    settings = Settings(quick=False, reps=3, corpus_dir=tmp_path, work_dir=tmp_path)
    notes = br.notes(measured, br.load_for(settings), settings)
    verdicts = [n for n in notes if n.startswith("Verdict")]
    assert len(verdicts) == len(br.FAST)
    assert all("throughput goal **missed**" in v and "1.4x" in v for v in verdicts)
    assert all("Latency goal **missed**" in v for v in verdicts)  # 20 - 12 = 8 ms
    assert any(n.startswith("Where tflite") for n in notes)
    assert sum(n.startswith("Latency floor") for n in notes) == 1
    result = Result("runtimes", "Inference runtimes", br.figures(measured[1]), notes)
    text = render([result], {"CPU": "test"}, "not built", 1.0, False)
    assert "## 1. Inference runtimes" in text and "**missed**" in text


def test_quick_load_is_lighter_and_cpu_seconds_reads_proc(tmp_path):
    quick = br.load_for(Settings(True, 1, tmp_path, tmp_path))
    full = br.load_for(Settings(False, 3, tmp_path, tmp_path))
    assert quick.rounds * quick.c1_requests < full.rounds * full.c1_requests
    assert quick.rounds * quick.c16_seconds < full.rounds * full.c16_seconds
    assert [m.key for m in br.models(quick=True)] == [br.models(quick=True)[0].key]
    assert br.GOAL_MODEL in [m.key for m in br.models(quick=False)]
    assert br.cpu_seconds(os.getpid()) > 0
