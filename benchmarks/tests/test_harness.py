"""Tests of the benchmark harness (they live with it: the project's tests never import
the benchmarks). A tiny run writes a well-formed results file.

Benchmarks never fail the suite on their figures; this only checks that the harness runs
and reports (sections, numeric ratios, "not run" for what was not selected).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_abuse as ba
from benchmarks import bench_model as bm
from benchmarks.__main__ import BENCHMARKS
from benchmarks.common import Figure, Timing, repeat
from imgclf.imaging import DecodeOptions
from imgclf.testing import images as imagefactory

PROJECT = Path(__file__).resolve().parents[2]

SECTIONS = [title for _, title, _ in BENCHMARKS]


def test_figure_goal_checks():
    up = Figure("throughput", "images/s", 12.0, 2.0, goal_value=6.0)
    assert up.ratio == pytest.approx(6.0)
    assert up.met is True
    down = Figure("rerun", "s", 2.0, 10.0, goal_op="<=", goal_value=0.15)
    assert down.met is False
    diff = Figure("p50", "ms", 25.0, 18.0, goal_on="diff", goal_op="<=", goal_value=10.0)
    assert diff.checked == pytest.approx(7.0)
    assert diff.met is True
    assert Figure("x", "s", None, 1.0, goal_value=1.0).met is None


def test_repeat_takes_the_median_of_returned_values():
    values = iter([3.0, 1.0, 2.0])
    timing = repeat(lambda: next(values), 3)
    assert timing.samples == [3.0, 1.0, 2.0]
    assert timing.median == 2.0
    assert Timing([5.0]).median == 5.0


def test_benchmark_artifacts_follow_the_serving_and_stage_contracts(tmp_path):
    """What the serving benchmark gives the server is a loadable bundle; what the memory
    benchmark gives ``report`` is a candidate as ``train`` writes it."""
    from benchmarks.artifact import save_model, write_candidate, write_served_bundle
    from imgclf.serving.predictor import Predictor

    model = save_model(tmp_path / "model.keras", 32)
    bundle = write_served_bundle(tmp_path / "models" / "bundle.zip", 32, model_file=model)
    p = Predictor.load(bundle)
    assert p.class_names == ("safe", "sensitive")
    assert p.decode == imagefactory.preprocess_options(size=32)
    assert p.operating_point.positive_class == "sensitive"
    assert p.operating_point.threshold == 0.5
    assert p.version["gate"]["passed"] is True
    assert p.predict_arrays(p.decode_image(imagefactory.png(1))[None]).shape == (1, 2)

    candidate = write_candidate(tmp_path / "candidate", 32)
    assert sorted(x.name for x in candidate.iterdir()) == ["metadata.json", "model.keras"]
    meta = json.loads((candidate / "metadata.json").read_text(encoding="utf-8"))
    assert meta["class_names"] == ["safe", "sensitive"] and meta["image_size"] == 32
    assert meta["class_counts"] == {"safe": 1, "sensitive": 1}
    assert DecodeOptions.from_dict(meta["decode"]) == imagefactory.preprocess_options(size=32)
    for key in ("backbone", "params_digest", "data_hash", "run_name"):
        assert isinstance(meta[key], str) and meta[key], key


@pytest.mark.e2e
def test_quick_run_writes_results(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "preprocess,incremental,dvc",
            "--out",
            str(out),
            "--corpus",
            str(tmp_path / "corpus"),
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    for heading in ("## Machine", "## Summary"):
        assert heading in text
    for i, title in enumerate(SECTIONS, 1):
        assert f"## {i}. {title}" in text
    rows = {
        line.split("|")[1].strip(): line
        for line in text.splitlines()
        if line.startswith("| ") and "|" in line[2:]
    }
    assert "CPU" in rows and "cores (usable)" in rows
    summary = text.split("## Summary")[1].split("## 1.")[0].splitlines()
    ratios = {}
    for line in summary:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in SECTIONS and cells[4] not in ("", "n/a"):
            ratios[cells[0]] = float(cells[4].replace(",", ""))
    for title in ("Preprocess throughput", "Incremental rerun", "DVC overhead"):
        assert title in ratios, f"no numeric ratio for {title}:\n{text}"
        assert ratios[title] > 0
    assert re.search(r"\| Serving \| not run: not selected", text)


# -- the abuse benchmark's attackers (benchmarks/bench_abuse.py) ---------------------------


def test_abuse_attackers_count_what_the_server_closes_and_always_end(monkeypatch):
    """Against toy servers (HTTP: a 408 and close after 0.2 s; TCP: a greeting, then
    never a close), the attackers reconnect when closed, hold their sockets once stopped
    and close them all on release, within bounds."""
    monkeypatch.setattr(ba, "RAMP", 0.05)
    monkeypatch.setattr(ba, "RECONNECT_DELAY", 0.1)
    fleet = ba.Fleet(http_idle=3, http_headers=1, http_body=1, tcp_idle=2, tcp_line=1)
    assert ba.Fleet().scaled(0.1) == ba.Fleet(100, 10, 10, 20, 2)
    assert fleet.total == 8
    tcp_open: set[asyncio.StreamWriter] = set()

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.2)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
        writer.close()

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tcp_open.add(writer)
        writer.write(b"\n\nWelcome! Enter image path to scan\n# Path: ")
        while await reader.read(4096):
            pass
        tcp_open.discard(writer)
        writer.close()

    async def scenario() -> ba.Attack:
        http_server = await asyncio.start_server(http, ba.HOST, 0)
        tcp_server = await asyncio.start_server(tcp, ba.HOST, 0)
        ports = {
            "http": http_server.sockets[0].getsockname()[1],
            "tcp": tcp_server.sockets[0].getsockname()[1],
        }
        attack = ba.Attack(fleet, ports)
        try:
            attack.start()
            await asyncio.sleep(0.8)
            attack.stop()
            await asyncio.sleep(0.6)  # the HTTP server closes what it held; none reconnect
            assert attack.open == 3  # the TCP sessions, held
            assert len(tcp_open) == 3
        finally:
            attack.release()
            await asyncio.to_thread(attack.join, 5)
            await asyncio.sleep(0.1)
            http_server.close()
            tcp_server.close()
        return attack

    attack = asyncio.run(scenario())
    assert attack.error is None and attack.open == 0
    for kind in ("http_idle", "http_headers", "http_body"):
        t = attack.tallies[kind]
        assert t.opened > getattr(fleet, kind), kind  # closed, then reconnected
        assert t.closed_attacking + t.closed_holding == t.opened and t.released == 0
        assert set(t.last_words) == {"HTTP 408"}
    for kind in ("tcp_idle", "tcp_line"):
        t = attack.tallies[kind]
        assert t.opened == t.released == getattr(fleet, kind), kind
        assert t.closed_attacking == t.closed_holding == 0
    assert ba.percentile([3.0, 1.0, 2.0, 4.0], 0.5) in (2.0, 3.0)
    assert ba.percentile([], 0.99) is None
    assert ba._summary(b"# Path: \n> Error: idle timeout, closing\n") == (
        "> Error: idle timeout, closing"
    )


# -- the model benchmark's data set (benchmarks/bench_model.py) ----------------------------


def test_hard_digits_are_deterministic_the_same_at_every_size_and_split_by_source():
    counts = {"train": 30, "val": 10, "test": 12}
    first = bm.make_set((32, 96), counts)
    again = bm.make_set((32, 96), counts)
    for size in (32, 96):
        for side, n in counts.items():
            images, labels = first[size][side]
            assert images.shape == (n, size, size, 3) and images.dtype == np.uint8
            np.testing.assert_array_equal(images, again[size][side][0])
            np.testing.assert_array_equal(labels, first[32][side][1])  # same images
    # the 96 px image is the 32 px one drawn larger: downscaled, they agree closely
    big = first[96]["test"][0].astype(np.float32).reshape(12, 32, 3, 32, 3, 3).mean(axis=(2, 4))
    small = first[32]["test"][0].astype(np.float32)
    assert np.abs(big - small).mean() < 12  # noise and blur are drawn per size
    assert np.abs(big - small[::-1]).mean() > 20  # but far from other images
    _, y, _ = bm._sources()
    pools = bm.split_sources(y, bm.SEED)
    assert not set(pools["train"]) & set(pools["test"])
    assert not set(pools["train"]) & set(pools["val"])
    assert sum(len(v) for v in pools.values()) == len(y) == 1797
    assert {int(c) for c in y[pools["test"]]} == set(range(10))
