"""Load a trained model with its metadata and classify images through one compiled call.

Every entry point (``predict.py``, HTTP, TCP) goes through :class:`Predictor`: images are
decoded by :mod:`stages.imaging` exactly as ``preprocess`` decoded the training images, then
run in batches through a ``tf.function`` with a fixed input signature (traced once, warmed at
load time), never ``model.predict`` per request.

A model is found from a *source*: a folder holding ``model.keras`` and ``metadata.json`` (the
``train`` stage's ``models/``), or an MLflow URI such as ``models:/name/3`` whose artifacts
are downloaded first. The operating point (``operating_point.json``, written by ``report``)
is looked for beside the model, then in ``../metrics/``; without it the decision is the top
class, and the response says so.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from serve.version import model_version_info
from stages.config import PATHS
from stages.imaging import DecodeOptions, InvalidImage, decode_array

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
OPERATING_POINT_FILE = "operating_point.json"
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class ModelLoadError(RuntimeError):
    """The model source is missing, incomplete or inconsistent; the message says why."""


@dataclass(frozen=True)
class OperatingPoint:
    """Decision rule: ``positive_class`` when its probability is at least ``threshold``."""

    positive_class: str
    threshold: float
    target_recall: float | None = None


@dataclass(frozen=True)
class ModelFiles:
    """The files one loaded model came from (watched for changes by the server)."""

    model: Path
    metadata: Path
    operating_point: Path | None


def is_uri(source: str | Path) -> bool:
    """True for an MLflow URI (``models:/name/version``, ``runs:/id/path``)."""
    return str(source).startswith(URI_SCHEMES)


def _find_one(root: Path, name: str) -> Path | None:
    hits = sorted(root.rglob(name), key=lambda p: (len(p.parts), str(p)))
    return hits[0] if hits else None


def _download(uri: str) -> Path:
    """Download an MLflow model's artifacts into a fresh temporary folder."""
    import mlflow  # slow import: only when a URI is used

    dst = Path(tempfile.mkdtemp(prefix="imgclf-model-"))
    log.info("downloading %s from MLflow (tracking %s)", uri, mlflow.get_tracking_uri())
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as exc:
        raise ModelLoadError(f"cannot download {uri} from MLflow: {exc}") from exc


def _mlflow_run_id(uri: str) -> str | None:
    """Run id of a registered model version (``models:/name/version``), when there is one."""
    if not uri.startswith("models:/"):
        return uri.split("/")[1] if uri.startswith("runs:/") else None
    try:
        from mlflow import MlflowClient

        name, _, ref = uri.removeprefix("models:/").partition("/")
        client = MlflowClient()
        if ref.isdigit():
            return client.get_model_version(name, ref).run_id
        if ref.startswith("@"):
            return client.get_model_version_by_alias(name, ref[1:]).run_id
    except Exception as exc:  # the run id is informative only
        log.warning("cannot look up the run of %s: %s", uri, exc)
    return None


