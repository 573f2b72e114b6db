"""Load a promoted model bundle and classify images through one compiled call.

Every entry point (``predict.py``, HTTP, TCP) goes through :class:`Predictor`: images are
turned into exactly the pixels training saw for them (:func:`imgclf.imaging.serving_input`),
then run in batches through one runtime (:mod:`imgclf.runtimes`): the Keras model behind
a ``tf.function`` with a fixed input signature, or the bundle's TFLite or ONNX export when
the export stage proved its parity; warmed at load time, never ``model.predict`` per
request. ``runtime="auto"`` (the default) times each runtime available for the bundle and
keeps the fastest; ``/version`` says which and why.

Serving loads bundles only (:mod:`imgclf.bundle`): ``models/bundle.zip``, a folder holding
one, or an MLflow URI such as ``models:/imgclf@champion`` whose artifacts hold one. The
model, the class names, the decode settings, the operating threshold and the md5 all come
from one read of one file, so they always belong together. A bundle that did not pass its
quality gate is refused.

Where a bundle file came from (its registry version, MLflow run and git commit) is read
from ``bundle.run.json`` beside it when that describes these very bytes; otherwise (an
older commit checked out, ``dvc exp apply``, a copied file) the registry is asked for the
version tagged with the bundle's md5 (:mod:`imgclf.tracking.registry`): in the
background while the runtime loads, bounded in time, a failure only a warning.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from imgclf import runtimes
from imgclf.bundle import Bundle, BundleError, read_run_facts
from imgclf.config import PATHS
from imgclf.imaging import DecodeOptions, InvalidImage, serving_input
from imgclf.params import ParamsError, load_params
from imgclf.runtimes import EXPORT_DIR, Exports, Runtime, read_exports
from imgclf.serving.version import dvc_lock_record, shown_path
from imgclf.tracking.registry import LOOKUP_TIMEOUT_S, Background, lookup_result, start_lookup
from imgclf.tracking.store import tracking_uri

log = logging.getLogger(__name__)

BUNDLE_FILE = PATHS.bundle.name
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class ModelLoadError(RuntimeError):
    """The model source is missing, incomplete or not promoted; the message says why."""


@dataclass(frozen=True)
class OperatingPoint:
    """Decision rule: ``positive_class`` when its probability is at least ``threshold``."""

    positive_class: str
    threshold: float
    target_recall: float | None = None

    @classmethod
    def from_info(cls, point: dict[str, Any]) -> OperatingPoint:
        """From a bundle's ``operating_point``."""
        return cls(point["positive_class"], float(point["threshold"]), point.get("target_recall"))


@dataclass(frozen=True)
class BundleOrigin:
    """Where a bundle came from: the fields of ``/version`` that are not in its bytes."""

    source: str
    dvc_lock: dict[str, Any] | None = None
    registry: dict[str, Any] | None = None
    mlflow_run_id: str | None = None
    run_name: str | None = None
    git_commit: str | None = None


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """``--model`` and ``--runtime``, as every command that loads a bundle takes them."""
    ap.add_argument(
        "--model",
        default=str(PATHS.bundle),
        help="bundle file (models/bundle.zip) or MLflow URI such as models:/imgclf@champion",
    )
    ap.add_argument(
        "--runtime",
        choices=("auto", *runtimes.RUNTIMES),
        default=None,
        help="keras | tflite | onnx (default: serve.yaml's runtime; auto: the fastest of keras "
        "and the exports that passed parity for the bundle)",
    )


def is_uri(source: str | Path) -> bool:
    """True for an MLflow URI (``models:/name@alias``, ``models:/name/3``, ``runs:/id/path``)."""
    return str(source).startswith(URI_SCHEMES)


def bundle_path(source: str | Path) -> Path:
    """The bundle file of a local source: the file itself, or ``bundle.zip`` in a folder."""
    path = Path(source)
    return path / BUNDLE_FILE if path.is_dir() else path


