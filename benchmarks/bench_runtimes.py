"""Benchmark 12: the inference runtimes (Keras, LiteRT, ONNX Runtime), in process and over HTTP.

Models, each bundled as ``promote`` writes it (:func:`benchmarks.artifact.write_served_bundle`)
and exported as the ``export`` stage does (:func:`imgclf.testing.bundles.export_beside`,
``params.yaml``'s ``export`` section with ``quantize: dynamic``, parity on 64 random images):

- the project's default model: :func:`imgclf.pipeline.model.build_from_params` with
  ``params.yaml``'s ``train`` section at ``preprocess.size`` (the ``cnn`` backbone, 32 px);
- MobileNetV2 at 224 px, untrained weights (the same compute as trained ones), with the
  ``train`` section's augmentation and dropout (inactive at inference, stripped from the
  exports).

Per model:

1. raw batch-1 calls in this process, through the runtime classes the server uses
   (:mod:`imgclf.runtimes`: ``KerasRuntime``, ``TfliteRuntime`` on ``model.tflite`` and on
   ``model_dynamic.tflite``, ``OnnxRuntime``), alternating in blocks of 10, after a
   warm-up: p50 and p90; per-image wall and CPU time of batch-16 calls (the most
   micro-batching forms at c=16); the server's input step (:func:`serving_input`); one
   round of these before each round of HTTP measurements (item 2), so that the raw and the
   served figures see the machine at the same moments;
2. ``python serve/server.py --runtime <name>`` for keras, tflite and onnx
   (:class:`imgclf.testing.server.ServerProcess`; ``serve.yaml``'s defaults otherwise:
   micro-batches of up to 32, two decode threads), all three up at once and measured in
   alternating short rounds (an idle server uses no CPU; on this shared machine, whose free
   capacity changes over seconds, measuring them one after another skewed their ratios):
   the c=1 p50 latency of sequential ``POST /predict`` of one JPEG at the model's size,
   images/s at c=16 (the load generator of :mod:`benchmarks.bench_serving`), and the CPU
   time the server and the load generator spend per request at c=1 and per image at c=16;
   compared with the Keras server measured in the same rounds;
3. a server started with the default ``--runtime auto``: what ``/version`` says it chose.

Goals (MobileNetV2): c=16 throughput at least 3x the Keras server's; c=1 p50 at most 5 ms
above the runtime's raw batch-1 call.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.artifact import write_served_bundle
from benchmarks.bench_serving import Round, Target, measure, percentile
from benchmarks.common import PROJECT, Figure, Result, Settings, fmt, hot_spots, temp_dir
from benchmarks.corpus import Corpus, make_photo
from imgclf.config import load_params
from imgclf.imaging import DecodeOptions, serving_input
from imgclf.testing.server import ServerProcess

log = logging.getLogger(__name__)

SERVED = ("keras", "tflite", "onnx")  # what serve/server.py --runtime can run
RAW = ("keras", "tflite", "tflite_dynamic", "onnx")  # in process: the quantised one too
FAST = ("tflite", "onnx")
DIAGNOSTIC = "onnx_no_spin"  # in process only: ONNX Runtime with spin-waiting off
THROUGHPUT_GOAL = 3.0  # x the Keras server at c=16 (MobileNetV2)
OVERHEAD_GOAL = 5.0  # ms of c=1 HTTP p50 above the runtime's raw batch-1 p50 (MobileNetV2)
GOAL_MODEL = "mobilenetv2"
CONCURRENCY = 16
RAW_BLOCK = 10  # raw calls of one runtime before the next one's
C1_WARMUP = 4  # requests before each timed c=1 round
PAYLOADS, PHOTO_SEED, PHOTO_SIGMA, JPEG_QUALITY = 4, 23, 4.5, 92

RAW_BASE = "the Keras runtime (`KerasRuntime`: `tf.function`) batch-1 call in this process"
HTTP_BASE = "`serve/server.py --runtime keras`: same bundle, payloads and run"
OWN_RAW = "the same runtime's raw batch-1 call p50 in this process"


@dataclass(frozen=True)
class Load:
    """How hard to push: raw calls, c=1 requests and c=16 seconds, per round."""

    raw_calls: int
    batch_calls: int  # batch-16 calls per round
    decodes: int  # input steps timed per round
    c1_requests: int
    c16_seconds: float
    rounds: int
    profile_seconds: float


def load_for(settings: Settings) -> Load:
    if settings.quick:
        return Load(
            raw_calls=20,
            batch_calls=2,
            decodes=50,
            c1_requests=20,
            c16_seconds=1.5,
            rounds=1,
            profile_seconds=0,
        )
    rounds = 2 * max(1, settings.reps)  # short rounds, alternating between contenders
    return Load(
        raw_calls=max(200 // rounds, 20),
        batch_calls=2,
        decodes=50,
        c1_requests=max(200 // rounds, 20),
        c16_seconds=1.5,
        rounds=rounds,
        profile_seconds=3.0,
    )


@dataclass(frozen=True)
class Model:
    key: str
    label: str
    size: int
    build: Callable[[], Any]  # -> a keras.Model


def models(quick: bool) -> list[Model]:
    """The default model and (not in quick runs) MobileNetV2 at 224 px."""
    params = load_params()
    train, seed, size = params.train, params.base.seed, params.preprocess.size

    def default() -> Any:
        from imgclf.pipeline.model import build_from_params

        return build_from_params(size, 2, train, seed)

    def mobilenet() -> Any:
        from imgclf.pipeline.model import build_model

        return build_model(
            224,
            2,
            backbone="mobilenetv2",
            weights="none",
            dropout=train.dropout,
            augment=train.augment.model_dump(),
            seed=seed,
        )

    found = [Model(train.backbone, f"default {train.backbone} {size} px", size, default)]
    if not quick:
        found.append(Model(GOAL_MODEL, "MobileNetV2 224 px", 224, mobilenet))
    return found


# ------------------------------------------------------------------ artifacts
@dataclass
class Exported:
    """One model's bundle and exports."""

    model: Model
    bundle: Path
    keras_bytes: int
    export_seconds: float
    exports: dict[str, dict[str, Any]]  # bundle.json's exports.*
    decode: DecodeOptions
    payloads: list[bytes] = field(default_factory=list)


