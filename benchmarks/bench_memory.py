"""Benchmark 6: peak memory of ``preprocess`` and ``report`` as the image count grows.

Both stages run as their real entry points (``python -m imgclf.pipeline.preprocess``,
``python -m imgclf.pipeline.report``) in a copy of the project whose ``data/raw`` holds N files of
the small-file tree (N = 1,000, 5,000, 20,000). ``report`` gets an untrained candidate of
the project's architecture (``models/candidate/``, as ``train`` writes it) and split lists
putting 10% of the processed images in val and the rest in test. Streaming means the peak
at the largest N stays near the peak at the smallest: the goal used is at most 25% growth
for 20x the images.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.artifact import write_candidate
from benchmarks.common import Figure, Result, Settings, copy_project, env, temp_dir
from benchmarks.corpus import Corpus
from imgclf.files import file_sha256, write_csv, write_json

log = logging.getLogger(__name__)

GROWTH_GOAL = 1.25
MB = 2**20


def subset(tree: Path, n: int, dest: Path) -> int:
    """Hard-link ``n`` files spread evenly over ``tree`` (every subclass) into ``dest``."""
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    step = max(1, len(files) // n)
    chosen = files[::step][:n]
    for path in chosen:
        target = dest / path.relative_to(tree)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    return len(chosen)


def _hwm_kib(pid: int) -> int:
    """Peak resident size since exec (``VmHWM``) of one process, KiB (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _sample(proc: psutil.Process) -> tuple[int, int]:
    """(largest VmHWM in KiB, summed PSS in bytes) over a process and its descendants."""
    hwm, pss = 0, 0
    for p in [proc, *proc.children(recursive=True)]:
        hwm = max(hwm, _hwm_kib(p.pid))
        with contextlib.suppress(psutil.Error, AttributeError):
            pss += p.memory_full_info().pss
    return hwm, pss


def peak_memory(cwd: Path, *args: str, extra_env: dict[str, str] | None = None) -> dict:
    """Run a command; peak RSS of its largest process (``VmHWM``, which the kernel keeps
    per process since exec, read every 50 ms) and the peak of the whole tree's summed PSS
    at those samples, in MiB. (``ru_maxrss`` is not used: after fork + exec it still counts
    the parent's pre-exec pages.)"""
    start = time.perf_counter()
    with (cwd / "bench-child.log").open("w") as log_file:
        proc = subprocess.Popen(
            list(args), cwd=cwd, env=env(extra_env), stdout=log_file, stderr=subprocess.STDOUT
        )
        ps = psutil.Process(proc.pid)
        peak_hwm = peak_pss = 0
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            with contextlib.suppress(psutil.Error):
                hwm, pss = _sample(ps)
                peak_hwm, peak_pss = max(peak_hwm, hwm), max(peak_pss, pss)
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (cwd / "bench-child.log").read_text(errors="replace")[-1500:]
        raise RuntimeError(f"{' '.join(args[:4])} exited {proc.returncode}: {tail}")
    return {
        "rss": peak_hwm / 1024,
        "pss": peak_pss / MB,
        "seconds": time.perf_counter() - start,
    }


def write_split(root: Path, val_share: float = 0.1) -> int:
    """Split lists over every processed image: ``val_share`` of them in val, rest in test."""
    images = sorted((root / "data" / "processed").glob("*/*.jpg"))
    every = max(1, round(1 / val_share))
    sides: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    for i, path in enumerate(images):
        sides["val" if i % every == 0 else "test"].append(path)
    sides["train"] = sides["val"][:2]
    for side, paths in sides.items():
        rows = [(p.relative_to(root).as_posix(), p.parent.name, file_sha256(p)) for p in paths]
        write_csv(root / "data" / "split" / f"{side}.csv", ("path", "label", "sha256"), rows)
    return len(images)


def bench(settings: Settings, corpus: Corpus) -> Result:
    """Peak memory of preprocess and report at growing image counts."""
    result = Result("memory", "Memory")
    total = sum(1 for p in corpus.tree.rglob("*") if p.is_file())
    sizes = [n for n in ((50, total) if settings.quick else (1000, 5000, 20_000)) if n <= total]
    peaks: dict[str, dict[int, dict]] = {"preprocess": {}, "report": {}}
    errors: dict[str, str] = {}
    with temp_dir(settings, "mem") as tmp:
        candidate = None
        for n in sizes:
            root = copy_project(tmp / f"n{n}")
            count = subset(corpus.tree, n, root / "data" / "raw")
            peaks["preprocess"][count] = peak_memory(
                root, sys.executable, "-m", "imgclf.pipeline.preprocess"
            )
            log.info("memory: preprocess at %d images: %s", count, peaks["preprocess"][count])
            if "report" in errors:
                continue
            try:
                if candidate is None:
                    candidate = write_candidate(tmp / "candidate", 32)
                shutil.copytree(candidate, root / "models" / "candidate")
                write_split(root)
                # the run train would have created: report resumes it (a fresh one here)
                link = {"run_id": None, "run_name": f"bench-memory-{n}", "data_hash": ""}
                write_json(root / ".mlflow-run.json", link | {"git_commit": None})
                peaks["report"][count] = peak_memory(
                    root,
                    sys.executable,
                    "-m",
                    "imgclf.pipeline.report",
                    extra_env={"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"},
                )
                log.info("memory: report at %d images: %s", count, peaks["report"][count])
            except Exception as exc:  # report depends on code still being written
                log.exception("memory: report failed")
                errors["report"] = f"{type(exc).__name__}: {exc}"[:400]
    for stage, by_n in peaks.items():
        if len(by_n) < 2:
            if stage in errors:
                result.notes.append(f"`{stage}` not run: {errors[stage]}")
            continue
        small, large = min(by_n), max(by_n)
        result.figures.append(
            Figure(
                f"`{stage}` peak RSS at {large:,} vs {small:,} images",
                "MiB",
                by_n[large]["rss"],
                by_n[small]["rss"],
                f"the same stage at {small:,} images",
                goal_op="<=",
                goal_value=GROWTH_GOAL,
                ours_samples=[by_n[large]["rss"]],
                baseline_samples=[by_n[small]["rss"]],
            )
        )
        growth = (by_n[large]["rss"] - by_n[small]["rss"]) * 1024 / (large - small)
        result.notes.append(
            f"`{stage}`: peak grows {growth:.2f} KiB per extra image "
            f"({by_n[small]['rss']:.0f} MiB at {small:,}, {by_n[large]['rss']:.0f} MiB at "
            f"{large:,}): the order of per-file records (paths, hashes, outcomes), far below one "
            "decoded photo (a 224 px RGB image is 147 KiB)."
        )
        result.notes.append(
            f"`{stage}` by image count (largest process peak RSS / whole tree peak PSS / "
            "wall time): "
            + "; ".join(
                f"{n:,}: {v['rss']:.0f} / {v['pss']:.0f} MiB / {v['seconds']:.1f} s"
                for n, v in sorted(by_n.items())
            )
        )
    result.notes.append(
        "Peak RSS is the largest `VmHWM` (the kernel's per-process high-water mark) of the "
        "stage or any of its workers; PSS sums the whole process tree with shared pages "
        "split, sampled every 50 ms. The model is untrained (memory, not accuracy)."
    )
    return result