# ------------------------------------------------------------------ a bundle file
def _read_file(path: Path) -> tuple[Bundle, BundleOrigin, Exports]:
    """A bundle file, with the run facts ``promote`` wrote beside it, its ``dvc.lock``
    record and the exports made from it (``export/`` beside it)."""
    if not path.is_file():
        raise ModelLoadError(
            f"no model bundle at {shown_path(path)}: run `dvc repro` (a model is "
            "served only once promote has passed its quality gate)"
        )
    bundle = Bundle.read(path)
    facts = read_run_facts(path, bundle.md5)
    origin = BundleOrigin(
        source=shown_path(path),
        dvc_lock=dvc_lock_record(path, bundle.md5),
        registry=_registry_record(facts.get("registered")),
        mlflow_run_id=facts.get("mlflow_run_id"),
        run_name=facts.get("run_name"),
        git_commit=facts.get("git_commit"),
    )
    return bundle, origin, read_exports(path.parent / EXPORT_DIR, bundle.md5)


def _registry_record(registered: Any) -> dict[str, Any] | None:
    """``{"name", "version", "alias"}`` of promote's registration in the run facts."""
    if not isinstance(registered, dict) or not registered.get("version"):
        return None
    return {
        "name": registered.get("name"),
        "version": str(registered["version"]),
        "alias": registered.get("alias"),
    }


# ------------------------------------------------------------------ the registry, by md5
Lineage = tuple[str, Background[dict[str, Any] | None]]  # the store's URI, the look-up


def _registry_settings() -> tuple[str, str] | None:
    """``mlflow.registered_model`` and ``mlflow.champion_alias`` of the project's
    ``params.yaml`` (None: no registry, or the file is unusable, with a warning)."""
    try:
        ml = load_params(PATHS.params).mlflow
    except ParamsError as exc:
        log.warning("the bundle's registry version is not looked up: %s", exc)
        return None
    return (ml.registered_model, ml.champion_alias) if ml.registered_model else None


def start_lineage(source: str | Path, origin: BundleOrigin, md5: str) -> Lineage | None:
    """Start looking the bundle up in the registry by its md5 when it is a file whose run
    facts do not give its registry version (None: nothing to look up)."""
    if is_uri(source) or origin.registry is not None:
        return None
    settings = _registry_settings()
    if settings is None:
        return None
    uri = tracking_uri()
    return uri, start_lookup(uri, settings[0], md5, settings[1])


def with_lineage(origin: BundleOrigin, lineage: Lineage | None, md5: str) -> BundleOrigin:
    """``origin`` completed with what the registry look-up found (waiting for it at most
    :data:`~imgclf.tracking.registry.LOOKUP_TIMEOUT_S`); the run facts, when they match
    the bundle, keep precedence."""
    if lineage is None:
        return origin
    found = lookup_result(lineage[1], lineage[0], md5, LOOKUP_TIMEOUT_S)
    if found is None:
        return origin
    return replace(
        origin,
        registry=found["registry"],
        mlflow_run_id=origin.mlflow_run_id or found["mlflow_run_id"],
        run_name=origin.run_name or found["run_name"],
        git_commit=origin.git_commit or found["git_commit"],
    )


# ------------------------------------------------------------------ an MLflow URI
def _download(uri: str) -> tuple[Bundle, Exports]:
    """The bundle among the artifacts behind ``uri``, and the exports beside it (the export
    stage logs them to ``bundle/export/`` of the run that registered the bundle)."""
    import mlflow  # slow import: only when a URI is used

    with tempfile.TemporaryDirectory(prefix="imgclf-bundle-") as tmp:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        found = [got] if got.is_file() else sorted(got.rglob(BUNDLE_FILE))
        if not found:
            raise ModelLoadError(f"{uri} holds no {BUNDLE_FILE}")
        bundle = Bundle.read(found[0])
        return bundle, read_exports(found[0].parent / EXPORT_DIR, bundle.md5)


def _registry_origin(uri: str) -> BundleOrigin:
    """Name, version and alias of a registered model URI, and its run's facts."""
    from mlflow import MlflowClient

    name, _, ref = uri.removeprefix("models:/").partition("/")
    name, _, alias = name.partition("@")
    client = MlflowClient()
    if alias:
        model_version = client.get_model_version_by_alias(name, alias)
    else:
        model_version = client.get_model_version(name, ref)
    run = client.get_run(model_version.run_id)
    return BundleOrigin(
        source=uri,
        registry={"name": name, "version": str(model_version.version), "alias": alias or None},
        mlflow_run_id=model_version.run_id,
        run_name=run.info.run_name,
        git_commit=run.data.tags.get("git_commit"),
    )