def make_artifacts(folder: Path, model: Model) -> Exported:
    """Build, save, bundle and export ``model`` in ``folder``; JPEG payloads at its size."""
    from imgclf.testing.bundles import export_beside

    folder.mkdir(parents=True)
    model_file = folder / "model.keras"
    model.build().save(model_file)
    bundle = write_served_bundle(
        folder / "models" / "bundle.zip", model.size, model.key, model_file
    )
    start = time.perf_counter()
    export_dir = export_beside(bundle, quantize="dynamic")
    seconds = time.perf_counter() - start
    manifest = json.loads((export_dir / "bundle.json").read_text(encoding="utf-8"))
    log.info("runtimes: exported %s in %.1f s", model.label, seconds)
    payloads = []
    for i in range(PAYLOADS):
        buf = io.BytesIO()
        photo = make_photo(i, (model.size, model.size), PHOTO_SEED, PHOTO_SIGMA)
        photo.save(buf, format="JPEG", quality=JPEG_QUALITY)
        payloads.append(buf.getvalue())
    return Exported(
        model,
        bundle,
        model_file.stat().st_size,
        seconds,
        manifest["exports"],
        DecodeOptions.from_dict(manifest["decode"]),
        payloads,
    )


# ------------------------------------------------------------------ in process
@dataclass(frozen=True)
class Calls:
    """Batch-1 call times (ms) of one runtime, and each round's median."""

    times: list[float]
    round_medians: list[float]

    @property
    def p50(self) -> float:
        return percentile(self.times, 0.5)

    @property
    def p90(self) -> float:
        return percentile(self.times, 0.9)


