"""The classifier: ``build_model`` and its backbones (pure Keras 3, built-in layers only).

The saved model takes uint8-range pixels ``(None, size, size, 3)`` and returns softmax
probabilities. Everything between (augmentation, active only in training; resizing to the
backbone's input size; the backbone's own ``preprocess_input`` range) is a layer inside it,
so serving feeds decoded pixels and cannot drift from training.

Backbones (``train.backbone``): ``small_cnn`` (default; fast on 2 CPU cores at 32x32),
``mobilenetv2``, ``efficientnetb0``, ``inceptionv3`` (``keras.applications``).
Weights (``train.weights``): ``none`` (random init), ``imagenet`` (downloaded by Keras;
needs the internet, fails loudly otherwise, never falls back), or a path to a local weights
file of the backbone (``backbone.save_weights("x.weights.h5")`` or a Keras ``.h5``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
from keras import layers

BACKBONE_LAYER = "backbone"


def _small_cnn(
    input_shape: tuple[int, int, int], filters: Sequence[int], dense: int
) -> keras.Model:
    """Conv/ReLU/max-pool blocks, flattened (where a feature is matters in a small image),
    then a dense layer: ~290k parameters for 32x32 inputs and the default sizes. No
    BatchNorm: its moving statistics made validation erratic on small data sets."""
    inputs = keras.Input(input_shape)
    x = inputs
    for i, f in enumerate(filters):
        x = layers.Conv2D(int(f), 3, padding="same", activation="relu", name=f"conv{i}")(x)
        if i < len(filters) - 1:
            x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(int(dense), activation="relu", name="dense")(x)
    return keras.Model(inputs, x, name=BACKBONE_LAYER)


def _application(factory: Callable[..., keras.Model]) -> Callable[..., keras.Model]:
    def make(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
        return factory(
            include_top=False,
            weights=weights,
            input_shape=input_shape,
            pooling="avg",
            name=BACKBONE_LAYER,
        )

    return make


# name -> (native input size, minimum input size, preprocess scale, offset, factory)
# scale/offset map 0-255 pixels to the range the backbone's preprocess_input expects;
# EfficientNet rescales inside itself, so it gets raw 0-255 (scale None).
BACKBONES: dict[str, dict[str, Any]] = {
    "small_cnn": {"native": None, "min": 8, "scale": 1 / 255.0, "offset": 0.0},
    "mobilenetv2": {
        "native": 224,
        "min": 32,
        "scale": 1 / 127.5,
        "offset": -1.0,
        "factory": _application(keras.applications.MobileNetV2),
    },
    "efficientnetb0": {
        "native": 224,
        "min": 32,
        "scale": None,
        "offset": 0.0,
        "factory": _application(keras.applications.EfficientNetB0),
    },
    "inceptionv3": {
        "native": 299,
        "min": 75,
        "scale": 1 / 127.5,
        "offset": -1.0,
        "factory": _application(keras.applications.InceptionV3),
    },
}


def backbone_input_size(backbone: str, image_size: int, requested: int | None) -> int:
    """Side the backbone runs at: ``requested``, else its native size (small CNN: the input)."""
    spec = _spec(backbone)
    size = int(requested) if requested else (spec["native"] or int(image_size))
    if size < spec["min"]:
        raise ValueError(f"backbone {backbone} needs inputs of at least {spec['min']} pixels")
    return size


def _spec(backbone: str) -> dict[str, Any]:
    try:
        return BACKBONES[backbone]
    except KeyError:
        raise ValueError(
            f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}"
        ) from None


def is_pretrained(weights: str) -> bool:
    """True when ``weights`` loads trained backbone weights (``imagenet`` or a file)."""
    return str(weights).lower() != "none"


def make_backbone(
    backbone: str,
    input_shape: tuple[int, int, int],
    weights: str = "none",
    cnn_filters: Sequence[int] = (16, 32, 64),
    cnn_dense: int = 64,
) -> keras.Model:
    """The backbone alone (features, pooled), with ``weights`` loaded.

    Raises ``RuntimeError`` when ImageNet weights cannot be downloaded, ``FileNotFoundError``
    for a missing weights file and ``ValueError`` for one that does not fit the backbone.
    """
    spec = _spec(backbone)
    mode = str(weights)
    if mode.lower() == "imagenet":
        if backbone == "small_cnn":
            raise ValueError("small_cnn has no ImageNet weights; use train.weights: none or a file")
        try:
            return spec["factory"](input_shape, "imagenet")
        except Exception as exc:
            raise RuntimeError(
                f"could not load the ImageNet weights of {backbone}: {exc}. "
                "train.weights: imagenet downloads them from storage.googleapis.com (or uses "
                "a copy in ~/.keras/models/); without internet access, set train.weights to "
                "a local weights file or to none. Not falling back to random weights."
            ) from exc
    model = (
        _small_cnn(input_shape, cnn_filters, cnn_dense)
        if backbone == "small_cnn"
        else spec["factory"](input_shape, None)
    )
    if mode.lower() == "none":
        return model
    path = Path(mode)
    if not path.is_file():
        raise FileNotFoundError(f"train.weights file not found: {path}")
    try:
        with warnings.catch_warnings():
            # Keras only warns about parts of the file it skipped: a partial load is an error.
            warnings.simplefilter("error", UserWarning)
            model.load_weights(path)
    except Exception as exc:
        raise ValueError(
            f"weights file {path} does not fit backbone {backbone} with input {input_shape}: {exc}"
        ) from exc
    return model


def augmentation(cfg: dict[str, Any], seed: int) -> list[layers.Layer]:
    """Random layers from ``train.augment`` (inactive at inference, by Keras' design)."""
    out: list[layers.Layer] = []
    flip = str(cfg.get("flip", "none") or "none")
    if flip != "none":
        out.append(layers.RandomFlip(flip, seed=seed, name="aug_flip"))
    if cfg.get("rotation"):
        out.append(
            layers.RandomRotation(float(cfg["rotation"]), fill_mode="nearest", seed=seed + 1)
        )
    if cfg.get("translation"):
        t = float(cfg["translation"])
        out.append(layers.RandomTranslation(t, t, fill_mode="nearest", seed=seed + 2))
    if cfg.get("zoom"):
        out.append(layers.RandomZoom(float(cfg["zoom"]), fill_mode="nearest", seed=seed + 3))
    if cfg.get("contrast"):
        out.append(layers.RandomContrast(float(cfg["contrast"]), seed=seed + 4))
    return out


def build_model(
    image_size: int,
    num_classes: int,
    backbone: str = "small_cnn",
    weights: str = "none",
    backbone_size: int | None = None,
    dropout: float = 0.2,
    augment: dict[str, Any] | None = None,
    cnn_filters: Sequence[int] = (16, 32, 64),
    cnn_dense: int = 64,
    seed: int = 0,
) -> keras.Model:
    """Uncompiled classifier: uint8-range ``(size, size, 3)`` in, softmax probabilities out.

    A pretrained backbone (``weights`` not ``none``) starts frozen and runs in inference mode
    (its BatchNorm statistics are kept even when fine-tuning unfreezes its top layers).
    """
    if num_classes < 2:
        raise ValueError(f"need at least two classes, got {num_classes}")
    spec = _spec(backbone)
    side = backbone_input_size(backbone, image_size, backbone_size)
    base = make_backbone(backbone, (side, side, 3), weights, cnn_filters, cnn_dense)
    pretrained = is_pretrained(weights)
    base.trainable = not pretrained

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    for layer in augmentation(augment or {}, seed):
        x = layer(x)
    if side != image_size:
        x = layers.Resizing(side, side, interpolation="bilinear", name="resize")(x)
    if spec["scale"] is not None:
        x = layers.Rescaling(spec["scale"], offset=spec["offset"], name="scale")(x)
    x = base(x, training=False) if pretrained else base(x)
    if dropout:
        x = layers.Dropout(float(dropout), seed=seed + 5, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probs", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"classifier_{backbone}")


def unfreeze_top(model: keras.Model, n_layers: int) -> int:
    """Make the top ``n_layers`` of the backbone trainable (BatchNorm stays frozen).

    Returns how many layers became trainable. Recompile the model afterwards.
    """
    base = model.get_layer(BACKBONE_LAYER)
    base.trainable = True
    count = 0
    cut = max(len(base.layers) - int(n_layers), 0)
    for i, layer in enumerate(base.layers):
        trainable = i >= cut and not isinstance(layer, layers.BatchNormalization)
        layer.trainable = trainable
        count += int(trainable)
    return count


def compile_model(model: keras.Model, learning_rate: float) -> None:
    """Adam + sparse categorical cross-entropy, accuracy metric."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=float(learning_rate)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
