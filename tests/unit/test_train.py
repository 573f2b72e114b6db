"""Unit and smoke tests of the train stage, its input pipeline and the model builder on
tiny generated images."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from imgclf.config import PATHS, StageError, load_params
from imgclf.pipeline import model as mdl
from imgclf.pipeline import train as trn
from imgclf.pipeline.dataset import SplitList, data_hash, encode_labels, make_dataset, read_list
from imgclf.pipeline.training_loop import batches, class_weight_table, fit_epochs
from imgclf.testing.images import preprocess_options

SIZE = 16


def write_images(root: Path, per_class: int = 24, size: int = SIZE) -> tuple[list[str], list[str]]:
    """Class ``a``: a dark blob top-left; class ``b``: bottom-right (plus noise)."""
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for label, corner in (("a", 0), ("b", size // 2)):
        for i in range(per_class):
            arr = rng.integers(170, 255, (size, size, 3)).astype(np.uint8)
            jitter = int(rng.integers(0, 3))
            y0 = x0 = corner + jitter
            arr[y0 : y0 + size // 3, x0 : x0 + size // 3] = rng.integers(0, 60)
            path = root / label / f"{label}_{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path, quality=95)
            paths.append(str(path))
            labels.append(label)
    return paths, labels


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[list[str], np.ndarray]:
    paths, labels = write_images(tmp_path_factory.mktemp("imgs"))
    return paths, encode_labels(labels, ["a", "b"])


PARAMS = load_params(PATHS.params).train
CFG = PARAMS.model_copy(update={"learning_rate": 3e-3, "patience": 5, "warmup_epochs": 1})
STEPS = 6  # batches per epoch of the tiny training set (48 images, batch 8)


def tiny_model(seed: int = 1, backbone: str = "cnn") -> keras.Model:
    return mdl.build_model(
        SIZE,
        2,
        backbone=backbone,
        cnn_filters=(8, 16),
        cnn_depth=1,
        cnn_dense=16,
        dropout=0.0,
        seed=seed,
    )


def train_once(
    images, epochs: int = 2, model: keras.Model | None = None, callbacks=(), **changes
) -> tuple[keras.Model, list[dict]]:
    paths, y = images
    trn.seed_everything(7)
    strategy = tf.distribute.get_strategy()
    ds = batches(strategy, paths, y, SIZE, 8, shuffle=True, seed=7)
    val = make_dataset(paths, y, SIZE, 16)
    model = model or tiny_model()
    cfg = CFG.model_copy(update={"epochs": epochs, **changes})
    rows = trn.fit(model, ds, val, cfg, trn.class_weights(y, 2, "auto"), callbacks)
    return model, rows


class RecordingRun:
    """What the MLflow callback touches of a ``tracking.Run``: ``log_metrics``."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.logged.append((metrics, step))


def test_smoke_loss_goes_down_the_model_reloads_and_mlflow_gets_every_epoch(images, tmp_path):
    run = RecordingRun()
    model, rows = train_once(images, epochs=3, callbacks=[trn.mlflow_epochs(run)])
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert list(rows[0]) == [
        "epoch", "phase", "accuracy", "loss", "val_accuracy", "val_loss", "lr",
    ]  # fmt: skip
    assert rows[-1]["loss"] < rows[0]["loss"]
    # one MLflow batch per epoch, step = epoch, the same figures as the history, each name
    # saying its split (MLflow also holds report's test_accuracy)
    assert [step for _, step in run.logged] == [1, 2, 3]
    for (metrics, _), row in zip(run.logged, rows, strict=True):
        assert metrics == {
            "train_accuracy": row["accuracy"], "train_loss": row["loss"],
            "val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"],
            "learning_rate": row["lr"],
        }  # fmt: skip
    path = tmp_path / "m.keras"
    trn.save_model(model, path)
    loaded = keras.models.load_model(path)  # no custom_objects needed
    batch = np.stack([np.asarray(Image.open(p)) for p in images[0][:6]]).astype(np.uint8)
    want = model.predict(batch, verbose=0)
    got = loaded.predict(batch, verbose=0)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert loaded.input_shape == (None, SIZE, SIZE, 3)


