"""Model artifacts following the project's contracts, for the serving and memory figures.

- :func:`write_candidate`: what ``train`` writes and ``report`` reads,
  ``models/candidate/model.keras`` (``(None, size, size, 3)`` pixels 0-255 in, class
  probabilities out) and ``models/candidate/metadata.json``;
- :func:`write_served_bundle`: what ``promote`` writes and the server loads,
  ``models/bundle.zip`` (:mod:`imgclf.bundle`: the model plus ``bundle.json`` with the
  decode settings, an operating threshold and a passed gate).

The network is the project's own :func:`imgclf.pipeline.model.build_model` (untrained
weights: speed and memory, not accuracy, are measured); the decode settings are
``params.yaml``'s at the benchmark's size. The bundle's gate and metrics are marked as the
benchmark's, not measured ones.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from imgclf.bundle import write_bundle
from imgclf.config import digest
from imgclf.files import write_json
from imgclf.testing.images import preprocess_options

CLASS_NAMES = ("safe", "sensitive")
MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
BUNDLE_FILE = "bundle.zip"


def build(size: int, backbone: str) -> Any:
    """The project's classifier, uncompiled."""
    from imgclf.pipeline.model import build_model  # imports TensorFlow: only when building

    return build_model(size, len(CLASS_NAMES), backbone=backbone, weights="none", seed=0)


def save_model(path: Path, size: int, backbone: str = "small_cnn") -> Path:
    """Build the classifier and save it as a ``.keras`` file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    build(size, backbone).save(path)
    return path


def metadata(size: int, backbone: str) -> dict[str, Any]:
    """``metadata.json`` as ``train`` writes it for a candidate."""
    return {
        "class_names": list(CLASS_NAMES),
        "class_counts": dict.fromkeys(CLASS_NAMES, 1),
        "image_size": size,
        "decode": preprocess_options(size=size).to_dict(),
        "backbone": backbone,
        "params_digest": digest({"bench": backbone, "size": size}),
        "data_hash": "benchmark",
        "git_commit": None,
        "mlflow_run_id": None,
        "run_name": f"bench-{backbone}-{size}",
    }


def bundle_info(size: int, backbone: str) -> dict[str, Any]:
    """``bundle.json`` as ``promote`` writes it (threshold and gate are placeholders)."""
    meta = metadata(size, backbone)
    keys = ("class_names", "image_size", "decode", "backbone", "data_hash", "params_digest")
    return {
        **{k: meta[k] for k in keys},
        "operating_point": {
            "positive_class": CLASS_NAMES[-1],
            "threshold": 0.5,
            "target_recall": None,
        },
        "gate": {"metric": "accuracy", "min_value": 0.0, "value": None, "passed": True},
        "metrics": {},
        "git_commit": None,
        "mlflow_run_id": None,
        "run_name": meta["run_name"],
    }


def write_candidate(folder: Path, size: int, backbone: str = "small_cnn") -> Path:
    """``model.keras`` + ``metadata.json`` in ``folder`` (a ``models/candidate``)."""
    save_model(folder / MODEL_FILE, size, backbone)
    write_json(folder / METADATA_FILE, metadata(size, backbone))
    return folder


def write_served_bundle(
    path: Path, size: int, backbone: str = "small_cnn", model_file: Path | None = None
) -> Path:
    """The bundle the server loads, at ``path``; from ``model_file`` when given (so a
    baseline can serve the very same model), else from a freshly built model."""
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        model = model_file or save_model(Path(tmp) / MODEL_FILE, size, backbone)
        write_bundle(path, model, bundle_info(size, backbone))
    return path
