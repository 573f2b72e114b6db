"""Shared pieces of the benchmarks: settings, results, timing, subprocesses, temp repos."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imgclf.testing.project import SOURCE as PROJECT
from imgclf.testing.project import copy_project, dvc, env, run
from imgclf.testing.server import stop_process

__all__ = ["PROJECT", "copy_project", "dvc", "env", "run", "stop_process"]

log = logging.getLogger("benchmarks")

BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Settings:
    """What one run of the harness does: sizes, repetitions and where things go."""

    quick: bool
    reps: int
    corpus_dir: Path
    work_dir: Path  # temp folder for repos and outputs, removed at the end

    @property
    def workers(self) -> int:
        return os.cpu_count() or 1


@dataclass
class Figure:
    """One measured figure: ours, the baseline's, their ratio and the goal on it.

    ``goal_on`` says what the goal constrains: ``ratio`` (ours / baseline), ``ours``
    (an absolute bound) or ``diff`` (ours - baseline).
    """

    name: str
    unit: str
    ours: float | None
    baseline: float | None
    baseline_name: str = ""
    goal_on: str = "ratio"
    goal_op: str = ">="
    goal_value: float | None = None
    ours_samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.baseline:
            return None
        return self.ours / self.baseline

    @property
    def checked(self) -> float | None:
        """The value the goal is about."""
        if self.goal_on == "ratio":
            return self.ratio
        if self.goal_on == "ours":
            return self.ours
        if self.ours is None or self.baseline is None:
            return None
        return self.ours - self.baseline

    @property
    def goal(self) -> str:
        if self.goal_value is None:
            return "-"
        what = {"ratio": "ratio", "ours": "ours", "diff": "ours - baseline"}[self.goal_on]
        unit = "" if self.goal_on == "ratio" or not self.unit else f" {self.unit}"
        op = {">=": "≥", "<=": "≤"}[self.goal_op]
        return f"{what} {op} {self.goal_value:g}{unit}"

    @property
    def met(self) -> bool | None:
        value = self.checked
        if self.goal_value is None or value is None:
            return None
        return value >= self.goal_value if self.goal_op == ">=" else value <= self.goal_value


@dataclass
class Result:
    """What one benchmark produced; ``error`` set means it did not run."""

    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Timing:
    """Median and samples of repeated measurements (seconds unless said otherwise)."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def repeat(
    fn: Callable[[], float | None], reps: int, setup: Callable[[], Any] | None = None
) -> Timing:
    """Run ``setup`` (untimed) then ``fn`` ``reps`` times; the sample is ``fn``'s return
    value when it returns a number (its own measurement), else its wall time."""
    samples = []
    for _ in range(max(1, reps)):
        if setup is not None:
            setup()
        start = time.perf_counter()
        value = fn()
        elapsed = time.perf_counter() - start
        samples.append(float(value) if value is not None else elapsed)
    return Timing(samples)