def test_mlflow_metric_names_say_their_split():
    logs = {"accuracy": 0.5, "loss": 1.0, "val_accuracy": 0.25, "val_loss": 2.0,
            "learning_rate": 0.001}  # fmt: skip
    assert trn.mlflow_epoch_metrics(logs) == {
        "train_accuracy": 0.5, "train_loss": 1.0, "val_accuracy": 0.25, "val_loss": 2.0,
        "learning_rate": 0.001,
    }  # fmt: skip


def test_same_seed_same_history(images):
    m1, first = train_once(images, epochs=1)
    m2, second = train_once(images, epochs=1)
    assert first == second
    for a, b in zip(m1.get_weights(), m2.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_training_loop_gives_fits_weights_bit_for_bit(images):
    """The one training step (``strategy.run`` in a ``tf.function``) against Keras' own
    ``fit`` on the same data, seed, class weights, schedule, augmentation and dropout:
    the same shuffle order and losses, the same weights to the bit (48 images, batch 8)."""
    paths, y = images
    weights = trn.class_weights(y[:40], 2, "auto")  # unequal: 24 of a, 16 of b

    def build() -> keras.Model:
        trn.seed_everything(7)
        model = mdl.build_model(
            SIZE, 2, cnn_filters=(8, 16), cnn_depth=1, dropout=0.3,
            augment={"rotation": 0.05, "zoom": 0.1}, seed=1,
        )  # fmt: skip
        mdl.compile_model(model, mdl.learning_rate_schedule("cosine", 3e-3, 18, 6), 0.02)
        return model

    reference = build()
    fitted = reference.fit(
        make_dataset(paths, y, SIZE, 8, True, 7),
        validation_data=make_dataset(paths, y, SIZE, 16),
        epochs=3, class_weight=weights, shuffle=False, verbose=0,
    ).history  # fmt: skip
    ours = build()
    strategy = tf.distribute.get_strategy()
    history = fit_epochs(
        ours, batches(strategy, paths, y, SIZE, 8, True, 7), make_dataset(paths, y, SIZE, 16),
        class_weight_table(weights, 2), 0, 3,
    )  # fmt: skip
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert history[key] == pytest.approx(fitted[key], rel=1e-6), key
    for a, b in zip(reference.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def cosine_lr(step: int, peak: float, total: int, warmup: int) -> float:
    """The schedule written out: linear warm-up from 0, then cosine decay to 0."""
    if step < warmup:
        return peak * step / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_lr_column_is_the_learning_rate_of_each_epochs_last_step(images):
    epochs, peak = 4, 3e-3
    _, rows = train_once(images, epochs=epochs, patience=99)
    want = [cosine_lr(e * STEPS - 1, peak, epochs * STEPS, STEPS) for e in range(1, epochs + 1)]
    assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-5)
    lrs = [r["lr"] for r in rows]
    assert lrs[1] > lrs[2] > lrs[3] > 0  # decays after the warm-up epoch
    assert lrs[3] < 0.03 * peak  # close to 0 at the last step of the budget
    _, flat = train_once(images, epochs=2, patience=99, lr_schedule="constant")
    assert [r["lr"] for r in flat] == pytest.approx([peak, peak])


def test_learning_rate_schedule_shapes():
    sched = mdl.learning_rate_schedule("cosine", 1.0, 100, 10)
    got = [float(sched(s)) for s in (0, 5, 10, 55, 99)]
    want = [cosine_lr(s, 1.0, 100, 10) for s in (0, 5, 10, 55, 99)]
    assert got == pytest.approx(want, abs=1e-6)
    assert got[2] == pytest.approx(1.0) and got[3] == pytest.approx(0.5)
    # a warm-up as long as the phase is cut to all but its last step
    short = mdl.learning_rate_schedule("cosine", 1.0, 4, 8)
    assert float(short(3)) == pytest.approx(1.0)
    assert mdl.learning_rate_schedule("constant", 0.5, 100, 10) == 0.5
    with pytest.raises(ValueError, match="cosine or constant"):
        mdl.learning_rate_schedule("step", 1.0, 10, 0)


class _Stub:
    """What EarlyStop touches of a model: weights, stop flag, the optimizer's rate."""

    def __init__(self) -> None:
        self.weights, self.stop_training = 0, False
        self.optimizer = keras.optimizers.Adam(0.5)

    def get_weights(self) -> int:
        return self.weights

    def set_weights(self, w: int) -> None:
        self.weights = w


def run_stopper(losses: list[float], patience: int, min_delta: float):
    """Feed ``losses`` as val_loss epoch by epoch (weights = epoch number) until it stops."""
    stop = mdl.EarlyStop(patience, min_delta)
    model = _Stub()
    stop.set_model(model)
    stop.on_train_begin()
    seen = []
    for epoch, loss in enumerate(losses):
        model.weights = epoch
        logs = {"val_loss": loss}
        stop.on_epoch_end(epoch, logs)
        seen.append(logs["learning_rate"])
        if model.stop_training:
            break
    stop.on_train_end()
    return stop, model, seen


def test_early_stop_counts_only_gains_over_min_delta_and_restores_the_lowest():
    # epoch 0 sets the reference 1.0; 0.9995 and 0.9991 are gains under min_delta 0.001,
    # so epoch 2 ends the patience of 2: stopped at epoch 2, weights of epoch 2 (lowest)
    stop, model, lrs = run_stopper([1.0, 0.9995, 0.9991, 0.5], patience=2, min_delta=1e-3)
    assert stop.stopped_epoch == 2 and model.weights == 2 and stop.best_epoch == 2
    assert lrs == [0.5, 0.5, 0.5]
    # a real gain resets the patience; a later rise keeps the best weights (epoch 2)
    stop, model, _ = run_stopper([1.0, 0.99, 0.8, 0.85, 0.9, 0.7], patience=2, min_delta=1e-3)
    assert stop.stopped_epoch == 4 and model.weights == 2
    # min_delta 0 is plain early stopping; NaN is no gain
    stop, model, _ = run_stopper([1.0, float("nan"), 0.99999, 2.0, 3.0], 2, 0.0)
    assert stop.stopped_epoch == 4 and model.weights == 2
    # never stopped: still the lowest restored
    stop, model, _ = run_stopper([1.0, 0.5, 0.7], patience=5, min_delta=0.0)
    assert stop.stopped_epoch is None and model.weights == 1


def test_training_on_a_plateau_stops_before_the_budget(images):
    """A learning rate of 1e-9 cannot move val_loss by min_delta (and small_cnn has no
    BatchNorm statistics that move without it): epoch 1 sets the reference, the next
    ``patience`` epochs show no gain, so 20 epochs end after 3."""
    _, rows = train_once(
        images,
        epochs=20,
        model=tiny_model(backbone="small_cnn"),
        learning_rate=1e-9,
        lr_schedule="constant",
        patience=2,
        min_delta=1e-3,
    )
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert max(r["val_loss"] for r in rows) - min(r["val_loss"] for r in rows) < 1e-3


def test_early_stopping_ends_a_real_run_and_keeps_the_best_epoch(images):
    """The cnn learns the tiny set within a few epochs, then val_loss stops improving by
    min_delta: the run ends before its budget with the best epoch's weights."""
    paths, y = images
    model, rows = train_once(images, epochs=40, patience=3, min_delta=0.01)
    assert len(rows) < 40
    best = trn.best_row(rows)
    val = make_dataset(paths, y, SIZE, 16)
    got = model.evaluate(val, verbose=0, return_dict=True)
    assert got["loss"] == pytest.approx(best["val_loss"], rel=1e-4, abs=1e-6)


@pytest.fixture
def dvc_workspace(tmp_path, monkeypatch) -> Path:
    """An empty DVC repository (no git) as the working directory, as DVCLive expects."""
    from dvc.repo import Repo

    Repo.init(tmp_path, no_scm=True).close()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return tmp_path


def read_tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_fine_tune_phase_runs_on_a_loaded_backbone_and_dvclive_keeps_counting(
    images, tmp_path, dvc_workspace
):
    keras.utils.set_random_seed(5)
    src = mdl.make_backbone("cnn", (SIZE, SIZE, 3), "none", (8, 16), cnn_depth=1)
    src.save_weights(tmp_path / "w.weights.h5")
    model = mdl.build_model(
        SIZE, 2, weights=str(tmp_path / "w.weights.h5"), cnn_filters=(8, 16), cnn_depth=1
    )
    assert not model.get_layer(mdl.BACKBONE_LAYER).trainable
    live_dir = dvc_workspace / "metrics" / "train"
    with trn.dvclive_history(live_dir) as history:
        _, rows = train_once(
            images,
            epochs=2,
            model=model,
            callbacks=[history],
            patience=99,
            fine_tune_epochs=2,
            fine_tune_layers=3,
            fine_tune_learning_rate=1e-3,
        )
    assert [(r["epoch"], r["phase"]) for r in rows] == [
        (1, "train"),
        (2, "train"),
        (3, "fine_tune"),
        (4, "fine_tune"),
    ]
    assert rows[2]["lr"] <= 1e-3 and rows[3]["lr"] < rows[2]["lr"]
    # DVCLive's history: one file a metric, both phases in one sequence, step = epoch
    plots = live_dir / "plots" / "metrics"
    files = {
        ("train", "loss"): "loss", ("train", "accuracy"): "accuracy",
        ("train", "learning_rate"): "lr", ("eval", "loss"): "val_loss",
        ("eval", "accuracy"): "val_accuracy",
    }  # fmt: skip
    assert sorted(p.relative_to(plots).as_posix() for p in plots.rglob("*.tsv")) == sorted(
        f"{side}/{name}.tsv" for side, name in files
    )
    for (side, name), key in files.items():
        assert read_tsv(plots / side / f"{name}.tsv") == [
            ["step", name],
            *[[str(r["epoch"]), str(r[key])] for r in rows],
        ]
    # no timestamp anywhere (byte-stable outs); no dvc.yaml written or changed
    summary = json.loads((live_dir / "metrics.json").read_text())
    assert summary == {
        "train": {"accuracy": rows[-1]["accuracy"], "loss": rows[-1]["loss"],
                  "learning_rate": rows[-1]["lr"]},
        "eval": {"accuracy": rows[-1]["val_accuracy"], "loss": rows[-1]["val_loss"]},
        "step": 4,
    }  # fmt: skip
    assert sorted(p.name for p in live_dir.iterdir()) == ["metrics.json", "plots"]
    assert not list(dvc_workspace.rglob("dvc.yaml"))


def test_dataset_yields_the_stored_pixels_as_floats(images):
    paths, y = images
    x, labels = next(iter(make_dataset(paths, y, SIZE, 5)))
    assert tuple(x.shape) == (5, SIZE, SIZE, 3) and x.dtype.name == "float32"
    # the pixels Pillow decodes from the stored JPEGs (both libjpeg, exact integer IDCT)
    want = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[:5]])
    np.testing.assert_array_equal(x.numpy(), want.astype(np.float32))
    assert labels.numpy().tolist() == y[:5].tolist()


