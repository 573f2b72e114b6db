"""``python serve/score.py`` as a backlog job runs it: killed part-way (SIGKILL to the main
process, or SIGTERM to all of its processes), then rerun to completion, the output holds
exactly one row per file."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from imgclf.testing.bundles import make_bundle
from imgclf.testing.project import SOURCE as ROOT

N_FILES = 300
DEADLINE = 60.0  # seconds for the first rows to appear


@pytest.fixture(scope="module")
def backlog(tmp_path_factory) -> tuple[Path, Path, set[str]]:
    """A bundle and a tree of 300 distinct 640x480 JPEGs in nested folders (each takes a
    few milliseconds to decode, so the run lasts long enough to be killed part-way)."""
    tmp = tmp_path_factory.mktemp("score-cli")
    tree = tmp / "uploads"
    x, y = np.meshgrid(np.arange(640), np.arange(480))
    for i in range(N_FILES):
        pixels = np.stack([(x + i) % 256, (y * 3 + i) % 256, (x ^ y) % (i + 7) * 9], axis=-1)
        path = tree / f"forum{i % 3}" / f"thread{i % 7}" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=85)
    files = {p.relative_to(tree).as_posix() for p in tree.rglob("*.jpg")}
    assert len(files) == N_FILES
    return make_bundle(tmp / "models"), tree, files


def command(model: Path, tree: Path, out: Path) -> list[str]:
    return [sys.executable, "serve/score.py", "--source", str(tree), "--output", str(out),
            "--model", str(model), "--batch-size", "8", "--workers", "2"]  # fmt: skip


def start(model: Path, tree: Path, out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with log.open("w") as fh:
        return subprocess.Popen(
            command(model, tree, out), cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def rows_written(out: Path) -> int:
    try:
        return out.read_bytes().count(b"\n") - 1  # less the header
    except FileNotFoundError:
        return -1


def wait_for_rows(proc: subprocess.Popen, out: Path, log: Path, at_least: int) -> int:
    """Poll the output until it holds ``at_least`` rows (bounded by :data:`DEADLINE`)."""
    deadline = time.monotonic() + DEADLINE
    while rows_written(out) < at_least:
        assert proc.poll() is None, f"exited {proc.returncode}: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no rows after {DEADLINE:.0f} s"
        time.sleep(0.01)
    return rows_written(out)


def living(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that are not zombies (an orphan's exit is reaped by
    whoever adopts it, which some containers never do)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
    return found


def group_ends(pgid: int, within: float = 15.0) -> bool:
    """True once no process of the group is left (its fork server and workers exit when
    the main process is gone), False after ``within`` seconds."""
    deadline = time.monotonic() + within
    while living(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def paths_in(out: Path) -> list[str]:
    with out.open(newline="", encoding="utf-8") as fh:
        return [row["path"] for row in csv.DictReader(fh)]


def errors_in(out: Path) -> list[dict[str, str]]:
    with out.open(newline="", encoding="utf-8") as fh:
        return [row for row in csv.DictReader(fh) if row["error"]]


def rerun(model: Path, tree: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        command(model, tree, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_killed_run_resumes_to_exactly_one_row_per_file(backlog, tmp_path):
    model, tree, files = backlog
    out, log = tmp_path / "scores.csv", tmp_path / "first.log"
    proc = start(model, tree, out, log)
    try:
        wait_for_rows(proc, out, log, at_least=16)
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer does
        proc.wait(timeout=30)
        assert group_ends(proc.pid), "workers outlived the killed run"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    before = len(paths_in(out))
    assert 16 <= before < N_FILES, "the first run was not killed part-way"
    done = rerun(model, tree, out)
    assert done.returncode == 0, done.stderr[-2000:]
    paths = paths_in(out)
    assert len(paths) == len(set(paths)) == N_FILES  # no file twice
    assert set(paths) == files
    assert f"{N_FILES - before} scored, 0 errors, {before} skipped as already done" in done.stderr


def test_sigterm_stops_after_a_batch_and_the_rerun_completes(backlog, tmp_path):
    model, tree, files = backlog
    out, log = tmp_path / "scores.csv", tmp_path / "first.log"
    proc = start(model, tree, out, log)
    try:
        wait_for_rows(proc, out, log, at_least=8)
        os.killpg(proc.pid, signal.SIGTERM)  # as a service manager stops a job: all of it
        assert proc.wait(timeout=15) == 128 + signal.SIGTERM  # promptly, at any moment
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert out.read_bytes().endswith(b"\n")  # whole batches only: nothing to repair
    assert "stopped by SIGTERM: rerun the command to resume" in log.read_text()
    before = len(paths_in(out))
    assert before < N_FILES, "the run finished before SIGTERM"
    assert errors_in(out) == []  # no file failed by the workers' own stop
    done = rerun(model, tree, out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cut off a torn last line" not in done.stderr
    paths = paths_in(out)
    assert len(paths) == N_FILES and set(paths) == files
