"""A model artifact following the project's contract, for the serving and report figures.

``models/model.keras`` takes ``(None, size, size, 3)`` pixels 0-255 and outputs class
probabilities; ``models/metadata.json`` holds ``class_names``, ``image_size``, ``decode``,
``backbone``, ``params_digest``, ``data_hash``, ``mlflow_run_id`` and ``created``. The
network is the project's own :func:`stages.model.build_model` (untrained weights: speed,
not accuracy, is measured), falling back to a small CNN if that module is not there.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from stages.config import digest
from stages.imaging import DecodeOptions

log = logging.getLogger(__name__)

CLASS_NAMES = ("safe", "sensitive")


def build(size: int, backbone: str) -> Any:
    """The project's classifier (or a stand-in CNN), uncompiled."""
    import keras

    try:
        from stages.model import build_model
    except ImportError:
        log.warning("stages.model not found: using a stand-in CNN")
        inputs = keras.Input((size, size, 3))
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Conv2D(16, 3, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(len(CLASS_NAMES), activation="softmax")(x))
    return build_model(size, len(CLASS_NAMES), backbone=backbone, weights="none", seed=0)


def write_model(models: Path, size: int, backbone: str = "small_cnn") -> Path:
    """Write ``model.keras`` + ``metadata.json`` into ``models``; returns the folder."""
    models.mkdir(parents=True, exist_ok=True)
    model = build(size, backbone)
    model.save(models / "model.keras")
    options = DecodeOptions(size=size)
    meta = {
        "class_names": list(CLASS_NAMES),
        "image_size": size,
        "decode": options.to_dict(),
        "backbone": backbone,
        "params_digest": digest({"bench": backbone, "size": size}),
        "data_hash": "benchmark",
        "mlflow_run_id": None,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    (models / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return models