def test_dataset_rejects_wrong_image_size(images):
    paths, y = images
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[16,16,3\].*\[17,17,3\]"):
        next(iter(make_dataset(paths, y, SIZE + 1, 4)))


def test_class_weights_balanced():
    y = np.array([0] * 6 + [1] * 2)
    assert trn.class_weights(y, 2, "auto") == pytest.approx({0: 8 / 12, 1: 2.0})
    assert trn.class_weights(y, 2, "none") is None
    with pytest.raises(ValueError, match="auto or none"):
        trn.class_weights(y, 2, "balanced")


def test_encode_labels_and_unknown_label():
    assert encode_labels(["b", "a", "b"], ["a", "b"]).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"not among the training classes \['a', 'b'\]: \['c'\]"):
        encode_labels(["a", "c"], ["a", "b"])


def write_list(path: Path, *rows: tuple[str, str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "sha256"), *rows])
    return path


def test_read_list_and_data_hash(tmp_path):
    lst = write_list(tmp_path / "train.csv", ("data/x.jpg", "a", "00"), ("data/y.jpg", "b", "01"))
    listed = read_list(lst)
    assert listed == SplitList(["data/x.jpg", "data/y.jpg"], ["a", "b"])
    assert listed.files(Path("/root")) == ["/root/data/x.jpg", "/root/data/y.jpg"]
    options = preprocess_options(size=32, jpeg_quality=95)
    h1 = data_hash([lst], options)
    assert re.fullmatch(r"[0-9a-f]{16}", h1)
    # the same list elsewhere: the same hash (the folder is not part of it)
    twin = tmp_path / "copy" / "train.csv"
    twin.parent.mkdir()
    twin.write_bytes(lst.read_bytes())
    assert data_hash([twin], options) == h1
    assert data_hash([lst], preprocess_options(size=32, jpeg_quality=80)) != h1
    lst.write_text(lst.read_text().replace("00", "02"))
    assert data_hash([lst], options) != h1
    with pytest.raises(StageError, match=r"missing.csv not found: run the split stage first$"):
        read_list(tmp_path / "missing.csv")


