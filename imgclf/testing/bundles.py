"""Tiny model bundles following the bundle contract (:mod:`imgclf.bundle`), as
``promote`` writes them, and bundles that break it on purpose."""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.bundle import FORMAT, INFO_ENTRY, MODEL_ENTRY, Bundle, write_bundle, write_run_facts
from imgclf.files import file_md5, write_bytes
from imgclf.runtimes import EXPORT_DIR
from imgclf.testing.images import preprocess_options

BUNDLE_NAME = "bundle.zip"
GATE = {"metric": "macro_f1", "min_value": 0.5, "value": 0.75, "passed": True}
METRICS = {"accuracy": 0.8, "macro_f1": 0.75, "roc_auc": 0.9, "pr_auc": 0.85}


def save_tiny_model(path: Path, n_classes: int = 2, size: int = 32, seed: int = 0) -> Path:
    """A real, tiny Keras classifier (0-255 pixels in, softmax out) saved at ``path``."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((size, size, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(n_classes, activation="softmax"),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def bundle_info(
    class_names: tuple[str, ...] = ("safe", "sensitive"),
    size: int = 32,
    threshold: float = 0.4,
    positive_class: str | None = None,
    gate_passed: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """``bundle.json`` as ``promote`` writes it; ``extra`` adds or overrides keys (e.g.
    ``mlflow_run_id``, or ``decode`` with another ``jpeg_quality``)."""
    return {
        "class_names": list(class_names),
        "image_size": size,
        "decode": preprocess_options(size=size).to_dict(),
        "backbone": "tiny-test",
        "operating_point": {
            "positive_class": positive_class or class_names[-1],
            "threshold": threshold,
            "target_recall": 0.9,
        },
        "gate": {**GATE, "passed": gate_passed},
        "metrics": dict(METRICS),
        "data_hash": "test-data-hash",
        "params_digest": "test-params",
        **extra,
    }


def bundle_file(target: Path) -> Path:
    """``target`` itself when it names a ``.zip``, else ``target/bundle.zip``."""
    return target if target.suffix == ".zip" else target / BUNDLE_NAME


def write_raw_bundle(path: Path, info: Any, model_bytes: bytes, fmt: int | None = FORMAT) -> Path:
    """A bundle zip built by hand, *without* :func:`write_bundle`'s checks: for bundles the
    server must refuse (failed gate, missing keys, wrong format...). ``info`` is written as
    given (plus ``format`` unless ``fmt`` is None)."""
    if isinstance(info, dict) and fmt is not None:
        info = {**info, "format": fmt}
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MODEL_ENTRY, model_bytes)
        zf.writestr(INFO_ENTRY, json.dumps(info))
    return path


RUN_FACTS = {
    "mlflow_run_id": None,
    "run_name": "test-run",
    "git_commit": "0123456789abcdef0123456789abcdef01234567",
}


def make_bundle(
    target: Path,
    class_names: tuple[str, ...] = ("safe", "sensitive"),
    size: int = 32,
    seed: int = 0,
    threshold: float = 0.4,
    positive_class: str | None = None,
    gate_passed: bool = True,
    **extra: Any,
) -> Path:
    """Write a bundle holding a real tiny Keras model at ``target`` (a ``.zip`` path, or a
    folder that gets ``bundle.zip``) as ``promote`` would; returns the bundle's path.

    ``gate_passed=False`` gives a bundle whose gate failed: :func:`write_bundle` refuses
    to write one, so that zip is built by hand (:func:`write_raw_bundle`). The run facts
    (``mlflow_run_id``, ``run_name``, ``git_commit``) go beside the bundle, into
    ``bundle.run.json``, as ``promote`` writes them.
    """
    path = bundle_file(target)
    facts = {k: extra.pop(k, default) for k, default in RUN_FACTS.items()}
    info = bundle_info(class_names, size, threshold, positive_class, gate_passed, **extra)
    with tempfile.TemporaryDirectory(prefix="tiny-model-") as tmp:
        model = save_tiny_model(Path(tmp) / "model.keras", len(class_names), size, seed)
        if gate_passed:
            write_bundle(path, model, info)
        else:
            write_raw_bundle(path, info, model.read_bytes())
    write_run_facts(path, {**facts, "bundle_md5": file_md5(path)})
    return path


def replace_atomically(src: Path, dest: Path) -> None:
    """Copy ``src`` over ``dest`` through a temporary file renamed over it (as ``promote``
    and ``dvc checkout`` replace a file: a reader never sees half of it)."""
    write_bytes(dest, src.read_bytes())


def string_values(value: Any) -> list[str]:
    """Every string in a JSON document (keys excluded), at any depth."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in string_values(v)]
    if isinstance(value, list):
        return [s for v in value for s in string_values(v)]
    return []


def export_beside(bundle: Path, quantize: str = "none", seed: int = 0, **bounds: Any) -> Path:
    """Export ``bundle`` as the ``export`` stage does (its own functions, the project's
    ``export`` params with ``quantize`` and ``bounds`` changed) into ``export/`` beside it,
    parity checked on 64 random images instead of a test split; returns the folder.
    Raises :class:`~imgclf.config.StageError` when an export misses its bounds."""
    from imgclf.config import load_params
    from imgclf.pipeline import export

    loaded = Bundle.read(bundle)
    cfg = load_params().export.model_copy(update={"quantize": quantize, **bounds})
    size, n = int(loaded.info["image_size"]), len(loaded.class_names)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (64, size, size, 3)).astype(np.float32)
    batches = [(pixels[i : i + 16], rng.integers(0, n, 16)) for i in range(0, 64, 16)]
    staging = bundle.parent / ".export.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    manifest, parity = export.export_bundle(loaded, staging, cfg, batches, pixels)
    export.check_bounds(parity, cfg)
    return export.publish(staging, manifest, bundle.parent / EXPORT_DIR)