def _uri_origin(uri: str) -> BundleOrigin:
    """What the registry says about ``uri`` (informative only: a failed look-up is logged
    and leaves the fields empty)."""
    if not uri.startswith("models:/"):
        return BundleOrigin(source=uri)
    try:
        return _registry_origin(uri)
    except Exception as exc:
        log.warning("cannot look up %s in the registry: %s", uri, exc)
        return BundleOrigin(source=uri)


def _read_uri(uri: str) -> tuple[Bundle, BundleOrigin, Exports]:
    bundle, exports = _download(uri)
    return bundle, _uri_origin(uri), exports


def read_source(source: str | Path) -> tuple[Bundle, BundleOrigin, Exports]:
    """The bundle behind ``source`` (a file, a folder holding one, an MLflow URI), where it
    came from and the exports of it that passed parity; any failure is a
    :class:`ModelLoadError` naming the source as ``/version`` does (never an absolute
    server path: the message reaches ``last_reload_error``)."""
    label = str(source) if is_uri(source) else shown_path(bundle_path(source))
    try:
        return _read_uri(str(source)) if is_uri(source) else _read_file(bundle_path(source))
    except BundleError as exc:
        raise ModelLoadError(f"{label}: {exc}") from None
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load {label}: {type(exc).__name__}: {exc}") from exc


def _decode_options(info: dict[str, Any], max_pixels: int | None) -> DecodeOptions:
    """The bundle's decode settings, its pixel limit tightened (never loosened) to
    ``max_pixels``."""
    options = DecodeOptions.from_dict(info["decode"])
    if max_pixels:
        options = replace(options, max_pixels=min(options.max_pixels, int(max_pixels)))
    return options


def _version(
    bundle: Bundle, origin: BundleOrigin, point: OperatingPoint, runtime: dict[str, Any]
) -> dict[str, Any]:
    """``/version``'s description of a loaded bundle and the runtime that runs it."""
    info = bundle.info
    return {
        **asdict(origin),
        "runtime": runtime,
        "bundle_md5": bundle.md5,
        "class_names": bundle.class_names,
        "image_size": int(info["decode"]["size"]),
        "operating_point": {"positive_class": point.positive_class, "threshold": point.threshold},
        "gate": info["gate"],
        "metrics": info.get("metrics"),
        "data_hash": info.get("data_hash"),
    }


