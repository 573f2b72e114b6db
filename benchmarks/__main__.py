"""Run the benchmarks and write ``benchmarks/RESULTS.md``.

Usage::

    python -m benchmarks                      # everything, ~8 min on 2 cores (fresh corpus)
    python -m benchmarks --quick --out /tmp/R.md --corpus /tmp/corpus   # smoke run
    python -m benchmarks --only preprocess,dvc
    python -m benchmarks --only threshold --out /tmp/R.md   # ~1 min, builds no corpus
    python -m benchmarks --only model --out /tmp/R.md       # ~5.5 min, builds no corpus
    python -m benchmarks --only abuse --out /tmp/R.md       # ~3 min, builds no corpus
    python -m benchmarks --only audit --out /tmp/R.md       # ~3.5 min, builds no corpus
    python -m benchmarks --only scoring --out /tmp/R.md     # ~3.5 min, builds no corpus
    python -m benchmarks --only runtimes --out /tmp/R.md    # ~3.5 min, builds no corpus
    python -m benchmarks --only remote --out /tmp/R.md      # ~3 min, needs Debian's sshd
    python -m benchmarks --only distributed --out /tmp/R.md # ~2 min, builds no corpus
    python -m benchmarks --only decisions --out /tmp/R.md   # ~6 min, needs dataset-fashion-mnist

Progress goes to stderr; each benchmark that fails is recorded as "not run: <reason>".
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import BENCH_DIR, Result, Settings
from benchmarks.corpus import FULL, QUICK, Corpus, corpus_facts, ensure_corpus
from benchmarks.report import machine_facts, render

log = logging.getLogger("benchmarks")

# (key, title, "module:function"), in the order of RESULTS.md.
BENCHMARKS = (
    ("preprocess", "Preprocess throughput", "benchmarks.bench_preprocess:bench"),
    ("incremental", "Incremental rerun", "benchmarks.bench_dvc:bench_incremental"),
    ("dvc", "DVC overhead", "benchmarks.bench_dvc:bench_overhead"),
    ("input", "Input pipeline", "benchmarks.bench_input:bench"),
    ("serving", "Serving", "benchmarks.bench_serving:bench"),
    ("memory", "Memory", "benchmarks.bench_memory:bench"),
    ("threshold", "Operating threshold", "benchmarks.bench_threshold:bench"),
    ("model", "Default model", "benchmarks.bench_model:bench"),
    ("abuse", "Serving under abuse", "benchmarks.bench_abuse:bench"),
    ("audit", "Data audit", "benchmarks.bench_audit:bench"),
    ("scoring", "Batch scoring", "benchmarks.bench_scoring:bench"),
    ("runtimes", "Inference runtimes", "benchmarks.bench_runtimes:bench"),
    ("remote", "Shared DVC remote (SSH)", "benchmarks.bench_remote:bench"),
    ("distributed", "Training at scale", "benchmarks.bench_distributed:bench"),
    ("decisions", "Decisions on real data", "benchmarks.bench_decisions:bench"),
)
# Benchmarks that do not read the photo corpus: run alone, they do not build it.
NO_CORPUS = frozenset(
    {"threshold", "model", "abuse", "audit", "scoring", "runtimes", "remote", "distributed"}
    | {"decisions"}
)
# Run order: everything that forks worker processes before anything loads TensorFlow
# into this process.
RUN_ORDER = (
    "preprocess",
    "incremental",
    "dvc",
    "memory",
    "serving",
    "abuse",
    "threshold",
    "input",
    "model",
    "audit",
    "scoring",
    "runtimes",
    "remote",
    "distributed",
    "decisions",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    ap.add_argument(
        "--only", default="", help="comma-separated: " + ",".join(k for k, *_ in BENCHMARKS)
    )
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md", help="results file")
    ap.add_argument("--corpus", type=Path, default=BENCH_DIR / ".corpus", help="corpus cache")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    ap.add_argument("--log-level", default="INFO")
    return ap.parse_args(argv)


def load(target: str) -> Callable[[Settings, Corpus | None], Result]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def run_one(key: str, title: str, target: str, settings: Settings, corpus: Corpus | None) -> Result:
    """Run one benchmark; any failure becomes a "not run" result, never an exception."""
    log.info("=== %s ===", title)
    start = time.perf_counter()
    try:
        result = load(target)(settings, corpus)
    except Exception as exc:  # a benchmark never kills the run
        log.exception("%s failed", title)
        result = Result(key, title, error=f"{type(exc).__name__}: {exc}".strip()[:500])
    result.key, result.title = key, title
    result.seconds = time.perf_counter() - start
    log.info("=== %s: %.1f s ===", title, result.seconds)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    known = [k for k, *_ in BENCHMARKS]
    only = [k.strip() for k in args.only.split(",") if k.strip()] or known
    unknown = sorted(set(only) - set(known))
    if unknown:
        log.error("unknown benchmark(s) %s; choose from %s", unknown, known)
        return 2
    start = time.perf_counter()
    facts = machine_facts()
    work = Path(tempfile.mkdtemp(prefix="imgclf-bench-"))
    settings = Settings(
        quick=args.quick,
        reps=args.reps or (1 if args.quick else 3),
        corpus_dir=args.corpus,
        work_dir=work,
    )
    try:
        corpus = (
            None
            if set(only) <= NO_CORPUS
            else ensure_corpus(args.corpus, QUICK if args.quick else FULL, settings.workers)
        )
        by_key = {k: (k, t, target) for k, t, target in BENCHMARKS}
        done: dict[str, Result] = {}
        for key in RUN_ORDER:
            if key in only:
                done[key] = run_one(*by_key[key], settings, corpus)
        results = [
            done.get(k) or Result(k, t, error="not selected (--only)") for k, t, _ in BENCHMARKS
        ]
        line = corpus_facts(corpus) if corpus else "not built (no selected benchmark reads it)"
        text = render(results, facts, line, time.perf_counter() - start, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    log.info("wrote %s in %.0f s", args.out, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
