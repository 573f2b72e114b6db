"""Machine facts and the ``RESULTS.md`` text."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from benchmarks.common import PROJECT, Result, fmt

PACKAGES = (
    "tensorflow-cpu",
    "keras",
    "tf-keras",
    "pillow",
    "numpy",
    "dvc",
    "mlflow",
    "fastapi",
    "uvicorn",
    "hypercorn",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev or 'unknown'}{' (with uncommitted changes)' if dirty else ''}"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_facts() -> dict[str, str]:
    """What the numbers were measured on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return {
        "CPU": _cpu_model(),
        "cores (usable)": f"{os.cpu_count()} ({usable})",
        "memory": _memory_gib(),
        "GPU": "none used (tensorflow-cpu)",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "load average at start (1, 5, 15 min)": load,
        "project revision": _git_revision(),
        "packages": ", ".join(f"{p} {_version(p)}" for p in PACKAGES),
    }


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (one line, no bare pipes)."""
    return " ".join(text.split()).replace("|", "\\|")


def _mark(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "-"}[met]


def render(
    results: list[Result], facts: dict[str, str], corpus_line: str, seconds: float, quick: bool
) -> str:
    """The whole RESULTS.md."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mode = " (--quick smoke run: tiny sizes, 1 repetition; not real figures)" if quick else ""
    out = [
        "# Benchmark results",
        "",
        f"Written by `python -m benchmarks` on {now} in {seconds:.0f} s{mode}. Each figure is "
        "the median of the repetitions of one run; ours and the baseline were measured in "
        "the same run, so their ratio is what to compare across machines.",
        "",
        "## Machine",
        "",
        "| fact | value |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in facts.items()),
        f"| load average at end | {', '.join(f'{x:.2f}' for x in os.getloadavg())} |",
        "",
        f"Corpus: {corpus_line}.",
        "",
        "## Summary",
        "",
        "| benchmark | figure | ours | baseline | ratio | goal | goal met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r.error:
            out.append(f"| {r.title} | not run: {_cell(r.error)} | | | | | |")
        for f in r.figures:
            out.append(
                f"| {r.title} | {f.name} | {fmt(f.ours)} {f.unit} | {fmt(f.baseline)} "
                f"{f.unit if f.baseline is not None else ''} | {fmt(f.ratio)} | {f.goal} | "
                f"{_mark(f.met)} |"
            )
    for i, r in enumerate(results, 1):
        out += ["", f"## {i}. {r.title}", ""]
        if r.error:
            out += [f"not run: {_cell(r.error)}", ""]
        if r.figures:
            out += [
                "| figure | ours | baseline | ratio | goal | met | samples (ours; baseline) |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            for f in r.figures:
                samples = "; ".join(
                    ", ".join(fmt(x) for x in s) or "-"
                    for s in (f.ours_samples, f.baseline_samples)
                )
                out.append(
                    f"| {f.name}{f' ({f.unit})' if f.unit else ''} | {fmt(f.ours)} | "
                    f"{fmt(f.baseline)} | "
                    f"{fmt(f.ratio)} | {f.goal} | {_mark(f.met)} | {samples} |"
                )
            out.append("")
            baselines = dict.fromkeys(f.baseline_name for f in r.figures if f.baseline_name)
            out += [f"- Baseline: {b}." for b in baselines]
        out += [f"- {n}" for n in r.notes]
        out.append(f"\n_Took {r.seconds:.0f} s._")
    return "\n".join(out).rstrip() + "\n"