def no_spin_onnx(data: bytes) -> Callable[[np.ndarray], np.ndarray]:
    """Diagnostic, not a project runtime: :class:`~imgclf.runtimes.OnnxRuntime`'s session
    with ONNX Runtime's intra-op spin-waiting off (``session.intra_op.allow_spinning``)."""
    import onnxruntime as ort

    from imgclf.runtimes import cpu_threads

    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def load_runtimes(art: Exported) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Every runtime of :data:`RAW` on ``art``'s files, as the server builds them, and the
    :data:`DIAGNOSTIC` ONNX session."""
    from imgclf import runtimes
    from imgclf.bundle import Bundle

    bundle = Bundle.read(art.bundle)
    folder = art.bundle.parent / runtimes.EXPORT_DIR
    keras_model = runtimes.load_keras(bundle.model_bytes)
    files = {
        name: (folder / art.exports[name]["path"]).read_bytes() for name in RAW if name != "keras"
    }
    return {
        "keras": runtimes.KerasRuntime(keras_model, art.model.size),
        "tflite": runtimes.TfliteRuntime(files["tflite"]),
        "tflite_dynamic": runtimes.TfliteRuntime(files["tflite_dynamic"]),
        "onnx": runtimes.OnnxRuntime(files["onnx"]),
        DIAGNOSTIC: no_spin_onnx(files["onnx"]),
    }


def cpu_now() -> float:
    """CPU seconds of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Batched:
    """Per-image wall and CPU ms of batch-:data:`CONCURRENCY` calls of one runtime."""

    wall_ms: float
    cpu_ms: float


class InProcess:
    """The raw figures in this process, one :meth:`round` at a time (called between the
    HTTP rounds, so that both see the machine at the same moments): batch-1 call times of
    each runtime on the decoded payloads, in alternating blocks; per-image wall and CPU time
    of batch-16 calls (the most micro-batching forms at c=16); the server's input step."""

    def __init__(self, art: Exported, load: Load) -> None:
        self.art, self.load = art, load
        self.engines = load_runtimes(art)
        self.pixels = [serving_input(b, art.decode)[None].astype(np.float32) for b in art.payloads]
        self.batch = np.concatenate([self.pixels[i % len(self.pixels)] for i in range(CONCURRENCY)])
        names = list(self.engines)
        self.times: dict[str, list[float]] = {name: [] for name in names}
        self.medians: dict[str, list[float]] = {name: [] for name in names}
        self.walls: dict[str, list[float]] = {name: [] for name in names}
        self.cpus: dict[str, float] = dict.fromkeys(names, 0.0)
        self.decodes: list[float] = []
        for engine in self.engines.values():  # warm-up: traces, allocations, caches
            for x in [*self.pixels * 3, self.batch]:
                engine(x)

    def round(self) -> None:
        load, pixels = self.load, self.pixels
        calls: dict[str, list[float]] = {name: [] for name in self.engines}
        for first in range(0, load.raw_calls, RAW_BLOCK):  # short blocks, alternating
            for name, engine in self.engines.items():
                for i in range(first, min(first + RAW_BLOCK, load.raw_calls)):
                    x = pixels[i % len(pixels)]
                    start = time.perf_counter()
                    engine(x)
                    calls[name].append((time.perf_counter() - start) * 1000)
        for name, engine in self.engines.items():
            self.times[name] += calls[name]
            self.medians[name].append(statistics.median(calls[name]))
            cpu0 = cpu_now()
            for _ in range(load.batch_calls):
                start = time.perf_counter()
                engine(self.batch)
                self.walls[name].append((time.perf_counter() - start) * 1000 / CONCURRENCY)
            self.cpus[name] += cpu_now() - cpu0
        for i in range(load.decodes):
            start = time.perf_counter()
            serving_input(self.art.payloads[i % len(self.art.payloads)], self.art.decode)
            self.decodes.append((time.perf_counter() - start) * 1000)

    def results(self) -> tuple[dict[str, Calls], dict[str, Batched], float]:
        """Batch-1 calls and batch-16 costs per runtime, and the input step's median ms;
        the runtimes are released."""
        self.engines.clear()
        gc.collect()
        per_image = max(1, len(self.medians["keras"]) * self.load.batch_calls * CONCURRENCY)
        batched = {
            name: Batched(statistics.median(self.walls[name]), self.cpus[name] * 1000 / per_image)
            for name in self.walls
        }
        calls = {name: Calls(self.times[name], self.medians[name]) for name in self.times}
        return calls, batched, statistics.median(self.decodes)


