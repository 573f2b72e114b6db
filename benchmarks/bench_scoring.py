"""Benchmark 11: scoring a backlog (``python serve/score.py``) against the origin's one-shot
predictor, and its memory at 1,000 vs 20,000 files.

Images: a few hundred distinct synthetic 1080p camera JPEGs
(:func:`benchmarks.corpus.make_photo`, quality 92), hard-linked into nested trees of
1,000 and 20,000 files (``forumN/threadNN/NNNNN.jpg``), so the disk holds only the
distinct ones. Models: the tiny test classifier of :mod:`imgclf.testing.bundles` and,
outside quick runs, the project's MobileNetV2 (untrained weights: the same compute), both
at 224 px, as bundles (``promote``'s format).

- Ours: ``python serve/score.py --source <tree> --output scores.csv --model <bundle>
  --restart`` with its defaults (one decode worker per core, batches of 64, runtime from
  ``serve.yaml``); its rate is the one its last log line gives (files written per second of
  the walk, decode and inference, start-up excluded: the baseline's model load is not timed
  either).
- Baseline, in this process on the first files of the same tree: the origin's
  ``predict.py`` per image, ``keras.utils.load_img(path, target_size=(224, 224))`` (PIL: a
  full-size decode, then a resize), ``img_to_array``, one ``model.predict`` call, one
  process.
- Memory: the peak resident size of the scoring process (``VmHWM``) and the peak of the
  whole tree's summed PSS (fork server and decode workers included), sampled every 50 ms
  (:func:`benchmarks.bench_memory.peak_memory`), at 1,000 and at 20,000 files: streaming
  keeps it flat (goal: at most 25% growth for 20x the files).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.artifact import save_model, write_served_bundle
from benchmarks.bench_memory import GROWTH_GOAL, peak_memory
from benchmarks.common import PROJECT, Figure, Result, Settings, fmt, interleaved, rate, temp_dir
from benchmarks.corpus import Corpus, make_photo
from imgclf.bundle import write_bundle
from imgclf.testing.bundles import bundle_info, save_tiny_model

SIZE = 224
PHOTO = (1920, 1080)
SEED, SIGMA = 11, 4.5
DISTINCT, QUICK_DISTINCT = 240, 8
SMALL_TREE, LARGE_TREE = 1_000, 20_000
QUICK_TREES = (60, 300)
BASELINE_FILES, QUICK_BASELINE_FILES = 60, 6
MOBILENET_BASELINE_FILES = 30
SPEED_GOAL = 10.0
SCORE = PROJECT / "serve" / "score.py"
# the last log line of serve/score.py
DONE = re.compile(r"(\d+) scored, (\d+) errors, \d+ skipped .* in ([\d.]+) s \(([\d.]+) files/s\)")


@dataclass(frozen=True)
class Run:
    """One run of ``serve/score.py``: its own rate, wall time and peak memory (MiB)."""

    files: int
    rate: float
    wall: float
    rss: float
    pss: float


# ------------------------------------------------------------------ data and models
def _write_photo(args: tuple[int, str]) -> None:
    index, target = args
    make_photo(index, PHOTO, SEED, SIGMA).save(target, format="JPEG", quality=92)


def write_photos(folder: Path, n: int, workers: int) -> list[Path]:
    """``n`` distinct 1080p JPEGs in ``folder``, made in ``workers`` fresh processes
    (spawned: this process may already run TensorFlow)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:04d}.jpg" for i in range(n)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_write_photo, [(i, str(p)) for i, p in enumerate(paths)])
    return paths


def link_tree(photos: list[Path], dest: Path, n: int) -> list[Path]:
    """``n`` hard links to ``photos`` (cycled) in nested folders under ``dest``."""
    files = []
    for i in range(n):
        path = dest / f"forum{i % 10}" / f"thread{i // 10 % 50:02d}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(photos[i % len(photos)], path)
        files.append(path)
    return files


def tiny_bundle(folder: Path) -> tuple[Path, Path]:
    """The test classifier of :mod:`imgclf.testing.bundles` at 224 px: (bundle, model)."""
    model = save_tiny_model(folder / "model.keras", size=SIZE)
    bundle = folder / "bundle.zip"
    write_bundle(bundle, model, bundle_info(size=SIZE))
    return bundle, model


def mobilenet_bundle(folder: Path) -> tuple[Path, Path]:
    """The project's MobileNetV2 classifier at 224 px, untrained: (bundle, model)."""
    model = save_model(folder / "model.keras", SIZE, "mobilenetv2")
    return write_served_bundle(folder / "bundle.zip", SIZE, "mobilenetv2", model), model


# ------------------------------------------------------------------ the contenders
def score_run(work: Path, tree: Path, bundle: Path) -> Run:
    """``serve/score.py`` on ``tree`` from scratch, its memory sampled."""
    out = work / "scores.csv"
    peak = peak_memory(
        work, sys.executable, str(SCORE), "--source", str(tree), "--output", str(out),
        "--model", str(bundle), "--restart", "--log-level", "INFO",
    )  # fmt: skip
    said = (work / "bench-child.log").read_text(errors="replace")
    found = DONE.search(said)
    if found is None:
        raise RuntimeError(f"serve/score.py gave no final count: {said[-1500:]}")
    scored, errors, _, files_per_s = found.groups()
    if int(errors):
        raise RuntimeError(f"serve/score.py could not score {errors} file(s): {said[-1500:]}")
    return Run(int(scored), float(files_per_s), peak["seconds"], peak["rss"], peak["pss"])


def origin_predictor(model_file: Path) -> Any:
    """The model as the origin's ``predict.py`` held it: a Keras model, compiled once."""
    import keras

    return keras.models.load_model(model_file, compile=False)