def test_training_data_is_encoded_against_the_train_classes(tmp_path):
    train = write_list(tmp_path / "train.csv", ("x.jpg", "b", "0"), ("y.jpg", "a", "1"))
    val = write_list(tmp_path / "val.csv", ("z.jpg", "b", "2"))
    data = trn.load_training_data(train, val)
    assert data.class_names == ["a", "b"]
    assert data.y_train.tolist() == [1, 0] and data.y_val.tolist() == [1]
    decode = preprocess_options(size=32)
    meta = trn.candidate_metadata(data, decode, "cnn", "p" * 16, "d" * 16)
    assert meta == {
        "class_names": ["a", "b"],
        "class_counts": {"a": 1, "b": 1},
        "image_size": 32,
        "decode": decode.to_dict(),
        "backbone": "cnn",
        "params_digest": "p" * 16,
        "data_hash": "d" * 16,
    }
    empty = write_list(tmp_path / "empty.csv")
    with pytest.raises(StageError, match="must not be empty"):
        trn.load_training_data(train, empty)


def test_history_rows_best_row_and_summary():
    history = {
        "accuracy": [0.5, 0.75, 0.8],
        "loss": [1.0, 0.5, 0.4],
        "val_accuracy": [0.5, 0.9, 0.7],
        "val_loss": [0.9, 0.4, 0.6],
        "learning_rate": [0.1, 0.05, 0.0],
    }
    rows = trn.history_rows(history, trn.Phase("fine_tune", 0.1, 2, 3))
    assert rows[1] == {
        "epoch": 4, "phase": "fine_tune", "accuracy": 0.75, "loss": 0.5, "val_accuracy": 0.9,
        "val_loss": 0.4, "lr": 0.05,
    }  # fmt: skip
    assert [r["epoch"] for r in rows] == [3, 4, 5]
    assert trn.best_row(rows) is rows[1]
    assert trn.train_summary(rows) == {"epochs_run": 3, "best_epoch": 4}


