"""Unit and smoke tests of ``stages.train`` and ``stages.model`` on tiny generated images."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from stages import model as mdl
from stages import train as trn
from stages.config import PATHS, load_params
from stages.imaging import DecodeOptions

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
    return paths, trn.encode_labels(labels, ["a", "b"])


CFG = load_params(PATHS.params).train.model_copy(update={"learning_rate": 3e-3, "patience": 5})


def tiny_model(seed: int = 1) -> keras.Model:
    return mdl.build_model(SIZE, 2, cnn_filters=(8, 16), cnn_dense=16, dropout=0.0, seed=seed)


def train_once(images, epochs: int = 2) -> tuple[keras.Model, list[dict]]:
    paths, y = images
    trn.seed_everything(7)
    ds = trn.make_dataset(paths, y, SIZE, 8, shuffle=True, seed=7)
    val = trn.make_dataset(paths, y, SIZE, 16)
    model = tiny_model()
    cfg = CFG.model_copy(update={"epochs": epochs})
    rows = trn.fit(model, ds, val, cfg, trn.class_weights(y, 2, "auto"))
    return model, rows


def test_smoke_loss_goes_down_and_model_reloads(images, tmp_path):
    model, rows = train_once(images, epochs=3)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"]
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects needed
    batch = np.stack([np.asarray(Image.open(p)) for p in images[0][:6]]).astype(np.uint8)
    want = model.predict(batch, verbose=0)
    got = loaded.predict(batch, verbose=0)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert loaded.input_shape == (None, SIZE, SIZE, 3)


def test_same_seed_same_history(images):
    _, first = train_once(images, epochs=1)
    _, second = train_once(images, epochs=1)
    assert first == second


def test_dataset_yields_float_pixels_in_uint8_range(images):
    paths, y = images
    x, labels = next(iter(trn.make_dataset(paths, y, SIZE, 5)))
    assert tuple(x.shape) == (5, SIZE, SIZE, 3) and x.dtype.name == "float32"
    assert float(np.min(x)) >= 0.0 and float(np.max(x)) <= 255.0 and float(np.max(x)) > 1.0
    assert labels.numpy().tolist() == y[:5].tolist()


def test_dataset_rejects_wrong_image_size(images):
    paths, y = images
    with pytest.raises(Exception, match=r"(?i)shape"):
        next(iter(trn.make_dataset(paths, y, SIZE + 1, 4)))


def test_class_weights_balanced():
    y = np.array([0] * 6 + [1] * 2)
    assert trn.class_weights(y, 2, "auto") == pytest.approx({0: 8 / 12, 1: 2.0})
    assert trn.class_weights(y, 2, "none") is None
    with pytest.raises(ValueError, match="auto or none"):
        trn.class_weights(y, 2, "balanced")


def test_encode_labels_and_unknown_label():
    assert trn.encode_labels(["b", "a", "b"], ["a", "b"]).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="c"):
        trn.encode_labels(["a", "c"], ["a", "b"])


def test_read_list_and_data_hash(tmp_path):
    lst = tmp_path / "train.csv"
    with lst.open("w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "sha256"), ("data/x.jpg", "a", "00")])
    assert trn.read_list(lst) == (["data/x.jpg"], ["a"])
    options = DecodeOptions(size=32)
    h1 = trn.data_hash([lst], options)
    assert trn.data_hash([lst], DecodeOptions(size=32, jpeg_quality=80)) != h1
    lst.write_text(lst.read_text().replace("00", "01"))
    assert trn.data_hash([lst], options) != h1
    with pytest.raises(FileNotFoundError, match="split"):
        trn.read_list(tmp_path / "missing.csv")


def test_best_row_and_history_file(tmp_path):
    rows = [
        {"epoch": 1, "phase": "train", "loss": 1.0, "val_loss": 0.9, "lr": 0.1},
        {"epoch": 2, "phase": "train", "loss": 0.5, "val_loss": 0.4, "lr": 0.1},
        {"epoch": 3, "phase": "train", "loss": 0.4, "val_loss": 0.6, "lr": 0.1},
    ]
    assert trn.best_row(rows)["epoch"] == 2
    trn.write_history(rows, tmp_path / "h.csv")
    lines = (tmp_path / "h.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,phase,loss") and len(lines) == 4


# -- build_model and backbones -------------------------------------------------------------

BACKBONE_SIZES = {"mobilenetv2": 32, "efficientnetb0": 32, "inceptionv3": 75}


@pytest.mark.parametrize("name", sorted(BACKBONE_SIZES))
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
    out = model.predict(np.full((2, 24, 24, 3), 128, np.uint8), verbose=0)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    if name == "mobilenetv2":
        n = mdl.unfreeze_top(model, 10)
        assert 0 < n <= 10 and base.trainable
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


def test_small_cnn_weights_file_round_trip(tmp_path):
    keras.utils.set_random_seed(5)
    src = mdl.make_backbone("small_cnn", (SIZE, SIZE, 3), "none", (8, 16), 16)
    src.save_weights(tmp_path / "w.weights.h5")
    model = mdl.build_model(
        SIZE, 2, weights=str(tmp_path / "w.weights.h5"), cnn_filters=(8, 16), cnn_dense=16
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
    with pytest.raises(ValueError, match="no ImageNet weights"):
        mdl.build_model(32, 2, weights="imagenet")
    with pytest.raises(ValueError, match="at least 75"):
        mdl.build_model(32, 2, backbone="inceptionv3", backbone_size=32)
    with pytest.raises(ValueError, match="two classes"):
        mdl.build_model(32, 1)


def test_resizing_and_augmentation_are_inside_the_model():
    model = mdl.build_model(
        20, 2, backbone="mobilenetv2", backbone_size=32, augment={"rotation": 0.1, "zoom": 0.1}
    )
    names = [layer.name for layer in model.layers]
    assert "resize" in names and "scale" in names
    assert any(isinstance(layer, keras.layers.RandomRotation) for layer in model.layers)
    x = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 3)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))
