"""Benchmark 14: training at scale on this machine: one worker against two
(``train.distribute: multi_worker``, two processes on loopback), same model, data and
seed; plus the GPU figures measured by hand (``benchmarks/gpu_training.py``, JSON in
``benchmarks/gpu_training_h100.json``), quoted as notes."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from benchmarks.common import Figure, Result, Settings, temp_dir
from imgclf.testing.project import dvc, make_repo, python, set_params

log = logging.getLogger(__name__)

GPU_FIGURES = Path(__file__).with_name("gpu_training_h100.json")
TRAINED = re.compile(r"trained (\d+) epochs in ([\d.]+) s \((\d+) images/s\)")


def images_per_second(repo: Path) -> tuple[float, float]:
    """Run the train stage; (images/s, seconds) from its summary line."""
    said = TRAINED.search(python(repo, "-m", "imgclf.pipeline.train").stderr)
    if said is None:
        raise RuntimeError("the train stage did not print its summary line")
    return float(said.group(3)), float(said.group(2))


def gpu_notes() -> list[str]:
    """The hand-measured GPU figures, as sentences."""
    facts = json.loads(GPU_FIGURES.read_text())
    notes = [f"GPU (not run by this benchmark): {facts['measured']}. {facts['why_jax']}."]
    for run in facts["runs"]:
        speeds = ", ".join(f"{r['policy']} {r['images_per_s']:,.0f}" for r in run["runs"])
        notes.append(
            f"{run['model']}, batch {run['batch']}, {run['device']}: images/s {speeds} "
            f"(compile, excluded: {', '.join(str(r['warmup_s']) for r in run['runs'])} s)."
        )
    cpu = facts["cpu_16_cores_jax"]
    notes.append(
        f"The same model on that machine's 16 CPU cores: {cpu['images_per_s']} images/s "
        f"(float32, batch {cpu['batch']}); {cpu['note']}."
    )
    return notes


def bench(settings: Settings, corpus: object = None) -> Result:
    """One worker vs two on the bundled sample, default model."""
    result = Result("distributed", "Training at scale")
    epochs = 2 if settings.quick else 6
    with temp_dir(settings, "distributed") as tmp:
        repo = make_repo(tmp / "repo", per_digit=40 if settings.quick else None)
        set_params(repo, {"train.epochs": epochs, "train.patience": epochs})
        dvc(repo, "repro", "split")
        one, one_s = images_per_second(repo)
        set_params(repo, {"train.distribute": "multi_worker", "train.workers": 2})
        two, two_s = images_per_second(repo)
    log.info("distributed: 1 worker %s images/s, 2 workers %s", one, two)
    result.figures.append(
        Figure("training images/s, 2 workers on this machine", "images/s", two, one,
               "1 worker (train.distribute: none)"),
    )  # fmt: skip
    result.notes += [
        f"Bundled sample (digits), default `cnn` at 32 px, batch 64, {epochs} epochs; "
        f"1 worker {one_s:.1f} s, 2 workers {two_s:.1f} s (the fit alone, first epoch's "
        "tracing included; process start-up and the cluster's handshake excluded). With two "
        "workers each pass leaves out the last `n % 64` images (a short last batch). Both "
        "workers share the same 2 cores, so two processes cannot be faster here: every step "
        "waits for a gRPC all-reduce of the gradients and of BatchNorm's statistics. "
        "Multi-worker pays off across machines, each with its own cores or GPUs.",
        *gpu_notes(),
    ]
    return result
