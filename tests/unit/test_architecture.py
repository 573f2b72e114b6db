"""The model picture `train` writes (needs Graphviz's `dot`)."""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import subprocess

import pytest
from PIL import Image

from imgclf.config import StageError
from imgclf.pipeline.architecture import (
    DEBIAN_PACKAGE,
    DPI,
    GraphvizMissingError,
    can_draw,
    dot_source,
    draw_if_possible,
    draw_model,
)


def tiny_model():
    """A functional model around a nested functional backbone (as ``build_model`` makes)."""
    import keras

    inner_in = keras.Input((16, 16, 3), name="pixels")  # unnamed: input_layer_<n>
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv0")(inner_in)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    backbone = keras.Model(inner_in, x, name="backbone")
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Rescaling(1 / 255, name="scale")(inputs)
    outputs = keras.layers.Dense(2, activation="softmax", name="probs")(backbone(x))
    return keras.Model(inputs, outputs, name="classifier_tiny")


def layout_size(source: str, dpi: int) -> tuple[int, int]:
    """Pixels of Graphviz's own layout of ``source`` at ``dpi``, with its default margin
    (``pad``: 4 points a side)."""
    plain = subprocess.run(
        ["dot", "-Tplain"], input=source.encode(), capture_output=True, check=True
    )
    _, _, width, height = plain.stdout.decode().splitlines()[0].split()
    return round(float(width) * dpi) + 8 * dpi // 72, round(float(height) * dpi) + 8 * dpi // 72


def test_draws_the_layout_as_a_png(tmp_path):
    model = tiny_model()
    path = draw_model(model, tmp_path / "candidate" / "model.png")
    assert path == tmp_path / "candidate" / "model.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    assert (width, height) == layout_size(dot_source(model), DPI)
    assert height > width  # a column of five boxes
    assert [p.name for p in path.parent.iterdir()] == ["model.png"]  # no temporary left


def test_source_has_every_layer_and_no_memory_addresses():
    source = dot_source(tiny_model())
    for name in ("image", "scale", "conv0", "pool", "probs", "cluster_backbone", "relu"):
        assert name in source
    assert "n0 [" in source and "n0 -> n1" in source
    assert not re.search(r"\b\d{9,}\b", source)  # id() of a layer: 12-15 digits


def test_same_bytes_every_time(tmp_path):
    """Rebuilt (new objects, new memory addresses: as in another process), the same
    model draws to the same bytes. (Its layers are all named: Keras numbers unnamed ones
    by how many it made before in the process, and the picture shows the names.)"""
    first = draw_model(tiny_model(), tmp_path / "a.png").read_bytes()
    again = draw_model(tiny_model(), tmp_path / "b.png").read_bytes()
    assert first == again


def test_no_dot_on_path_is_a_clear_error(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert not can_draw()
    with pytest.raises(GraphvizMissingError) as err:
        draw_model(tiny_model(), tmp_path / "model.png")
    said = str(err.value)
    assert "`dot`" in said and f"apt-get install {DEBIAN_PACKAGE}" in said
    assert isinstance(err.value, StageError)  # a stage reports it as one `error:` line
    assert not (tmp_path / "model.png").exists()
    # train goes on without the picture, saying why
    with caplog.at_level(logging.WARNING):
        assert draw_if_possible(tiny_model(), tmp_path / "model.png") is None
    assert caplog.messages == [f"{tmp_path / 'model.png'} not drawn: {said}"]
    assert not (tmp_path / "model.png").exists()


def test_a_failing_dot_is_an_error(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Error: something broke' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(StageError, match=r"exit status 3\): Error: something broke"):
        draw_model(tiny_model(), tmp_path / "model.png")
    assert not (tmp_path / "model.png").exists()