# ------------------------------------------------------------------ over HTTP
@dataclass
class Served:
    """One server's rounds, what ``/version`` said and its CPU time per image at c=16."""

    runtime: str
    c1: list[Round]
    c16: list[Round]
    version: dict[str, Any]
    server_cpu_ms: float  # server CPU ms per image during the c=16 rounds
    client_cpu_ms: float  # this process (the load generator) CPU ms per image, same rounds
    c1_server_cpu_ms: float  # server CPU ms per request during the c=1 rounds
    c1_client_cpu_ms: float  # load generator CPU ms per request during the c=1 rounds
    profile: str = ""

    @property
    def p50(self) -> float:
        return statistics.median(r.p50 for r in self.c1)

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.c16)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(tmp: Path, art: Exported, runtime: str) -> ServerProcess:
    folder = tmp / f"server-{art.model.key}-{runtime}"
    folder.mkdir(parents=True)
    flags = ("--runtime", runtime, "--reload-poll-seconds", "0", "--log-level", "WARNING")
    return ServerProcess(folder, art.bundle, *flags)


@dataclass
class Tally:
    """One server's measurements so far."""

    c1: list[Round] = field(default_factory=list)
    c16: list[Round] = field(default_factory=list)
    images: int = 0  # posted during the c=16 rounds (about: warm-ups at the same rate)
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    c1_requests: int = 0
    c1_server_cpu: float = 0.0
    c1_client_cpu: float = 0.0


def serve_all(
    tmp: Path, art: Exported, load: Load, profile: bool, each_round: Callable[[], None]
) -> dict[str, Served]:
    """Start a server per runtime of :data:`SERVED` on ``art``'s bundle, all up at once
    (an idle one uses no CPU) and measured in alternating rounds, each after
    ``each_round()``, so that load from other processes hits each about equally; stop
    them."""
    with contextlib.ExitStack() as stack:
        servers: dict[str, ServerProcess] = {}
        for rt in SERVED:
            servers[rt] = start(tmp, art, rt)
            stack.callback(servers[rt].stop)
        targets = {
            rt: Target(rt, server.url, "/predict", art.payloads, "image/jpeg")
            for rt, server in servers.items()
        }
        for target in targets.values():
            # every batch size micro-batching will form (LiteRT: one interpreter each)
            measure(target, CONCURRENCY, 4 * CONCURRENCY, 1.0, warmup=CONCURRENCY)
        tallies = {rt: Tally() for rt in SERVED}
        for _ in range(load.rounds):
            each_round()
            for rt, target in targets.items():
                tally, pid = tallies[rt], servers[rt].proc.pid
                cpu0, own0 = cpu_seconds(pid), time.process_time()
                tally.c1.append(measure(target, 1, load.c1_requests, 60.0, warmup=C1_WARMUP))
                tally.c1_requests += load.c1_requests + C1_WARMUP
                tally.c1_server_cpu += cpu_seconds(pid) - cpu0
                tally.c1_client_cpu += time.process_time() - own0
                cpu0, own0, t0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
                r = measure(target, CONCURRENCY, 100_000, load.c16_seconds, warmup=CONCURRENCY)
                tally.images += round(r.rps * (time.perf_counter() - t0))
                tally.server_cpu += cpu_seconds(pid) - cpu0
                tally.client_cpu += time.process_time() - own0
                tally.c16.append(r)
                log.info("runtimes: %s %s c=1 %s c=16 %s", art.model.key, rt, tally.c1[-1], r)
        served = {}
        for rt, tally in tallies.items():
            version = httpx.get(f"{servers[rt].url}/version", timeout=10).json()
            served[rt] = Served(
                rt,
                tally.c1,
                tally.c16,
                version.get("runtime") or {},
                tally.server_cpu * 1000 / max(tally.images, 1),
                tally.client_cpu * 1000 / max(tally.images, 1),
                tally.c1_server_cpu * 1000 / max(tally.c1_requests, 1),
                tally.c1_client_cpu * 1000 / max(tally.c1_requests, 1),
            )
            if profile and rt != "keras":
                served[rt].profile = hot_spots(
                    PROJECT,
                    pid=servers[rt].proc.pid,
                    during=lambda t=targets[rt]: measure(
                        t, CONCURRENCY, 100_000, load.profile_seconds
                    ),
                )
        return served


def auto_choice(tmp: Path, art: Exported) -> dict[str, Any]:
    """``/version``'s ``runtime`` of a server started with the default ``--runtime auto``."""
    server = start(tmp, art, "auto")
    try:
        return httpx.get(f"{server.url}/version", timeout=10).json().get("runtime") or {}
    finally:
        server.stop()


