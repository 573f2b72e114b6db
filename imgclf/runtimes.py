"""Inference runtimes: one model, one call, probabilities out, whichever engine runs it.

- ``keras``: the bundle's ``model.keras`` behind a ``tf.function`` with a fixed input
  signature (TensorFlow);
- ``tflite``: the export's ``model.tflite`` in LiteRT's interpreter (``ai-edge-litert``,
  XNNPACK on CPUs), with one interpreter per power-of-two batch size so that a batch never
  reallocates tensors and never computes padding;
- ``onnx``: the export's ``model.onnx`` in ONNX Runtime (CPU provider).

Every runtime takes float32 pixels ``(n, size, size, 3)`` in the 0-255 range (the model's
own layers rescale them) and returns float32 probabilities ``(n, classes)``. The export
stage (:mod:`imgclf.pipeline.export`) writes the files and proves their parity with the
Keras model; serving (:mod:`imgclf.serving.predictor`) loads them only for the bundle they
were made from (:func:`read_exports`).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from imgclf.config import import_tensorflow
from imgclf.files import file_md5

RUNTIMES = ("keras", "tflite", "onnx")
EXPORT_DIR = "export"  # beside the bundle file: models/export/
MANIFEST = "bundle.json"  # in it: the bundle's info, its md5 and each export's facts
# export formats -> file (or folder) names in EXPORT_DIR; the quantised TFLite variants
# carry their mode in the name (model_dynamic.tflite, model_int8.tflite)
FILES = {"saved_model": "saved_model", "tflite": "model.tflite", "onnx": "model.onnx"}
MAX_TFLITE_BATCH = 64  # larger batches run in chunks of this size


class RuntimeUnavailable(RuntimeError):
    """A runtime that cannot run this bundle; the message says why."""


class Runtime(Protocol):
    """A loaded model: ``runtime(batch) -> probabilities``."""

    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def cpu_threads() -> int:
    """CPU cores this process may use (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def tree_md5(path: Path) -> str:
    """md5 of a file (as ``dvc.lock`` records it), or of a folder's files: their relative
    paths and md5s, sorted."""
    if not path.is_dir():
        return file_md5(path)
    digest = hashlib.md5(usedforsecurity=False)
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path).as_posix()}\0{file_md5(f)}\n".encode())
    return digest.hexdigest()


def folder_bytes(path: Path) -> int:
    """Size of a file, or the total size of a folder's files."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# ------------------------------------------------------------------ keras
def load_keras(model_bytes: bytes) -> Any:
    """The Keras model stored in a bundle (Keras needs a file: a temporary one). Raises
    ``ValueError`` with Keras' reason, the temporary path left out."""
    import_tensorflow()
    import keras

    with tempfile.TemporaryDirectory(prefix="imgclf-model-") as tmp:
        path = Path(tmp) / "model.keras"
        path.write_bytes(model_bytes)
        try:
            return keras.models.load_model(path, compile=False)
        except Exception as exc:
            said = str(exc).replace(str(path), "model.keras").replace(tmp, "")
            raise ValueError(f"{type(exc).__name__}: {said}") from exc


class KerasRuntime:
    """The Keras model behind a ``tf.function`` with one fixed input signature (traced once)."""

    name = "keras"

    def __init__(self, model: Any, size: int) -> None:
        import tensorflow as tf

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        def infer(x: tf.Tensor) -> tf.Tensor:
            return model(x, training=False)

        self._infer = infer  # the closure keeps the model alive

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._infer(batch))

    def traces(self) -> int:
        """How often the call was traced (1: every batch size reuses one graph)."""
        return int(self._infer.experimental_get_tracing_count())


