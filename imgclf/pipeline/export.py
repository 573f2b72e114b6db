"""Stage ``export``: the promoted bundle as SavedModel, TFLite and ONNX, with proven parity.

Reads ``models/bundle.zip`` (only what passed the quality gate is ever exported), removes
the training-only layers (augmentation, dropout: :func:`~imgclf.pipeline.export_formats.
inference_model`) and writes ``models/export/``:

- ``saved_model/`` (TensorFlow Serving, TF.js converters), ``model.tflite`` (LiteRT:
  phones, edge boxes), ``model.onnx`` (ONNX Runtime: any language), as ``export.formats``
  asks; plus ``model_dynamic.tflite`` or ``model_int8.tflite`` with ``export.quantize``;
- ``bundle.json``: the bundle's own info (class names, input size, decode settings,
  operating threshold), the md5 of the bundle it was made from and each file's md5, size
  and parity facts. Serving uses an export only when both md5s still match.

Every export runs the whole test split next to the bundle's Keras model: the largest
absolute difference of any probability, the share of decisions at the operating threshold
that agree, and accuracy against the labels. A float export (SavedModel, TFLite, ONNX) must
stay within ``export.max_abs_diff`` and agree on at least ``export.min_agreement`` of the
decisions, else the stage fails naming each miss and ``models/export/`` is not written
(``metrics/export.json`` still shows the figures). A quantised variant's parity and
accuracy change are reported, never required. Figures go to ``metrics/export.json`` (a
``dvc metrics`` file) and, with the files, to the MLflow run that promoted the bundle.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from imgclf import runtimes
from imgclf.bundle import Bundle, BundleError, read_run_facts
from imgclf.config import (
    PATHS,
    StageError,
    import_tensorflow,
    load_params,
    setup_logging,
    stage_main,
)
from imgclf.files import write_json
from imgclf.params import Export
from imgclf.pipeline import export_formats as formats
from imgclf.pipeline.dataset import encode_labels, make_dataset, read_list
from imgclf.pipeline.operating_point import decisions_at_threshold

log = logging.getLogger(__name__)

Call = Callable[[np.ndarray], np.ndarray]
Batch = tuple[np.ndarray, np.ndarray]  # pixels, labels


@dataclass
class Parity:
    """One export against the Keras model, accumulated batch by batch over the test split."""

    quantized: bool
    max_abs_diff: float = 0.0
    agree: int = 0
    correct: int = 0
    keras_correct: int = 0
    images: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, keras: np.ndarray, probs: np.ndarray, labels: np.ndarray, rule: Rule) -> None:
        """Fold in one batch: Keras' and the export's probabilities for the same pixels."""
        ours, theirs = rule.decide(keras), rule.decide(probs)
        self.max_abs_diff = max(self.max_abs_diff, float(np.abs(probs - keras).max()))
        self.agree += int((ours == theirs).sum())
        self.correct += int((theirs == labels).sum())
        self.keras_correct += int((ours == labels).sum())
        self.images += len(labels)

    def facts(self, cfg: Export) -> dict[str, Any]:
        """``metrics/export.json``'s entry: the figures, and for float exports the verdict."""
        n = max(self.images, 1)
        out = {
            "max_abs_diff": self.max_abs_diff,
            "decision_agreement": round(self.agree / n, 6),
            "accuracy": round(self.correct / n, 6),
            "accuracy_delta": round((self.correct - self.keras_correct) / n, 6),
        }
        if not self.quantized:
            out["passed"] = not self.misses(cfg)
        return out

    def misses(self, cfg: Export) -> list[str]:
        """What breaks the float bounds, in words (empty: within them)."""
        if self.quantized:
            return []
        n = max(self.images, 1)
        found = []
        if self.max_abs_diff > cfg.max_abs_diff:
            found.append(f"max |p - p_keras| {self.max_abs_diff:.3g} > {cfg.max_abs_diff:g}")
        if self.agree / n < cfg.min_agreement:
            found.append(
                f"{self.images - self.agree} of {self.images} decisions differ (agreement "
                f"{self.agree / n:.4f} < {cfg.min_agreement:g})"
            )
        return found


@dataclass(frozen=True)
class Rule:
    """The bundle's decision rule: its positive class at its threshold."""

    positive: int
    threshold: float

    def decide(self, probs: np.ndarray) -> np.ndarray:
        return decisions_at_threshold(probs, self.positive, self.threshold)


def file_names(cfg: Export) -> dict[str, str]:
    """Export name -> file (or folder) name in ``models/export``, in writing order (the float
    TFLite file first: ONNX is converted from it)."""
    names = {f: runtimes.FILES[f] for f in ("tflite", "saved_model", "onnx") if f in cfg.formats}
    if cfg.quantize != "none":
        names[f"tflite_{cfg.quantize}"] = f"model_{cfg.quantize}.tflite"
    return names


