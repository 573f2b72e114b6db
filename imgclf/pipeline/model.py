"""The classifier: ``build_model`` and its backbones (pure Keras 3, built-in layers only).

The saved model takes uint8-range pixels ``(None, size, size, 3)`` and returns softmax
probabilities. Everything between (augmentation, active only in training; resizing to the
backbone's input size; the backbone's own ``preprocess_input`` range) is a layer inside it,
so serving feeds decoded pixels and cannot drift from training.

Backbones (``train.backbone``): ``cnn`` (default: conv/BatchNorm/ReLU stages and global
average pooling, the same parameters at every input size; see :func:`_cnn`), ``small_cnn``
(the earlier default: flattened features into a dense layer, kept for comparison),
``mobilenetv2``, ``efficientnetb0``, ``inceptionv3`` (``keras.applications``).
Weights (``train.weights``): ``none`` (random init), ``imagenet`` (downloaded by Keras;
needs the internet, fails loudly otherwise, never falls back), or a path to a local weights
file of the backbone (``backbone.save_weights("x.weights.h5")`` or a Keras ``.h5``).

Training recipe (used by :func:`imgclf.pipeline.train.fit`): :func:`compile_model` (AdamW, decoupled
weight decay, not on biases and BatchNorm), :func:`learning_rate_schedule` (cosine decay
after a linear warm-up, per step) and :class:`EarlyStop` (patience counts epochs without a
``val_loss`` gain of at least ``min_delta``; the lowest-``val_loss`` weights are restored).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras
from keras import layers

from imgclf.params import Train

BACKBONE_LAYER = "backbone"


def _small_cnn(
    input_shape: tuple[int, int, int], filters: Sequence[int], dense: int
) -> keras.Model:
    """The earlier default: conv/ReLU/max-pool blocks, flattened, then a dense layer. ~290k
    parameters at 32 px with widths (16, 32, 64), but the dense layer grows with the image
    (2.4M parameters at 96 px, 12.9M at 224 px); no BatchNorm. Kept so that the benchmark
    (``benchmarks/bench_model.py``) can compare it and old params files still run."""
    inputs = keras.Input(input_shape)
    x = inputs
    for i, f in enumerate(filters):
        x = layers.Conv2D(int(f), 3, padding="same", activation="relu", name=f"conv{i}")(x)
        if i < len(filters) - 1:
            x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(int(dense), activation="relu", name="dense")(x)
    return keras.Model(inputs, x, name=BACKBONE_LAYER)


# The ``cnn`` backbone works at 32-63 px: its stem halves a side of 64 px or more until it
# is below 64 (96 -> 48, 224 -> 56, as ImageNet networks' stems do; 28 or 32 px stay as
# they are, as CIFAR networks' stems do: halving them too cost 22 points of test accuracy
# on the model benchmark's 32 px set). Only strides and pooling change, never weights,
# so compute stays near the 32 px cost and the receptive field covers the image.
WORKING_SIDE = 64


def stem_halvings(side: int) -> int:
    """How often the ``cnn`` stem halves an input of ``side`` pixels."""
    n = 0
    while side >= WORKING_SIDE:
        side = -(-side // 2)
        n += 1
    return n


def _conv_bn_relu(
    x: Any, filters: int, stride: int, pools: Sequence[tuple[int, int]], name: str
) -> Any:
    """3x3 conv, then the max-pools (``(size, stride)`` pairs), then BatchNorm and ReLU:
    pooling before them is the same as after for ReLU and nearly so for BatchNorm, and
    normalises a quarter of the values (BatchNorm's unfused ops dominate on CPUs)."""
    x = layers.Conv2D(
        int(filters), 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    for k, (size, step) in enumerate(pools):
        x = layers.MaxPooling2D(size, strides=step, padding="same", name=f"{name}_pool{k}")(x)
    # momentum 0.9 (PyTorch's default), not Keras' 0.99: the moving statistics that
    # validation uses settle within an epoch even on small data sets (20 steps an epoch)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _cnn(input_shape: tuple[int, int, int], filters: Sequence[int], depth: int) -> keras.Model:
    """A stem conv of ``filters[0]`` (stride 2, then 3x3/2 max-pools, while the side is
    64 px or more: see :data:`WORKING_SIDE`), then one stage per further width of ``depth``
    3x3 convs, a 2x2 max-pool between stages; each conv followed by BatchNorm and ReLU;
    global average pooling. No Flatten: the parameters are the same at every input size
    (99,450 with the default widths and a 10-class head)."""
    inputs = keras.Input(input_shape)
    halvings = stem_halvings(int(input_shape[0]))
    between = [(2, 2)] if len(filters) > 1 else []
    x = _conv_bn_relu(
        inputs, filters[0], 2 if halvings else 1, [(3, 2)] * max(halvings - 1, 0) + between, "stem"
    )
    for i, f in enumerate(filters[1:], 1):
        for j in range(int(depth)):
            last = j == depth - 1 and i < len(filters) - 1
            x = _conv_bn_relu(x, f, 1, between if last else [], f"stage{i}_{j}")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
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
    "cnn": {"native": None, "min": 8, "scale": 1 / 255.0, "offset": 0.0},
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
    """Side the backbone runs at: ``requested``, else its native size (own CNNs: the input)."""
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


# Library defaults of the own CNNs when a caller passes no widths (the pipeline always
# passes params.yaml's; tests/test_train.py checks that the cnn ones match it).
CNN_DEFAULTS = {
    "cnn": {"filters": (16, 32, 64, 128), "depth": 1},
    "small_cnn": {"filters": (16, 32, 64)},
}
OWN_CNNS = ("cnn", "small_cnn")


def make_backbone(
    backbone: str,
    input_shape: tuple[int, int, int],
    weights: str = "none",
    cnn_filters: Sequence[int] | None = None,
    cnn_dense: int = 64,
    cnn_depth: int | None = None,
) -> keras.Model:
    """The backbone alone (features, pooled), with ``weights`` loaded.

    Raises ``RuntimeError`` when ImageNet weights cannot be downloaded, ``FileNotFoundError``
    for a missing weights file and ``ValueError`` for one that does not fit the backbone.
    """
    spec = _spec(backbone)
    mode = str(weights)
    if mode.lower() == "imagenet":
        return _imagenet_backbone(backbone, input_shape)
    if backbone in OWN_CNNS:
        own = CNN_DEFAULTS[backbone]
        filters = tuple(cnn_filters) if cnn_filters is not None else own["filters"]
        if backbone == "cnn":
            model = _cnn(input_shape, filters, own["depth"] if cnn_depth is None else cnn_depth)
        else:
            model = _small_cnn(input_shape, filters, cnn_dense)
    else:
        model = spec["factory"](input_shape, None)
    if mode.lower() != "none":
        _load_weights_file(model, Path(mode), backbone)
    return model


def _imagenet_backbone(backbone: str, input_shape: tuple[int, int, int]) -> keras.Model:
    """A ``keras.applications`` backbone with ImageNet weights (downloaded by Keras); no
    fallback to random weights."""
    if backbone in OWN_CNNS:
        raise ValueError(f"{backbone} has no ImageNet weights; use train.weights: none or a file")
    try:
        return _spec(backbone)["factory"](input_shape, "imagenet")
    except Exception as exc:
        raise RuntimeError(
            f"could not load the ImageNet weights of {backbone}: {exc}. "
            "train.weights: imagenet downloads them from storage.googleapis.com (or uses "
            "a copy in ~/.keras/models/); without internet access, set train.weights to "
            "a local weights file or to none. Not falling back to random weights."
        ) from exc


def _load_weights_file(model: keras.Model, path: Path, backbone: str) -> None:
    """Load a weights file into ``model``; a partial load (Keras only warns) is an error."""
    if not path.is_file():
        raise FileNotFoundError(f"train.weights file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            model.load_weights(path)
    except Exception as exc:
        raise ValueError(
            f"weights file {path} does not fit backbone {backbone} with input "
            f"{tuple(model.input_shape[1:])}: {exc}"
        ) from exc


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
    backbone: str = "cnn",
    weights: str = "none",
    backbone_size: int | None = None,
    dropout: float = 0.2,
    augment: dict[str, Any] | None = None,
    cnn_filters: Sequence[int] | None = None,
    cnn_dense: int = 64,
    seed: int = 0,
    cnn_depth: int | None = None,
) -> keras.Model:
    """Uncompiled classifier: uint8-range ``(size, size, 3)`` in, softmax probabilities out.

    A pretrained backbone (``weights`` not ``none``) starts frozen and runs in inference mode
    (its BatchNorm statistics are kept even when fine-tuning unfreezes its top layers).
    """
    if num_classes < 2:
        raise ValueError(f"need at least two classes, got {num_classes}")
    spec = _spec(backbone)
    side = backbone_input_size(backbone, image_size, backbone_size)
    base = make_backbone(backbone, (side, side, 3), weights, cnn_filters, cnn_dense, cnn_depth)
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


def learning_rate_schedule(
    kind: str, peak: float, total_steps: int, warmup_steps: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """``constant``: ``peak`` throughout. ``cosine``: linear warm-up from 0 to ``peak`` over
    ``warmup_steps`` (at most all but one step), then cosine decay to 0 at ``total_steps``."""
    if kind == "constant":
        return float(peak)
    if kind != "cosine":
        raise ValueError(f"train.lr_schedule must be cosine or constant, got {kind!r}")
    total = max(int(total_steps), 1)
    warmup = min(max(int(warmup_steps), 0), total - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else float(peak),
        decay_steps=total - warmup,
        alpha=0.0,
        warmup_target=float(peak) if warmup else None,
        warmup_steps=warmup,
    )


def compile_model(
    model: keras.Model,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    weight_decay: float = 0.0,
) -> None:
    """AdamW (decoupled weight decay; none on biases and BatchNorm's scale and offset) and
    sparse categorical cross-entropy, accuracy metric. ``weight_decay`` 0 is Adam."""
    if not callable(learning_rate):
        learning_rate = float(learning_rate)
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate, weight_decay=float(weight_decay)
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def current_learning_rate(model: keras.Model) -> float:
    """The learning rate of the optimizer's last step (the first step's before any)."""
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # loss scaling
    lr = optimizer._learning_rate  # the schedule itself, or a variable holding a float
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        step = max(int(optimizer.iterations.numpy()) - 1, 0)
        return float(keras.ops.convert_to_numpy(lr(step)))
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class EarlyStop(keras.callbacks.Callback):
    """Early stopping on ``val_loss``: stop after ``patience`` epochs in a row without a gain
    of more than ``min_delta`` over the last epoch that had one; at the end restore the
    weights of the lowest ``val_loss`` (so ``best_row`` of the history is what is kept).
    A missing or NaN ``val_loss`` counts as no gain.

    Also puts the learning rate of each epoch's last step into the epoch's logs as
    ``learning_rate`` (so the history and later callbacks get it).
    """

    def __init__(self, patience: int, min_delta: float) -> None:
        super().__init__()
        self.patience = int(patience)
        self.min_delta = float(min_delta)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.best = math.inf
        self.reference = math.inf
        self.wait = 0
        self.best_weights: list | None = None
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        logs["learning_rate"] = current_learning_rate(self.model)
        loss = float(logs.get("val_loss", math.nan))
        if loss < self.best:  # False for NaN
            self.best, self.best_epoch = loss, epoch
            self.best_weights = self.model.get_weights()
        if loss < self.reference - self.min_delta:
            self.reference, self.wait = loss, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


@contextmanager
def precision(policy: str) -> Iterator[None]:
    """Build layers under Keras' dtype ``policy`` (``train.mixed_precision``: ``none`` is
    float32; ``mixed_float16`` / ``mixed_bfloat16`` compute in half precision and keep
    float32 variables; the ``probs`` layer stays float32). The global policy is restored."""
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if policy == "none" else policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def walk_layers(layer: keras.Layer) -> Iterator[keras.Layer]:
    """``layer`` and every layer inside it (nested models included)."""
    yield layer
    for inner in getattr(layer, "layers", ()):
        yield from walk_layers(inner)


def synchronize_batch_norm(model: keras.Model, on: bool) -> int:
    """Switch every BatchNormalization of ``model`` to statistics over the *global* batch
    (all replicas; TensorFlow backend) or back; returns how many were switched. With
    several replicas, batch statistics then equal a single replica's over the same global
    batch, and a replica with an empty last batch cannot produce NaN moving statistics.
    Inference is the same either way; switch back before saving (the config records it)."""
    norms = [x for x in walk_layers(model) if isinstance(x, layers.BatchNormalization)]
    for norm in norms:
        norm.synchronized = bool(on)
    return len(norms)


def build_from_params(image_size: int, num_classes: int, cfg: Train, seed: int) -> keras.Model:
    """:func:`build_model` with the ``train`` params."""
    return build_model(
        image_size,
        num_classes,
        backbone=cfg.backbone,
        weights=cfg.weights,
        backbone_size=cfg.backbone_size,
        dropout=cfg.dropout,
        augment=cfg.augment.model_dump(),
        cnn_filters=cfg.cnn_filters,
        cnn_depth=cfg.cnn_depth,
        cnn_dense=cfg.cnn_dense,
        seed=seed,
    )