def _fetch_run_files(run_id: str, names: tuple[str, ...], dst: Path) -> None:
    """Download files called ``names`` logged anywhere in the run (e.g. ``train/metadata.json``
    and ``report/operating_point.json`` as the pipeline logs them) into ``dst``."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    folders = [""]
    while folders:
        folder = folders.pop()
        for item in client.list_artifacts(run_id, folder or None):
            if item.is_dir:
                folders.append(item.path)
            elif Path(item.path).name in names and not (dst / Path(item.path).name).exists():
                got = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=item.path, dst_path=str(dst / "run")
                )
                Path(got).replace(dst / Path(item.path).name)


def _metadata_from_mlmodel(root: Path) -> dict[str, Any] | None:
    """``mlflow.keras.log_model(..., metadata=...)`` keeps our metadata in ``MLmodel``."""
    import yaml

    mlmodel = _find_one(root, "MLmodel")
    if mlmodel is None:
        return None
    meta = (yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}).get("metadata")
    return meta if isinstance(meta, dict) and "class_names" in meta else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return value


def read_operating_point(path: Path, class_names: Sequence[str]) -> OperatingPoint:
    """Parse and check ``operating_point.json`` against the model's classes."""
    raw = _read_json(path)
    try:
        op = OperatingPoint(
            positive_class=str(raw["positive_class"]),
            threshold=float(raw["threshold"]),
            target_recall=(
                float(raw["target_recall"]) if raw.get("target_recall") is not None else None
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: needs positive_class and a numeric threshold") from exc
    if op.positive_class not in class_names:
        raise ModelLoadError(
            f"{path}: positive_class {op.positive_class!r} is not one of {list(class_names)}"
        )
    if not 0.0 <= op.threshold <= 1.0:
        raise ModelLoadError(f"{path}: threshold {op.threshold} is not within 0..1")
    return op


def default_operating_point(model_dir: Path) -> Path | None:
    """``operating_point.json`` beside the model, else the project's ``metrics/`` one."""
    for candidate in (
        model_dir / OPERATING_POINT_FILE,
        model_dir.parent / PATHS.operating_point.relative_to(PATHS.root),
    ):
        if candidate.is_file():
            return candidate
    return None


def decode_options(meta: dict[str, Any]) -> DecodeOptions:
    """The ``decode`` block of ``metadata.json`` as :class:`DecodeOptions`."""
    dec = meta.get("decode") or {}
    size = int(dec.get("size", meta.get("image_size", DecodeOptions.size)))
    return DecodeOptions(
        size=size,
        mode=str(dec.get("mode", DecodeOptions.mode)),
        background=tuple(int(c) for c in dec.get("background", DecodeOptions.background)),
        max_pixels=int(dec.get("max_pixels", DecodeOptions.max_pixels)),
        formats=tuple(str(f).upper() for f in dec.get("formats", DecodeOptions.formats)),
    )


@dataclass
class Predictor:
    """A loaded, compiled model with everything needed to turn images into answers."""

    source: str
    class_names: tuple[str, ...]
    decode: DecodeOptions
    operating_point: OperatingPoint | None
    metadata: dict[str, Any]
    files: ModelFiles
    version: dict[str, Any]
    _infer: Any = field(repr=False)
    loaded_at: float = field(default_factory=time.time)

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        source: str | Path | None = None,
        operating_point: Path | None = None,
        max_pixels: int | None = None,
    ) -> Predictor:
        """Load from a model folder (default ``models/``) or an MLflow URI, compiled.

        ``max_pixels`` tightens (never loosens) the model's own decoded-pixel limit.
        """
        source = source or PATHS.models
        run_id: str | None = None
        if is_uri(source):
            model_dir = _download(str(source))
            run_id = _mlflow_run_id(str(source))
            wanted = tuple(
                name
                for name in (METADATA_FILE, OPERATING_POINT_FILE)
                if _find_one(model_dir, name) is None
            )
            if run_id and wanted:
                try:
                    _fetch_run_files(run_id, wanted, model_dir)
                except Exception as exc:  # fall back to what the model itself carries
                    log.warning("cannot fetch %s from run %s: %s", wanted, run_id, exc)
        else:
            model_dir = Path(source)
            if model_dir.is_file():  # a path to model.keras itself
                model_dir = model_dir.parent
            if not model_dir.is_dir():
                raise ModelLoadError(f"model folder not found: {model_dir}")
        model_file = (
            model_dir / MODEL_FILE if (model_dir / MODEL_FILE).is_file() else None
        ) or _find_one(model_dir, "*.keras")
        if model_file is None:
            raise ModelLoadError(f"no {MODEL_FILE} in {model_dir}")
        meta_file = model_dir / METADATA_FILE
        if not meta_file.is_file():
            meta_file = _find_one(model_dir, METADATA_FILE) or meta_file
        if meta_file.is_file():
            meta = _read_json(meta_file)
        else:
            meta = _metadata_from_mlmodel(model_dir) if is_uri(source) else None
            if meta is None:
                raise ModelLoadError(f"no {METADATA_FILE} beside {model_file}")
        class_names = tuple(str(c) for c in meta.get("class_names") or ())
        if len(class_names) < 2:
            raise ModelLoadError(f"{meta_file}: class_names must list at least two classes")
        try:
            options = decode_options(meta)
            if max_pixels:
                options = replace(options, max_pixels=min(options.max_pixels, int(max_pixels)))
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{meta_file}: bad decode options: {exc}") from exc
        op_file = operating_point or default_operating_point(model_dir)
        if op_file is None and is_uri(source):
            op_file = _find_one(model_dir, OPERATING_POINT_FILE)
        op = read_operating_point(op_file, class_names) if op_file else None
        if op is None:
            log.warning("no %s found: decisions will be the top class", OPERATING_POINT_FILE)
        files = ModelFiles(model=model_file, metadata=meta_file, operating_point=op_file)
        version = model_version_info(model_file, op_file)
        version["mlflow_run_id"] = meta.get("mlflow_run_id") or run_id
        version["source"] = str(source)
        version["class_names"] = list(class_names)
        infer = _compile(model_file, options.size, len(class_names))
        log.info("loaded %s (%d classes, %dpx)", model_file, len(class_names), options.size)
        return cls(str(source), class_names, options, op, meta, files, version, infer)

    def warm(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run the compiled call once per batch size so the first request pays nothing."""
        for n in sorted(set(batch_sizes)):
            self.predict_arrays(np.zeros((n, self.decode.size, self.decode.size, 3), np.uint8))

    # -------------------------------------------------------------- inference
    def decode_image(self, source: bytes | Path) -> np.ndarray:
        """Decode one image for this model; raises :class:`InvalidImage` with the reason."""
        return decode_array(source, self.decode)

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``(n, classes)`` for a ``(n, size, size, 3)`` batch of pixels."""
        return np.asarray(self._infer(batch.astype(np.float32, copy=False)))

    def describe(self, probs: np.ndarray) -> dict[str, Any]:
        """One image's answer: probabilities, top class and the thresholded decision."""
        probabilities = {c: float(p) for c, p in zip(self.class_names, probs, strict=True)}
        top = max(probabilities, key=probabilities.__getitem__)
        return {
            "probabilities": probabilities,
            "top_class": top,
            "top_probability": probabilities[top],
            "decision": self.decide(probabilities),
        }

    def decide(self, probabilities: dict[str, float]) -> dict[str, Any]:
        """Thresholded decision; without an operating point, the top class."""
        op = self.operating_point
        if op is None:
            return {
                "label": max(probabilities, key=probabilities.__getitem__),
                "rule": "argmax",
                "threshold": None,
                "note": f"no {OPERATING_POINT_FILE} with the model: decision is the top class",
            }
        positive = probabilities[op.positive_class] >= op.threshold
        others = {c: p for c, p in probabilities.items() if c != op.positive_class}
        return {
            "label": op.positive_class if positive else max(others, key=others.__getitem__),
            "rule": "threshold",
            "positive_class": op.positive_class,
            "threshold": op.threshold,
            "positive": bool(positive),
        }

    def predict_paths(
        self, paths: Sequence[Path], batch_size: int = 32
    ) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Classify files in batches; an undecodable file yields ``{"error": reason}``."""
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            arrays: list[np.ndarray] = []
            answers: dict[int, dict[str, Any]] = {}
            for i, path in enumerate(chunk):
                try:
                    arrays.append(self.decode_image(path))
                except (InvalidImage, OSError) as exc:
                    answers[i] = {"error": str(exc)}
            probs = iter(self.predict_arrays(np.stack(arrays)) if arrays else ())
            for i, path in enumerate(chunk):
                yield path, answers.get(i) or self.describe(next(probs))


def _compile(model_file: Path, size: int, n_classes: int) -> Any:
    """Load the Keras model and wrap it in a ``tf.function`` with a fixed signature."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    try:
        model = keras.models.load_model(model_file, compile=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {model_file}: {exc}") from exc
    shape = tuple(model.input_shape)
    if shape[1:] != (size, size, 3):
        raise ModelLoadError(f"{model_file} takes {shape[1:]}, metadata says {size}x{size}x3")
    if int(model.output_shape[-1]) != n_classes:
        raise ModelLoadError(
            f"{model_file} outputs {model.output_shape[-1]} values for {n_classes} classes"
        )

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def infer(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=False)

    return infer  # the closure keeps the model alive