# ------------------------------------------------------------------ tflite
def _chunks(n: int, largest: int) -> list[int]:
    """``n`` as a sum of powers of two (chunks of ``largest`` first): 37 -> [32, 4, 1]."""
    sizes = [largest] * (n // largest)
    rest = n % largest
    sizes += [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]
    return sizes


class TfliteRuntime:
    """A ``.tflite`` model in LiteRT's interpreter. One interpreter per power-of-two batch
    size, allocated on first use: a batch of 37 runs as 32 + 4 + 1 rows, no padding."""

    name = "tflite"

    def __init__(self, data: bytes, threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._make = lambda: Interpreter(model_content=data, num_threads=threads or cpu_threads())
        self._interpreters: dict[int, Any] = {}
        self._lock = threading.Lock()  # an interpreter is not safe to call from two threads
        self._interpreter(1)  # a model LiteRT cannot load fails here, not on a request

    def _interpreter(self, n: int) -> Any:
        it = self._interpreters.get(n)
        if it is None:
            it = self._make()
            it.resize_tensor_input(it.get_input_details()[0]["index"], (n, *self._shape(it)))
            it.allocate_tensors()
            self._interpreters[n] = it
        return it

    @staticmethod
    def _shape(it: Any) -> tuple[int, ...]:
        return tuple(int(d) for d in it.get_input_details()[0]["shape"][1:])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out, start = [], 0
        with self._lock:
            for n in _chunks(len(batch), MAX_TFLITE_BATCH):
                it = self._interpreter(n)
                it.set_tensor(it.get_input_details()[0]["index"], batch[start : start + n])
                it.invoke()
                out.append(it.get_tensor(it.get_output_details()[0]["index"]))
                start += n
        return np.concatenate(out) if len(out) != 1 else out[0]


# ------------------------------------------------------------------ onnx
class OnnxRuntime:
    """An ``.onnx`` model in ONNX Runtime's CPU provider (dynamic batch)."""

    name = "onnx"

    def __init__(self, data: bytes, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_threads()
        options.log_severity_level = 3  # errors only: no per-session warnings on stderr
        # idle intra-op threads would otherwise spin on the cores that decoding and the
        # event loop need (no loss measured with it off: benchmarks/bench_runtimes.py)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: batch})[0]


LOADERS: dict[str, Callable[[bytes], Runtime]] = {"tflite": TfliteRuntime, "onnx": OnnxRuntime}


# ------------------------------------------------------------------ exports of a bundle
@dataclass(frozen=True)
class Exports:
    """The serving exports of one bundle: each runtime's file bytes, or why it is absent."""

    files: Mapping[str, bytes]
    missing: Mapping[str, str]
    manifest: Mapping[str, Any]

    def parity(self) -> dict[str, Any]:
        """Each export's parity facts, as the export stage recorded them."""
        return dict(self.manifest.get("exports") or {})


def read_exports(folder: Path, bundle_md5: str) -> Exports:
    """The exports in ``folder`` (``models/export``) that serve the bundle ``bundle_md5``:
    made from it, passed their parity check, and still the bytes the check saw."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        why = f"no export (run the export stage: {folder.name}/{MANIFEST}: {_reason(exc)})"
        return Exports({}, dict.fromkeys(LOADERS, why), {})
    if manifest.get("bundle_md5") != bundle_md5:
        why = (
            f"{folder.name}/ was exported from bundle md5 {manifest.get('bundle_md5')}, not "
            f"{bundle_md5} (run the export stage)"
        )
        return Exports({}, dict.fromkeys(LOADERS, why), manifest)
    files: dict[str, bytes] = {}
    missing: dict[str, str] = {}
    for name in LOADERS:
        facts = (manifest.get("exports") or {}).get(name)
        if not facts:
            missing[name] = "not exported (export.formats)"
            continue
        if facts.get("passed") is not True:
            missing[name] = "did not pass its parity check"
            continue
        try:
            data = (folder / facts["path"]).read_bytes()
        except OSError as exc:
            missing[name] = f"cannot read {facts['path']}: {_reason(exc)}"
            continue
        if hashlib.md5(data, usedforsecurity=False).hexdigest() != facts.get("md5"):
            missing[name] = f"{facts['path']} is not the file the parity check passed"
            continue
        files[name] = data
    return Exports(files, missing, manifest)


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


# ------------------------------------------------------------------ choosing
def call_seconds(
    runtime: Runtime, size: int, batch: int = 1, calls: int = 30, budget: float = 0.5
) -> float:
    """Median seconds of one call on a ``batch`` of zeros: after two warm-up calls, at most
    ``calls`` calls or ``budget`` seconds, whichever comes first (at least three)."""
    x = np.zeros((batch, size, size, 3), np.float32)
    for _ in range(2):
        runtime(x)
    times: list[float] = []
    deadline = time.perf_counter() + budget
    while len(times) < calls and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        runtime(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


PREFERENCE = ("tflite", "onnx", "keras")  # the order near-ties are settled in
TIE_MARGIN = 0.10  # a runtime within 10% of the fastest call counts as a tie


def pick(timings: dict[str, float]) -> str:
    """The runtime with the lowest time; near-ties (within :data:`TIE_MARGIN` of it) are
    settled by :data:`PREFERENCE`, so that the choice does not flip from one start to the
    next."""
    best = min(timings.values())
    tied = [name for name, t in timings.items() if t <= best * (1 + TIE_MARGIN)]
    return min(tied, key=PREFERENCE.index)


def fastest(runtimes: list[Runtime], size: int) -> tuple[Runtime, dict[str, float]]:
    """The runtime :func:`pick` chooses on median batch-1 calls, and each one's median in ms."""
    timings = {r.name: call_seconds(r, size) * 1000 for r in runtimes}
    name = pick(timings)
    return next(r for r in runtimes if r.name == name), timings