@dataclass
class Predictor:
    """A loaded, compiled bundle with everything needed to turn images into answers."""

    class_names: tuple[str, ...]
    decode: DecodeOptions
    operating_point: OperatingPoint
    info: dict[str, Any]
    version: dict[str, Any]
    _infer: Runtime = field(repr=False)
    loaded_at: float = field(default_factory=time.time)

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(
        cls, source: str | Path | None = None, max_pixels: int | None = None, runtime: str = "auto"
    ) -> Predictor:
        """Load a bundle (default ``models/bundle.zip``) or an MLflow URI on ``runtime``
        (``keras``, ``tflite``, ``onnx``, or ``auto``: the fastest available), warmed.

        ``max_pixels`` tightens (never loosens) the bundle's own decoded-pixel limit.
        """
        source = source or PATHS.bundle
        bundle, origin, exports = read_source(source)
        lineage = start_lineage(source, origin, bundle.md5)  # runs while the runtime loads
        decode = _decode_options(bundle.info, max_pixels)
        point = OperatingPoint.from_info(bundle.info["operating_point"])
        try:
            engine, chosen = choose_runtime(bundle, exports, decode.size, runtime)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{origin.source}: {exc}") from None
        origin = with_lineage(origin, lineage, bundle.md5)
        predictor = cls(
            class_names=tuple(bundle.class_names),
            decode=decode,
            operating_point=point,
            info=bundle.info,
            version=_version(bundle, origin, point, chosen),
            _infer=engine,
        )
        log.info(
            "loaded bundle %s (md5 %s, %d classes, %dpx, %s >= %s) on %s (%s)",
            origin.source, bundle.md5, len(predictor.class_names), decode.size,
            point.positive_class, point.threshold, engine.name, chosen["why"],
        )  # fmt: skip
        return predictor

    def warm(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run the compiled call once per batch size so the first request pays nothing."""
        for n in sorted(set(batch_sizes)):
            self.predict_arrays(np.zeros((n, self.decode.size, self.decode.size, 3), np.uint8))

    # -------------------------------------------------------------- inference
    def decode_image(self, source: bytes | Path) -> np.ndarray:
        """The pixels training saw for this image; raises :class:`InvalidImage` with the
        reason."""
        return serving_input(source, self.decode)

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``(n, classes)`` for a ``(n, size, size, 3)`` batch of pixels."""
        return np.asarray(self._infer(np.ascontiguousarray(batch, np.float32)))

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
        """The decision at the bundle's operating threshold."""
        op = self.operating_point
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


def _keras(bundle: Bundle, size: int) -> Runtime:
    """The bundle's Keras model behind a compiled call."""
    try:
        model = runtimes.load_keras(bundle.model_bytes)
    except ValueError as exc:
        raise ModelLoadError(f"cannot load the bundle's model ({exc})") from exc
    _check_shapes(model, size, len(bundle.class_names))
    return runtimes.KerasRuntime(model, size)


def _exported(name: str, exports: Exports, size: int, n_classes: int) -> Runtime:
    """The export ``name`` of the bundle, loaded and checked to give one value per class."""
    if name not in exports.files:
        why = exports.missing.get(name, "unknown runtime")
        raise ModelLoadError(f"runtime {name} is not available for this bundle: {why}")
    try:
        engine = runtimes.LOADERS[name](exports.files[name])
        shape = engine(np.zeros((1, size, size, 3), np.float32)).shape
    except Exception as exc:
        raise ModelLoadError(f"cannot run the {name} export: {type(exc).__name__}: {exc}") from exc
    if shape != (1, n_classes):
        raise ModelLoadError(f"the {name} export gives {shape} for one image, not (1, {n_classes})")
    return engine


def _requested(wanted: str, bundle: Bundle, exports: Exports, size: int) -> Runtime:
    """The runtime named ``wanted``; :class:`ModelLoadError` when it cannot run the bundle."""
    if wanted == "keras":
        return _keras(bundle, size)
    if wanted not in runtimes.RUNTIMES:
        raise ModelLoadError(
            f"unknown runtime {wanted!r}: choose auto, {', '.join(runtimes.RUNTIMES)}"
        )
    return _exported(wanted, exports, size, len(bundle.class_names))


def choose_runtime(
    bundle: Bundle, exports: Exports, size: int, wanted: str
) -> tuple[Runtime, dict[str, Any]]:
    """The runtime ``wanted``, or for ``auto`` the fastest batch-1 call (timed here) of Keras
    and the exports that passed parity; plus ``/version``'s account of the choice."""
    parity = exports.parity()
    if wanted != "auto":
        engine = _requested(wanted, bundle, exports, size)
        return engine, {"name": wanted, "requested": wanted, "why": "requested",
                        "parity": parity.get(wanted)}  # fmt: skip
    candidates = [_keras(bundle, size)]
    candidates += [_exported(n, exports, size, len(bundle.class_names)) for n in exports.files]
    timings = None
    if len(candidates) == 1:
        best = candidates[0]
        why = (
            "the only runtime (" + "; ".join(f"{k}: {v}" for k, v in exports.missing.items()) + ")"
        )
    else:
        best, timings = runtimes.fastest(candidates, size)
        ranked = sorted(timings.items(), key=lambda kv: kv[1])
        why = "fastest batch-1 call: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ranked)
        why += " (within 10%: tflite, onnx, keras in that order)"
    account = {"name": best.name, "requested": "auto", "why": why, "timings_ms": timings,
               "unavailable": dict(exports.missing), "parity": parity.get(best.name)}  # fmt: skip
    return best, account


def _check_shapes(model: Any, size: int, n_classes: int) -> None:
    """The model must take ``size`` x ``size`` RGB pixels and output one value per class."""
    shape = tuple(model.input_shape)
    if shape[1:] != (size, size, 3):
        raise ModelLoadError(f"the bundle's model takes {shape[1:]}, its info says {size}x{size}x3")
    if int(model.output_shape[-1]) != n_classes:
        raise ModelLoadError(
            f"the bundle's model outputs {model.output_shape[-1]} values for {n_classes} classes"
        )