# ------------------------------------------------------------------ the benchmark
@dataclass
class Measured:
    art: Exported
    raw: dict[str, Calls]
    batched: dict[str, Batched]
    decode: float
    served: dict[str, Served]
    auto: dict[str, Any]


def bench(settings: Settings, corpus: Corpus | None = None) -> Result:
    """Raw call and HTTP figures per runtime and model, against Keras in the same run."""
    result = Result("runtimes", "Inference runtimes")
    if not (PROJECT / "serve" / "server.py").is_file():
        raise FileNotFoundError("serve/server.py does not exist")
    load = load_for(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    measured: list[Measured] = []
    with temp_dir(settings, "runtimes") as tmp:
        for model in models(settings.quick):
            art = make_artifacts(tmp / model.key, model)
            in_process = InProcess(art, load)
            profile = model.key == GOAL_MODEL and load.profile_seconds > 0
            served = serve_all(tmp, art, load, profile, in_process.round)
            raw, batched, decode = in_process.results()
            auto = auto_choice(tmp, art)
            measured.append(Measured(art, raw, batched, decode, served, auto))
    for m in measured:
        result.figures += figures(m)
    result.notes += notes(measured, load, settings)
    return result


def figures(m: Measured) -> list[Figure]:
    label, goals = m.art.model.label, m.art.model.key == GOAL_MODEL
    keras_raw, keras_http = m.raw["keras"], m.served["keras"]
    out = [
        Figure(
            f"{label}: {rt} raw batch-1 call p50",
            "ms",
            m.raw[rt].p50,
            keras_raw.p50,
            RAW_BASE,
            ours_samples=m.raw[rt].round_medians,
            baseline_samples=keras_raw.round_medians,
        )
        for rt in RAW
        if rt != "keras"
    ]
    for rt in FAST:
        s = m.served[rt]
        out.append(
            Figure(
                f"{label}: {rt} c={CONCURRENCY} HTTP throughput",
                "images/s",
                s.rps,
                keras_http.rps,
                HTTP_BASE,
                goal_value=THROUGHPUT_GOAL if goals else None,
                ours_samples=[r.rps for r in s.c16],
                baseline_samples=[r.rps for r in keras_http.c16],
            )
        )
        out.append(
            Figure(
                f"{label}: {rt} c=1 HTTP p50 latency",
                "ms",
                s.p50,
                keras_http.p50,
                HTTP_BASE,
                ours_samples=[r.p50 for r in s.c1],
                baseline_samples=[r.p50 for r in keras_http.c1],
            )
        )
    for rt in SERVED:
        s = m.served[rt]
        out.append(
            Figure(
                f"{label}: {rt} c=1 HTTP p50 vs its raw call p50",
                "ms",
                s.p50,
                m.raw[rt].p50,
                OWN_RAW,
                goal_on="diff",
                goal_op="<=",
                goal_value=OVERHEAD_GOAL if goals and rt != "keras" else None,
                ours_samples=[r.p50 for r in s.c1],
                baseline_samples=m.raw[rt].round_medians,
            )
        )
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def notes(measured: list[Measured], load: Load, settings: Settings) -> list[str]:
    out = [
        f"Load per server: {load.rounds} round(s) of {load.c1_requests} sequential requests "
        f"(c=1) and of {load.c16_seconds:g} s at c={CONCURRENCY} (after a warm-up that forms "
        "every micro-batch size); raw calls: "
        f"{load.rounds} round(s) of {load.raw_calls} batch-1 calls per runtime in blocks of "
        f"{RAW_BLOCK}, alternating, and {load.batch_calls} batch-{CONCURRENCY} calls. "
        f"Payloads: {PAYLOADS} distinct synthetic photos as JPEG q{JPEG_QUALITY} at the "
        "model's input size, cycled. Servers: `python serve/server.py --model <bundle> "
        "--runtime <name>`, `serve.yaml` otherwise (max_batch 32, batch_wait_ms 0, 2 decode "
        "threads), the three of a model up at once and measured in alternating rounds. "
        "Every runtime uses both cores (its default threads).",
    ]
    if settings.quick:
        out.append("Quick run: the default model only (MobileNetV2's export takes a minute).")
    for m in measured:
        out += model_notes(m)
    out += verdicts(measured)
    out.append(
        "Machine caveat: 2 cores shared by the server (event loop, 2 decode threads, the "
        "inference thread with its own 2 intra-op threads) and the load generator (one "
        "asyncio httpx client in this process, which costs CPU per request too: see the "
        "client CPU figures). Other processes on the shared host change the capacity left "
        "over seconds (the same isolated batch-1 LiteRT call measured 3.3 or 7.6 ms from one "
        "process start to the next while this benchmark was written): contenders are "
        "measured in alternating rounds for that reason; compare ratios, not absolute "
        "numbers, across runs."
    )
    return out


def model_notes(m: Measured) -> list[str]:
    label, exports = m.art.model.label, m.art.exports
    sizes = ", ".join(f"{name} {_mb(facts['bytes'])}" for name, facts in exports.items())
    parity = ", ".join(
        f"{name} {facts['max_abs_diff']:.2g}"
        for name, facts in exports.items()
        if "passed" in facts
    )
    dynamic = exports.get("tflite_dynamic", {})
    raw = ", ".join(f"{rt} {fmt(c.p50)} / {fmt(c.p90)}" for rt, c in m.raw.items())
    batched = ", ".join(f"{rt} {fmt(b.wall_ms)} / {fmt(b.cpu_ms)}" for rt, b in m.batched.items())
    http = "; ".join(
        f"{rt}: c=1 p50 {fmt(s.p50)} ms (p95 {fmt(statistics.median(r.p95 for r in s.c1))}), "
        f"c={CONCURRENCY} {fmt(s.rps)} images/s (p50 "
        f"{fmt(statistics.median(r.p50 for r in s.c16))} ms), CPU per image at "
        f"c={CONCURRENCY}: server {fmt(s.server_cpu_ms)} ms, client {fmt(s.client_cpu_ms)} ms, "
        f"per request at c=1: server {fmt(s.c1_server_cpu_ms)} ms, client "
        f"{fmt(s.c1_client_cpu_ms)} ms"
        for rt, s in m.served.items()
    )
    said = {rt: s.version.get("name") for rt, s in m.served.items()}
    out = [
        f"{label}: `model.keras` {_mb(m.art.keras_bytes)}; exports ({fmt(m.art.export_seconds)} "
        f"s, `export_beside(bundle, quantize='dynamic')`): {sizes}. Float parity on 64 random "
        f"images, max |p - p_keras|: {parity}; dynamic-range tflite "
        f"{dynamic.get('max_abs_diff', float('nan')):.2g} (decisions agree "
        f"{dynamic.get('decision_agreement', float('nan')):.2%}).",
        f"{label}: raw batch-1 call p50 / p90 (ms): {raw}. Batch-{CONCURRENCY} calls, per "
        f"image, wall / CPU ms (both cores: a ceiling of 2000 / CPU ms images/s): {batched}. "
        f"`{DIAGNOSTIC}` is a diagnostic, not a project runtime: the same ONNX session with "
        "`session.intra_op.allow_spinning=0`. Server input step (`serving_input`: decode, "
        f"fit, JPEG round trip) {fmt(m.decode)} ms per payload.",
        f"{label}: over HTTP, {http}. `/version` runtime of each: {said}.",
        f"{label}: `--runtime auto` chose **{m.auto.get('name')}** ({m.auto.get('why')}).",
    ]
    out.append(
        f"{label}: ONNX Runtime's intra-op spin-waiting (its default) vs "
        f"`allow_spinning=0`, in process: batch-1 p50 {fmt(m.raw['onnx'].p50)} vs "
        f"{fmt(m.raw[DIAGNOSTIC].p50)} ms, batch-{CONCURRENCY} CPU per image "
        f"{fmt(m.batched['onnx'].cpu_ms)} vs {fmt(m.batched[DIAGNOSTIC].cpu_ms)} ms; served "
        f"at c={CONCURRENCY}, onnx costs {fmt(m.served['onnx'].server_cpu_ms)} ms of server "
        f"CPU per image, tflite {fmt(m.served['tflite'].server_cpu_ms)} ms."
    )
    for rt, s in m.served.items():
        if s.profile:
            out.append(f"{label}: py-spy of the {rt} server at c={CONCURRENCY}: {s.profile}.")
    if m.art.model.key == GOAL_MODEL:
        out.append(
            "Untrained MobileNetV2's activations vanish with depth (about 1e-11 at the "
            "pooled features), so every probability is 0.5 and the parity figures above "
            "are 0 by construction: they show nothing about the exports' accuracy here "
            "(the speed is the same as a trained model's)."
        )
    return out


def verdicts(measured: list[Measured]) -> list[str]:
    """Met / missed per goal, with the numbers and where the time goes."""
    out = []
    # the serving stack's own c=1 cost, where the model call is negligible (32 px model)
    small = [x for x in measured if x.art.model.key != GOAL_MODEL]
    floor = ""
    if small:
        x = small[0]
        s = x.served["tflite"]
        stack = s.p50 - x.raw["tflite"].p50 - x.decode
        floor = (
            f"Latency floor: the serving stack alone costs {fmt(stack)} ms at c=1 here: the "
            f"{x.art.model.label} model's tflite c=1 p50 minus its raw call and its input "
            "step; per request the load generator (httpx) spends "
            f"{fmt(s.c1_client_cpu_ms)} ms of CPU on it and the server "
            f"{fmt(s.c1_server_cpu_ms)} ms (HTTP, routing, the input step and the call), "
            "the rest being thread hand-offs (decode pool, event loop, inference thread) "
            "and waits for a core."
        )
    for m in measured:
        if m.art.model.key != GOAL_MODEL:
            continue
        keras = m.served["keras"]
        for rt in FAST:
            s, raw = m.served[rt], m.raw[rt]
            ratio = s.rps / keras.rps if keras.rps else float("nan")
            over = s.p50 - raw.p50
            rest = over - m.decode
            tp = "met" if ratio >= THROUGHPUT_GOAL else "**missed**"
            lat = "met" if over <= OVERHEAD_GOAL else "**missed**"
            out.append(
                f"Verdict {rt} (MobileNetV2): throughput goal {tp}: {fmt(s.rps)} vs "
                f"{fmt(keras.rps)} images/s = {fmt(ratio)}x (goal ≥ {THROUGHPUT_GOAL:g}x). "
                f"Latency goal {lat}: c=1 p50 {fmt(s.p50)} ms - raw {fmt(raw.p50)} ms = "
                f"{fmt(over)} ms (goal ≤ {OVERHEAD_GOAL:g} ms), of which the input step "
                f"{fmt(m.decode)} ms and the rest {fmt(rest)} ms (the raw call's round "
                f"medians ranged {fmt(min(raw.round_medians))}-{fmt(max(raw.round_medians))} "
                "ms in this run)."
            )
            if ratio < THROUGHPUT_GOAL:
                out.append(throughput_profile(m, rt))
    if floor and len(small) < len(measured):
        out.append(floor)
    return out


def throughput_profile(m: Measured, rt: str) -> str:
    """Why ``rt`` misses the c=16 throughput goal: CPU per image, served and in process."""
    s, keras = m.served[rt], m.served["keras"]
    ours_cpu = s.server_cpu_ms + s.client_cpu_ms
    keras_cpu = keras.server_cpu_ms + keras.client_cpu_ms
    b, kb = m.batched[rt], m.batched["keras"]
    return (
        f"Where {rt}'s c={CONCURRENCY} time goes: CPU per image, server "
        f"{fmt(s.server_cpu_ms)} ms + load generator {fmt(s.client_cpu_ms)} ms = "
        f"{fmt(ours_cpu)} ms, against Keras' {fmt(keras.server_cpu_ms)} + "
        f"{fmt(keras.client_cpu_ms)} = {fmt(keras_cpu)} ms: with both cores busy, "
        f"throughput is about 2 cores / CPU per image, a ratio of at most "
        f"{fmt(keras_cpu / ours_cpu if ours_cpu else None)}x. The model call itself bounds "
        f"it: in process, a batch-{CONCURRENCY} call costs {fmt(b.cpu_ms)} ms of CPU per "
        f"image on {rt} and {fmt(kb.cpu_ms)} ms on Keras "
        f"({fmt(kb.cpu_ms / b.cpu_ms if b.cpu_ms else None)}x), while their batch-1 calls "
        f"are {fmt(m.raw[rt].p50)} and {fmt(m.raw['keras'].p50)} ms: Keras' server batches "
        "concurrent images (micro-batching), which removes most of Keras' per-call "
        f"overhead, so {THROUGHPUT_GOAL:g}x over it at c={CONCURRENCY} would need a runtime "
        "computing each image that much faster, not a thinner call."
    )