def write_exports(
    model: Any, folder: Path, cfg: Export, representative: np.ndarray | None
) -> dict[str, Path]:
    """Every export ``cfg`` asks for, written into ``folder``; name -> path."""
    folder.mkdir(parents=True)
    paths: dict[str, Path] = {}
    scratch = folder / ".float.tflite"  # ONNX's source when TFLite itself is not wanted
    for name, file in file_names(cfg).items():
        path = folder / file
        log.info("writing %s", file)
        if name == "saved_model":
            formats.write_saved_model(model, path)
        elif name == "tflite":
            formats.write_tflite(model, path)
        elif name == "onnx":
            source = paths.get("tflite") or formats.write_tflite(model, scratch)
            formats.write_onnx(source, path, cfg.onnx_opset)
        else:
            formats.write_tflite(model, path, cfg.quantize, representative)
        paths[name] = path
    scratch.unlink(missing_ok=True)
    return paths


def load_calls(paths: dict[str, Path]) -> dict[str, Call]:
    """Each written export as a callable, loaded from its file as a user would."""
    calls: dict[str, Call] = {}
    for name, path in paths.items():
        if name == "saved_model":
            calls[name] = formats.saved_model_call(path)
        elif name == "onnx":
            calls[name] = runtimes.OnnxRuntime(path.read_bytes())
        else:
            calls[name] = runtimes.TfliteRuntime(path.read_bytes())
    return calls


def check_parity(
    keras: Call,
    calls: dict[str, Call],
    batches: Iterable[Batch],
    rule: Rule,
) -> dict[str, Parity]:
    """Every export against ``keras`` on the same ``(pixels, labels)`` batches."""
    found = {name: Parity(quantized=name.startswith("tflite_")) for name in calls}
    for pixels, labels in batches:
        pixels = np.ascontiguousarray(pixels, np.float32)
        reference = keras(pixels)
        for name, call in calls.items():
            found[name].add(reference, call(pixels), labels, rule)
    return found


def export_manifest(
    bundle: Bundle, paths: dict[str, Path], parity: dict[str, Parity], cfg: Export
) -> dict[str, Any]:
    """``models/export/bundle.json``: the bundle's info, its md5, and per export its file,
    md5, size and parity."""
    exports = {
        name: {
            "path": path.name,
            "md5": runtimes.tree_md5(path),
            "bytes": runtimes.folder_bytes(path),
            **parity[name].facts(cfg),
        }
        for name, path in paths.items()
    }
    return {**bundle.info, "bundle_md5": bundle.md5, "exports": exports}


def export_bundle(
    bundle: Bundle,
    folder: Path,
    cfg: Export,
    batches: Iterable[Batch],
    representative: np.ndarray | None = None,
) -> tuple[dict[str, Any], dict[str, Parity]]:
    """Write ``bundle``'s exports into ``folder`` and check each against its Keras model on
    ``batches``; returns ``bundle.json``'s content (not written: the caller decides, after
    looking at the parity) and the parity per export."""
    classes, op = bundle.class_names, bundle.info["operating_point"]
    rule = Rule(classes.index(op["positive_class"]), float(op["threshold"]))
    model = runtimes.load_keras(bundle.model_bytes)
    log.info(
        "exporting bundle md5 %s without its training-only layers %s",
        bundle.md5, formats.training_only_layers(model),
    )  # fmt: skip
    paths = write_exports(formats.inference_model(model), folder, cfg, representative)
    keras = runtimes.KerasRuntime(model, int(bundle.info["image_size"]))
    parity = check_parity(keras, load_calls(paths), batches, rule)
    return export_manifest(bundle, paths, parity, cfg), parity


def export_metrics(manifest: dict[str, Any], parity: dict[str, Parity]) -> dict[str, Any]:
    """``metrics/export.json``: the test images, Keras' accuracy at the threshold, and per
    export its parity figures and size."""
    first = next(iter(parity.values()))
    per_export = {
        name: {k: v for k, v in facts.items() if k not in ("path", "md5")}
        for name, facts in manifest["exports"].items()
    }
    keras_accuracy = round(first.keras_correct / max(first.images, 1), 6)
    return {"test_images": first.images, "keras_accuracy": keras_accuracy, **per_export}


def describe(name: str, facts: dict[str, Any]) -> str:
    """One export's line in the log."""
    verdict = {True: ", passed", False: ", FAILED"}.get(facts.get("passed"), " (not required)")
    return (
        f"{name} ({facts['path']}, {facts['bytes']:,} bytes): max |p - p_keras| "
        f"{facts['max_abs_diff']:.2g}, decisions agree {facts['decision_agreement']:.2%}, "
        f"accuracy {facts['accuracy']:.4f} ({facts['accuracy_delta']:+.4f}){verdict}"
    )