def origin_predict(model: Any, paths: list[Path]) -> int:
    """The origin's ``predict.py`` per image: PIL load + resize, one ``predict`` each."""
    import keras
    import numpy as np

    for path in paths:
        img = keras.utils.load_img(path, target_size=(SIZE, SIZE))
        model.predict(np.expand_dims(keras.utils.img_to_array(img), 0), verbose=0)
    return len(paths)


# ------------------------------------------------------------------ measuring
def compare(
    work: Path, tree: Path, files: list[Path], models: tuple[Path, Path], reps: int
) -> tuple[dict[str, list[float]], list[Run]]:
    """Alternating rounds of ours on ``tree`` and the origin on ``files``: rates per
    contender (files/s) and our runs."""
    bundle, model_file = models
    model = origin_predictor(model_file)
    origin_predict(model, files[:2])  # warm-up: the first predict traces the model
    runs: list[Run] = []

    def ours() -> float:
        runs.append(score_run(work, tree, bundle))
        return runs[-1].rate

    timings = interleaved(
        {"ours": ours, "origin": lambda: rate(lambda: origin_predict(model, files))}, reps
    )
    return {name: t.samples for name, t in timings.items()}, runs


def speed_figure(name: str, rates: dict[str, list[float]], goal: float | None) -> Figure:
    """Files per second of ours vs the origin."""
    return Figure(
        name,
        "files/s",
        statistics.median(rates["ours"]),
        statistics.median(rates["origin"]),
        "origin-style one-shot predictor: load_img + one model.predict per image, one process",
        goal_value=goal,
        ours_samples=rates["ours"],
        baseline_samples=rates["origin"],
    )


def memory_figures(small: list[Run], large: Run) -> list[Figure]:
    """Peak memory at the large tree vs the small one."""
    figures = []
    for attr, what in (("rss", "peak RSS of the scoring process"), ("pss", "peak summed PSS")):
        base = statistics.median(getattr(r, attr) for r in small)
        figures.append(
            Figure(
                f"{what} at {large.files:,} vs {small[0].files:,} files",
                "MiB",
                getattr(large, attr),
                base,
                f"the same command at {small[0].files:,} files",
                goal_op="<=",
                goal_value=GROWTH_GOAL,
                ours_samples=[getattr(large, attr)],
                baseline_samples=[getattr(r, attr) for r in small],
            )
        )
    return figures


def bench(settings: Settings, corpus: Corpus | None = None) -> Result:
    """Throughput against the origin's predictor, and memory at 1k vs 20k files."""
    result = Result("scoring", "Batch scoring")
    if not SCORE.is_file():
        raise FileNotFoundError("serve/score.py does not exist yet")
    distinct = QUICK_DISTINCT if settings.quick else DISTINCT
    n_small, n_large = QUICK_TREES if settings.quick else (SMALL_TREE, LARGE_TREE)
    n_base = QUICK_BASELINE_FILES if settings.quick else BASELINE_FILES
    with temp_dir(settings, "scoring") as tmp:
        photos = write_photos(tmp / "photos", distinct, settings.workers)
        small = link_tree(photos, tmp / "small", n_small)
        link_tree(photos, tmp / "large", n_large)
        tiny = tiny_bundle(tmp / "tiny")
        rates, runs = compare(tmp, tmp / "small", small[:n_base], tiny, settings.reps)
        result.figures.append(
            speed_figure(f"throughput, tiny model, {n_small:,} files", rates, SPEED_GOAL)
        )
        large = score_run(tmp, tmp / "large", tiny[0])
        result.figures += memory_figures(runs, large)
        notes = _notes(settings, photos, runs, large, n_base)
        if not settings.quick:
            mobile = mobilenet_bundle(tmp / "mobilenet")
            files = small[:MOBILENET_BASELINE_FILES]
            m_rates, m_runs = compare(tmp, tmp / "small", files, mobile, 1)
            result.figures.append(
                speed_figure(f"throughput, MobileNetV2, {n_small:,} files", m_rates, None)
            )
            notes.append(
                f"MobileNetV2 224 px (one round; origin on {len(files)} files): ours "
                f"{fmt(m_runs[0].rate)} files/s ({fmt(m_runs[0].wall)} s wall with start-up), "
                f"peak RSS {m_runs[0].rss:.0f} MiB."
            )
    result.notes += notes
    return result


def _notes(
    settings: Settings, photos: list[Path], runs: list[Run], large: Run, n_base: int
) -> list[str]:
    size = statistics.mean(p.stat().st_size for p in photos) / 1e3
    run = runs[0]
    growth = (large.rss - run.rss) * 1024 / (large.files - run.files)
    return [
        f"{len(photos)} distinct 1920x1080 JPEGs ({size:.0f} kB mean), hard-linked into "
        f"trees of {run.files:,} and {large.files:,} files; {settings.workers} core(s); "
        f"{len(runs)} alternating round(s), medians; the origin on the first {n_base} files "
        "of the tree.",
        f"Ours with start-up (TensorFlow import, model load, fork server): {run.files:,} files "
        f"in {fmt(run.wall)} s wall ({fmt(run.files / run.wall)} files/s); "
        f"{large.files:,} files in {fmt(large.wall)} s ({fmt(large.rate)} files/s).",
        f"Memory: peak RSS {run.rss:.0f} MiB at {run.files:,} files, {large.rss:.0f} MiB at "
        f"{large.files:,} ({growth:.2f} KiB per extra file: no row is kept once written); "
        f"summed PSS of the process tree {run.pss:.0f} / {large.pss:.0f} MiB.",
    ]
