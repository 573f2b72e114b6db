"""``python serve/predict.py`` as a user runs it: a folder with one bad file, a file, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import imagefactory as f
from serve_fixtures import ROOT, make_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    folder = tmp / "images"
    for i in range(5):
        f.write(folder / f"img{i}.jpg", f.jpeg(i))
    f.write(folder / "broken.jpg", f.truncated_jpeg())
    f.write(folder / "sub" / "deep.png", f.png(9))
    return make_model(tmp / "models"), folder


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "serve/predict.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


def test_folder_with_one_bad_file(setup):
    model, folder = setup
    out = run("--image_source", str(folder), "--model", str(model), "--batch-size", "2")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    paths = sorted(k for k in doc if not k.startswith("__"))
    assert paths == [str(folder / f"img{i}.jpg") for i in range(5)]  # not recursive
    for path in paths:
        assert set(doc[path]) == {"safe", "sensitive"}  # the origin's shape
        assert doc["__decision__"][path]["label"] in ("safe", "sensitive")
    assert "truncated" in doc["__errors__"][str(folder / "broken.jpg")]
    assert "6/6" in out.stderr  # progress
    assert "broken.jpg" in out.stderr


def test_recursive_single_file_and_plain(setup):
    model, folder = setup
    rec = json.loads(
        run("--image_source", str(folder), "--model", str(model), "--recursive").stdout
    )
    assert str(folder / "sub" / "deep.png") in rec
    one = run("--image_source", str(folder / "img1.jpg"), "--model", str(model), "--plain")
    assert one.returncode == 0
    doc = json.loads(one.stdout)
    assert list(doc) == [str(folder / "img1.jpg")]
    assert rec[str(folder / "img1.jpg")] == pytest.approx(doc[str(folder / "img1.jpg")])


def test_missing_source_and_missing_model(setup, tmp_path):
    model, folder = setup
    out = run("--image_source", str(tmp_path / "nope"), "--model", str(model))
    assert out.returncode == 2 and out.stdout == ""
    assert "image source not found" in out.stderr
    out = run("--image_source", str(folder), "--model", str(tmp_path / "no-model"))
    assert out.returncode == 2 and "model folder not found" in out.stderr
    bad = f.write(tmp_path / "only_bad.jpg", b"nope")
    out = run("--image_source", str(bad), "--model", str(model))
    assert out.returncode == 1 and "__errors__" in json.loads(out.stdout)