def test_saved_model_bytes_hold_no_save_time(tmp_path):
    model = tiny_model()
    first, second = tmp_path / "a.keras", tmp_path / "b.keras"
    trn.save_model(model, first)
    trn.save_model(model, second)
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert "date_saved" not in json.loads(zf.read("metadata.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.keras", "b.keras"]  # no temp left


# -- build_model and backbones -------------------------------------------------------------

BACKBONE_SIZES = {"mobilenetv2": 32, "efficientnetb0": 32, "inceptionv3": 75}
# one backbone in the fast tier; the larger two (3-4 s each) run with the integration tier
BACKBONES = [
    "mobilenetv2",
    *(pytest.param(n, marks=pytest.mark.integration) for n in ("efficientnetb0", "inceptionv3")),
]


@pytest.mark.parametrize("name", BACKBONES)
def test_build_model_with_local_weights_file(name, tmp_path):
    side = BACKBONE_SIZES[name]
    keras.utils.set_random_seed(3)
    source = mdl.make_backbone(name, (side, side, 3), "none")
    path = tmp_path / f"{name}.weights.h5"
    source.save_weights(path)
    keras.utils.set_random_seed(4)  # different init: the file must be what is loaded
    model = mdl.build_model(24, 3, backbone=name, weights=str(path), backbone_size=side)
    base = model.get_layer(mdl.BACKBONE_LAYER)
    for want, got in zip(source.get_weights(), base.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert not base.trainable  # pretrained: frozen for the first phase
    # a direct call (inference mode), not predict: no tf.function to trace, 10x faster
    out = keras.ops.convert_to_numpy(model(np.full((2, 24, 24, 3), 128, np.uint8), training=False))
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    if name == "mobilenetv2":
        n = mdl.unfreeze_top(model, 10)
        # the top 10 layers of MobileNetV2 with average pooling, its 3 BatchNorms left frozen
        top = ["block_16_expand_relu", "block_16_depthwise", "block_16_depthwise_relu"]
        top += ["block_16_project", "Conv_1", "out_relu"]
        unfrozen = [layer for layer in base.layers if layer.trainable]
        assert n == 7 and base.trainable
        assert [layer.name for layer in unfrozen[:-1]] == top
        assert isinstance(unfrozen[-1], keras.layers.GlobalAveragePooling2D)
        assert not any(
            layer.trainable
            for layer in base.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        )


def test_weights_file_of_another_backbone_is_a_clear_error(tmp_path):
    path = tmp_path / "cnn.weights.h5"
    mdl.make_backbone("small_cnn", (32, 32, 3), "none").save_weights(path)
    with pytest.raises(ValueError, match="does not fit backbone mobilenetv2"):
        mdl.build_model(32, 2, backbone="mobilenetv2", weights=str(path), backbone_size=32)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        mdl.build_model(32, 2, weights=str(tmp_path / "nope.weights.h5"))


def test_cnn_has_the_same_parameters_at_every_size():
    """Defaults of params.yaml: widths (16, 32, 64, 128), one conv per stage. Per conv:
    3x3 kernel (no bias) + BatchNorm (4 per channel); head: softmax over 10 classes."""
    filters, depth = PARAMS.cnn_filters, PARAMS.cnn_depth
    assert (tuple(filters), depth) == (mdl.CNN_DEFAULTS["cnn"]["filters"], 1)
    assert depth == mdl.CNN_DEFAULTS["cnn"]["depth"]
    convs = [(3, 16), (16, 32), (32, 64), (64, 128)]
    want = sum(9 * a * b + 4 * b for a, b in convs) + 128 * 10 + 10
    assert want == 99_450
    counts = {}
    for side in (28, 32, 64, 96, 224):
        model = mdl.build_model(side, 10, cnn_filters=filters, cnn_depth=depth)
        counts[side] = model.count_params()
        base = model.get_layer(mdl.BACKBONE_LAYER)
        kinds = {type(layer).__name__ for layer in base.layers}
        assert {"BatchNormalization", "GlobalAveragePooling2D"} <= kinds
        assert not kinds & {"Flatten", "Dense"}
    assert counts == dict.fromkeys(counts, want)
    # cnn_depth 2: a second conv in each stage (32->32, 64->64, 128->128), still size-free
    deeper = want + sum(9 * f * f + 4 * f for f in (32, 64, 128))
    assert deeper == 293_882
    for side in (28, 224):
        assert mdl.build_model(side, 10, cnn_depth=2).count_params() == deeper
    # the old default grows with the image: 99% of it in one dense layer at 224 px
    old = {s: mdl.build_model(s, 10, backbone="small_cnn").count_params() for s in (32, 224)}
    assert old == {32: 286_442, 224: 12_869_354}


@pytest.mark.parametrize(
    ("side", "halvings", "last"),
    [(28, 0, 4), (32, 0, 4), (63, 0, 8), (64, 1, 4), (96, 1, 6), (128, 2, 4), (224, 2, 7)],
)
def test_cnn_stem_keeps_the_working_resolution_below_64(side, halvings, last):
    assert mdl.stem_halvings(side) == halvings
    base = mdl.make_backbone("cnn", (side, side, 3), cnn_filters=(16, 32, 64, 128))
    before_pooling = base.get_layer("gap").input.shape
    assert tuple(before_pooling) == (None, last, last, 128)


def test_cnn_weights_file_fits_every_input_size(tmp_path):
    keras.utils.set_random_seed(5)
    src = mdl.make_backbone("cnn", (32, 32, 3), "none", (8, 16), cnn_depth=1)
    src.save_weights(tmp_path / "w.weights.h5")
    model = mdl.build_model(
        96, 2, weights=str(tmp_path / "w.weights.h5"), cnn_filters=(8, 16), cnn_depth=1
    )
    got = model.get_layer(mdl.BACKBONE_LAYER).get_weights()
    for a, b in zip(src.get_weights(), got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_small_cnn_weights_file_round_trip(tmp_path):
    keras.utils.set_random_seed(5)
    src = mdl.make_backbone("small_cnn", (SIZE, SIZE, 3), "none", (8, 16), 16)
    src.save_weights(tmp_path / "w.weights.h5")
    model = mdl.build_model(
        SIZE,
        2,
        backbone="small_cnn",
        weights=str(tmp_path / "w.weights.h5"),
        cnn_filters=(8, 16),
        cnn_dense=16,
    )
    got = model.get_layer(mdl.BACKBONE_LAYER).get_weights()
    for a, b in zip(src.get_weights(), got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_imagenet_fails_loudly_when_offline(tmp_path, monkeypatch):
    cached = Path(keras.config.keras_home() if hasattr(keras.config, "keras_home") else "~/.keras")
    if any(Path(os.path.expanduser(str(cached)), "models").glob("mobilenet_v2*")):
        pytest.skip("ImageNet weights are cached locally; cannot simulate being offline")
    # An unreachable proxy: the download fails like it does without internet access.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(RuntimeError, match=r"ImageNet weights of mobilenetv2.*Not falling back"):
        mdl.build_model(32, 2, backbone="mobilenetv2", weights="imagenet", backbone_size=96)


def test_bad_backbone_and_sizes():
    with pytest.raises(ValueError, match="unknown backbone"):
        mdl.build_model(32, 2, backbone="resnet")
    for own in ("cnn", "small_cnn"):
        with pytest.raises(ValueError, match=f"{own} has no ImageNet weights"):
            mdl.build_model(32, 2, backbone=own, weights="imagenet")
    with pytest.raises(ValueError, match="at least 75"):
        mdl.build_model(32, 2, backbone="inceptionv3", backbone_size=32)
    with pytest.raises(ValueError, match="two classes"):
        mdl.build_model(32, 1)


# every random layer imgclf.pipeline.model.augmentation can add
RANDOM_LAYERS = (
    keras.layers.RandomFlip,
    keras.layers.RandomRotation,
    keras.layers.RandomTranslation,
    keras.layers.RandomZoom,
    keras.layers.RandomContrast,
)


def test_resizing_and_augmentation_are_inside_the_model():
    model = mdl.build_model(
        20, 2, backbone="mobilenetv2", backbone_size=32, augment={"rotation": 0.1, "zoom": 0.1}
    )
    names = [layer.name for layer in model.layers]
    assert "resize" in names and "scale" in names
    random = [layer for layer in model.layers if isinstance(layer, RANDOM_LAYERS)]
    assert [type(layer) for layer in random] == [
        keras.layers.RandomRotation,
        keras.layers.RandomZoom,
    ]
    x = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 3)).astype(np.float32)
    # what the backbone gets (the output of the untrained backbone says little: constant
    # here), against the same chain with the random layers left out
    fed = keras.Model(model.input, model.get_layer("scale").output)
    plain = keras.ops.convert_to_numpy(model.get_layer("scale")(model.get_layer("resize")(x)))
    # inference: the random layers pass the pixels through untouched ...
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fed(x, training=False)), plain)
    # ... training: they do move them
    assert not np.array_equal(keras.ops.convert_to_numpy(fed(x, training=True)), plain)