def check_bounds(parity: dict[str, Parity], cfg: Export) -> None:
    """A :class:`StageError` naming every float export outside its bounds."""
    found = {name: p.misses(cfg) for name, p in parity.items()}
    misses = [f"{name}: {'; '.join(why)}" for name, why in found.items() if why]
    if misses:
        images = next(iter(parity.values())).images
        raise StageError(
            f"export parity failed on {images} test images ({' | '.join(misses)}); "
            "models/export/ is not written (figures in metrics/export.json)"
        )


def publish(staging: Path, manifest: dict[str, Any], target: Path) -> Path:
    """Write ``bundle.json`` into ``staging`` and make it ``target`` in one rename (a reader
    never sees half an export)."""
    write_json(staging / runtimes.MANIFEST, manifest)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.info("wrote %s for bundle md5 %s", target.name, manifest["bundle_md5"])
    return target


def representative_images(cfg: Export, seed: int, image_size: int) -> np.ndarray | None:
    """``cfg.representative_images`` train images (seeded), for int8 calibration only."""
    if cfg.quantize != "int8":
        return None
    listed = read_list(PATHS.split_list("train"))
    files = listed.files(PATHS.root)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(files), min(cfg.representative_images, len(files)), False))
    picked = [files[i] for i in chosen]
    ds = make_dataset(picked, np.zeros(len(picked)), image_size, cfg.batch_size, cache=False)
    return np.concatenate([x.numpy() for x, _ in ds])


def test_batches(class_names: list[str], image_size: int, batch_size: int) -> Iterable[Batch]:
    """The whole test split as ``(pixels, labels)`` batches, decoded as training read them,
    with a progress bar (on a terminal)."""
    listed = read_list(PATHS.split_list("test"))
    if not listed.paths:
        raise StageError("the test list is empty: rerun the split stage")
    labels = encode_labels(listed.labels, class_names)
    ds = make_dataset(listed.files(PATHS.root), labels, image_size, batch_size, cache=False)
    return _numpy_batches(ds, len(labels))


def _numpy_batches(ds: Any, total: int) -> Iterator[Batch]:
    with tqdm(total=total, desc="export parity", unit="img", disable=None) as bar:
        for x, y in ds:
            bar.update(len(y))
            yield x.numpy(), y.numpy()


def read_bundle() -> Bundle:
    """The promoted bundle; a clear error when there is none."""
    try:
        return Bundle.read(PATHS.bundle)
    except BundleError as exc:
        raise StageError(f"models/bundle.zip: {exc} (run promote first)") from None


def log_to_mlflow(bundle: Bundle, metrics: dict[str, Any], experiment: str) -> Any:
    """Log the exports and their figures to the run that promoted the bundle (none: skip)."""
    from imgclf import tracking

    facts = read_run_facts(PATHS.bundle, bundle.md5)
    if not facts.get("run_name"):
        log.warning("models/bundle.run.json does not describe this bundle: not logged to MLflow")
        return None
    link = {**facts, "run_id": facts.get("mlflow_run_id"), "data_hash": bundle.info["data_hash"]}
    run = tracking.resume(link, experiment)
    with tracking.taken(run):
        per_export = {k: v for k, v in metrics.items() if isinstance(v, dict)}
        run.log_metrics(
            {f"export_{name}_{k}": float(v) for name, f in per_export.items() for k, v in f.items()}
        )
        run.log_artifact(PATHS.export_dir, "bundle")  # bundle/export/, beside bundle.zip
        run.log_artifact(PATHS.export_metrics)
    return run


@stage_main
def main() -> None:
    params = load_params()
    setup_logging(params.base.log_level)
    cfg, bundle = params.export, read_bundle()
    size = int(bundle.info["image_size"])
    import_tensorflow()
    staging = PATHS.models / ".export.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    representative = representative_images(cfg, params.base.seed, size)
    batches = test_batches(bundle.class_names, size, cfg.batch_size)
    try:
        manifest, parity = export_bundle(bundle, staging, cfg, batches, representative)
        metrics = export_metrics(manifest, parity)
        write_json(PATHS.export_metrics, metrics)
        for name, facts in manifest["exports"].items():
            log.info("%s", describe(name, facts))
        check_bounds(parity, cfg)
        publish(staging, manifest, PATHS.export_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    run = log_to_mlflow(bundle, metrics, params.mlflow.experiment)
    if run is not None:
        from imgclf import tracking

        tracking.check_required(run, params.mlflow.required)


if __name__ == "__main__":
    sys.exit(main())