def interleaved(
    fns: dict[str, Callable[[], float | None]],
    reps: int,
    setup: Callable[[], Any] | None = None,
) -> dict[str, Timing]:
    """Like :func:`repeat` for several contenders, alternating them rep by rep so load
    from other processes on a shared machine hits each about equally."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, reps)):
        for name, fn in fns.items():
            samples[name] += repeat(fn, 1, setup).samples
    return {name: Timing(values) for name, values in samples.items()}


def rate(fn: Callable[[], int]) -> float:
    """Items per second of one call of ``fn``, which returns how many items it did."""
    start = time.perf_counter()
    done = fn()
    return done / (time.perf_counter() - start)


def timed_run(cwd: Path, *args: str, **kwargs: Any) -> float:
    """Wall time of one command."""
    start = time.perf_counter()
    run(cwd, *args, **kwargs)
    return time.perf_counter() - start


def hot_spots(
    cwd: Path, *args: str, pid: int | None = None, during: Callable[[], Any] | None = None
) -> str:
    """Profile with py-spy: a command (``args``), or process ``pid`` while ``during()``
    runs. Returns the top places its time goes, as text.

    Each sample is charged to its deepest frame outside the standard library (so
    ``os.stat`` called by DVC's tree builder counts for the builder). Returns a reason
    instead when py-spy is missing or not allowed to trace.
    """
    if shutil.which("py-spy", path=env()["PATH"]) is None:
        return "no profile (py-spy not installed)"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        cmd = ["py-spy", "record", "-s", "--full-filenames", "-r", "250", "-f", "raw"]
        cmd += ["-o", str(raw), *(["--pid", str(pid)] if pid else ["--", *args])]
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if pid and during is not None:
            time.sleep(0.5)  # let py-spy attach
            during()
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        _, err = proc.communicate(timeout=900)
        if not raw.is_file():
            return f"no profile (py-spy exited {proc.returncode}: {err.strip()[-200:]})"
        return _summarize(raw.read_text())


# Standard-library places where a thread only waits (a pool worker waiting for work, an
# event loop in select): samples ending there are idle, not where the time goes.
IDLE_FILES = (
    "threading.py",
    "selectors.py",
    "queue.py",
    "concurrent/futures/thread.py",
    "multiprocessing/connection.py",
    "multiprocessing/pool.py",
)


def _summarize(text: str, top: int = 6) -> str:
    charged: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if frames and not any(f"/{idle}:" in frames[-1] for idle in IDLE_FILES):
            place = _charge(frames)
            charged[place] = charged.get(place, 0) + int(count)
            total += int(count)
    ranked = sorted(charged.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{place} {100 * n / max(total, 1):.0f}%" for place, n in ranked)


def _charge(frames: list[str]) -> str:
    """``package/file.py`` of the deepest non-stdlib frame of a py-spy stack."""
    for frame in reversed(frames):
        _, _, where = frame.partition(" (")
        path = where.rsplit(":", 1)[0]
        for marker in ("site-packages/", f"{PROJECT.name}/"):
            if marker in path:
                return path.split(marker, 1)[1]
    return "stdlib:" + frames[-1].partition(" (")[0]


def link_tree(src: Path, dest: Path) -> int:
    """Hard-link (or copy across file systems) every file of ``src`` into ``dest``.

    Callers must replace files (write + rename), never write into them: a link shares
    the corpus' bytes.
    """
    count = 0
    for dirpath, _, filenames in os.walk(src):
        target = dest / Path(dirpath).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in filenames:
            try:
                os.link(Path(dirpath) / name, target / name)
            except OSError:
                shutil.copy2(Path(dirpath) / name, target / name)
            count += 1
    return count


def make_repo(dest: Path, raw: Path, params: dict[str, Any] | None = None) -> Path:
    """A git + DVC copy of the project in ``dest`` whose ``data/raw`` links ``raw``.

    Its ``dvc.yaml`` keeps only ``preprocess`` and ``split`` (what the data benchmarks
    time); ``params`` overrides sections of ``params.yaml`` key by key.
    """
    copy_project(dest, params)
    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text(encoding="utf-8"))
    pipeline["stages"] = {k: v for k, v in pipeline["stages"].items() if k in PIPELINE_STAGES}
    (dest / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False), encoding="utf-8")
    link_tree(raw, dest / "data" / "raw")
    run(dest, "git", "init", "-q", "-b", "main")
    dvc(dest, "init", "-q")
    run(dest, "git", "add", "-A")
    run(dest, "git", "commit", "-q", "-m", "bench")
    return dest


PIPELINE_STAGES = ("preprocess", "split")


@contextmanager
def temp_dir(settings: Settings, prefix: str) -> Iterator[Path]:
    """A fresh folder under the run's work dir, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=settings.work_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for the tables: ``n/a`` for None, ``digits`` significant figures."""
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"
