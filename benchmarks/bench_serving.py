"""Benchmark 5: our HTTP server against ``mlflow models serve`` on the same model.

The model is the project's classifier at 224 px (MobileNetV2 backbone, untrained weights:
the same compute as a trained one) saved once as ``model.keras``: our server loads it from a
bundle (``models/bundle.zip``, as ``promote`` writes it), the baseline from an MLflow Keras
model logged from the same file into a SQLite store in a temp folder.

Payloads: the same 1080p JPEG photos from the corpus. Our server takes the image bytes
(``POST /predict``) and turns them into the model's input itself
(:func:`imgclf.imaging.serving_input`: decode, fit, the training JPEG round trip).
``mlflow models serve`` only takes tensors as JSON, so its client sends
``{"inputs": [224x224x3 floats]}`` made by the same function, *precomputed before timing*:
the baseline gets decoding and JSON encoding for free, which favours it. Both servers are
up at once and measured in alternating rounds, from one asyncio client on the same
machine.

Also: the raw floor for one image, ``serving_input`` + a ``tf.function``-compiled model
call in this process, against which our c=1 median latency is compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.artifact import save_model, write_served_bundle
from benchmarks.common import (
    PROJECT,
    Figure,
    Result,
    Settings,
    env,
    fmt,
    hot_spots,
    stop_process,
    temp_dir,
)
from benchmarks.corpus import Corpus
from imgclf.imaging import DecodeOptions, serving_input
from imgclf.testing.images import preprocess_options

log = logging.getLogger(__name__)

SIZE = 224
BACKBONE = "mobilenetv2"
START_TIMEOUT = 180.0


@dataclass(frozen=True)
class Target:
    """One server under test: where to post and how to build a request per payload."""

    name: str
    url: str
    path: str
    bodies: list[bytes]
    content_type: str


@dataclass(frozen=True)
class Round:
    """One measured round: throughput and latency percentiles (ms)."""

    rps: float
    p50: float
    p95: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _load(
    target: Target, concurrency: int, requests: int, max_seconds: float, warmup: int
) -> Round:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Content-Type": target.content_type}
    async with httpx.AsyncClient(base_url=target.url, timeout=120, limits=limits) as client:

        async def one(i: int) -> float:
            start = time.perf_counter()
            body = target.bodies[i % len(target.bodies)]
            r = await client.post(target.path, content=body, headers=headers)
            r.raise_for_status()
            return (time.perf_counter() - start) * 1000

        await asyncio.gather(*(one(i) for i in range(max(warmup, concurrency))))
        latencies: list[float] = []
        counter = iter(range(requests))
        start = time.perf_counter()
        deadline = start + max_seconds

        async def worker() -> None:
            for i in counter:
                if latencies and time.perf_counter() > deadline:
                    return
                latencies.append(await one(i))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return Round(len(latencies) / wall, percentile(latencies, 0.5), percentile(latencies, 0.95))


def measure(
    target: Target, concurrency: int, requests: int, max_seconds: float, warmup: int = 4
) -> Round:
    """Up to ``requests`` posts at ``concurrency`` (no new ones after ``max_seconds``)."""
    return asyncio.run(_load(target, concurrency, requests, max_seconds, warmup))


@contextlib.contextmanager
def server(cmd: list[str], ready_url: str, log_path: Path, extra_env: dict[str, str]) -> Iterator:
    """Start a server process, wait until ``ready_url`` answers 200, stop it afterwards."""
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=PROJECT, env=env(extra_env), stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-1500:]
                    raise RuntimeError(f"{cmd[1:3]} exited {proc.returncode}: {tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(ready_url, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{ready_url} not ready after {START_TIMEOUT:.0f} s")
                time.sleep(0.5)
            yield proc
        finally:
            stop_process(proc)


def log_mlflow_model(model_file: Path, store: Path, example: np.ndarray) -> str:
    """Log ``model_file`` as an MLflow Keras model in a SQLite store; its model URI."""
    import keras
    import mlflow
    from mlflow.models import infer_signature

    model = keras.models.load_model(model_file, compile=False)
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    mlflow.set_experiment("bench")  # artifacts go under the store's folder
    with mlflow.start_run():
        signature = infer_signature(example, model.predict(example, verbose=0))
        info = mlflow.keras.log_model(model, name="model", signature=signature)
    return info.model_uri


def raw_floor(model_file: Path, payloads: list[bytes], options: DecodeOptions, n: int) -> float:
    """Median ms of the server's input step (``serving_input``) + one compiled model call
    on one image, in this process."""
    import keras
    import tensorflow as tf

    model = keras.models.load_model(model_file, compile=False)

    @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32)])
    def infer(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=False)

    times = []
    for i in range(n + 5):
        start = time.perf_counter()
        arr = serving_input(payloads[i % len(payloads)], options)
        infer(arr[None].astype(np.float32)).numpy()
        if i >= 5:  # warm-up
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench(settings: Settings, corpus: Corpus) -> Result:
    """Requests/s and latency of both servers at concurrency 1 and 16."""
    result = Result("serving", "Serving")
    if not (PROJECT / "serve" / "server.py").is_file():
        raise FileNotFoundError("serve/server.py does not exist yet")
    photos = [p for p in corpus.photo_files() if p.name.startswith("hd_")][:8]
    payloads = [p.read_bytes() for p in photos]
    options = preprocess_options(size=SIZE)  # what write_served_bundle stores
    n1, n16 = (10, 32) if settings.quick else (100, 320)
    max_seconds = 3.0 if settings.quick else 12.0
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with temp_dir(settings, "serve") as tmp:
        model_file = save_model(tmp / "model.keras", SIZE, BACKBONE)
        bundle = write_served_bundle(tmp / "models" / "bundle.zip", SIZE, BACKBONE, model_file)
        floor = raw_floor(model_file, payloads, options, n1)
        log.info("serving: raw input step + compiled call %.1f ms", floor)
        tensors = [serving_input(b, options).astype(np.float32) for b in payloads]
        model_uri = log_mlflow_model(model_file, tmp, tensors[0][None])
        json_bodies = [json.dumps({"inputs": t[None].tolist()}).encode() for t in tensors]
        ours_port, ml_port = free_port(), free_port()
        ours_cmd = [
            sys.executable,
            "serve/server.py",
            "--model",
            str(bundle),
            "--http-port",
            str(ours_port),
            "--tcp-port",
            "0",
            "--reload-poll-seconds",
            "0",
            "--log-level",
            "WARNING",
        ]
        ml_cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            model_uri,
            "--env-manager",
            "local",
            "-p",
            str(ml_port),
            "-h",
            "127.0.0.1",
        ]
        ml_env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
        targets = {
            "ours": Target(
                "ours", f"http://127.0.0.1:{ours_port}", "/predict", payloads, "image/jpeg"
            ),
            "mlflow": Target(
                "mlflow",
                f"http://127.0.0.1:{ml_port}",
                "/invocations",
                json_bodies,
                "application/json",
            ),
        }
        rounds: dict[tuple[str, int], list[Round]] = {}
        with (
            server(ours_cmd, f"{targets['ours'].url}/readyz", tmp / "ours.log", {}) as ours,
            server(ml_cmd, f"{targets['mlflow'].url}/ping", tmp / "mlflow.log", ml_env) as ml,
        ):
            for rep in range(settings.reps):
                for conc, n in ((1, n1), (16, n16)):
                    for name, target in targets.items():
                        r = measure(target, conc, n, max_seconds)
                        rounds.setdefault((name, conc), []).append(r)
                        log.info("serving rep %d: %s c=%d %s", rep + 1, name, conc, r)
            profile = hot_spots(
                PROJECT,
                pid=ours.pid,
                during=lambda: measure(targets["ours"], 1, 10_000, 2.0 if settings.quick else 6.0),
            )
            ml_profile = hot_spots(
                PROJECT,
                pid=ml.pid,
                during=lambda: measure(targets["mlflow"], 1, 10, 2.0 if settings.quick else 6.0),
            )
    result.figures += _figures(rounds, floor)
    result.notes += [
        f"Model: the project's `build_model({SIZE}, 2, backbone={BACKBONE!r}, weights='none')`"
        f"; {len(payloads)} distinct 1080p JPEG payloads "
        f"({np.mean([len(b) for b in payloads]) / 1e3:.0f} kB mean) cycled; "
        f"{n1} requests at c=1 and {n16} at c=16 per round (none started after "
        f"{max_seconds:g} s: the slow baseline's rounds are time-bounded), {settings.reps} "
        "round(s), medians.",
        "MLflow: `mlflow models serve -m <models:/ URI> --env-manager local` with its default "
        "of one uvicorn worker; JSON tensor bodies of "
        f"{np.mean([len(b) for b in json_bodies]) / 1e6:.1f} MB, decoded and encoded before "
        "timing (free for the baseline). Ours: `python serve/server.py --model "
        "models/bundle.zip` with its defaults (micro-batching, decode thread pool).",
        f"Raw floor: {fmt(floor)} ms median for `serving_input` (decode, fit, the training "
        "JPEG round trip) + `tf.function` model call on one image in-process.",
        f"py-spy of our server during a c=1 round (all threads, idle ones dropped): {profile}.",
        f"py-spy of the MLflow server (and its uvicorn worker) during a c=1 round: {ml_profile}.",
    ]
    return result


def _med(rounds: list[Round], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in rounds)


def _figures(rounds: dict[tuple[str, int], list[Round]], floor: float) -> list[Figure]:
    base = "`mlflow models serve --env-manager local`, same model and images"
    figures = []
    for conc in (1, 16):
        ours, ml = rounds[("ours", conc)], rounds[("mlflow", conc)]
        for attr, unit in (("rps", "requests/s"), ("p50", "ms"), ("p95", "ms")):
            goal: dict[str, Any] = {}
            if attr == "rps" and conc == 16:
                goal = {"goal_value": 2.0}
            figures.append(
                Figure(
                    f"c={conc} {'throughput' if attr == 'rps' else attr + ' latency'}",
                    unit,
                    _med(ours, attr),
                    _med(ml, attr),
                    base,
                    ours_samples=[getattr(r, attr) for r in ours],
                    baseline_samples=[getattr(r, attr) for r in ml],
                    **goal,
                )
            )
    ours1 = rounds[("ours", 1)]
    figures.append(
        Figure(
            "c=1 p50 vs raw input step + compiled model call",
            "ms",
            _med(ours1, "p50"),
            floor,
            "in-process serving_input + tf.function call, one image",
            goal_on="diff",
            goal_op="<=",
            goal_value=10.0,
            ours_samples=[r.p50 for r in ours1],
            baseline_samples=[floor],
        )
    )
    return figures
