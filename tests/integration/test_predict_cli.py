"""``python serve/predict.py`` as a user runs it: a folder with one bad file, a file, errors,
special entries."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from imgclf.serving.predictor import Predictor
from imgclf.testing import images as f
from imgclf.testing.bundles import make_bundle
from imgclf.testing.project import SOURCE as ROOT


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    folder = tmp / "images"
    for i in range(5):
        f.write(folder / f"img{i}.jpg", f.jpeg(i))
    f.write(folder / "broken.jpg", f.truncated_jpeg())
    f.write(folder / "sub" / "deep.png", f.png(9))
    return make_bundle(tmp / "models"), folder


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
        decision = doc["__decision__"][path]
        assert decision["rule"] == "threshold" and decision["threshold"] == 0.4
        expected = "sensitive" if doc[path]["sensitive"] >= 0.4 else "safe"
        assert decision["label"] == expected
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
    assert "image source not found" in out.stderr and "no such file or directory" in out.stderr
    out = run("--image_source", str(folder), "--model", str(tmp_path / "no-model.zip"))
    assert out.returncode == 2 and out.stdout == ""
    assert "no model bundle at no-model.zip" in out.stderr
    assert "Traceback" not in out.stderr
    bad = f.write(tmp_path / "only_bad.jpg", b"nope")
    out = run("--image_source", str(bad), "--model", str(model))
    assert out.returncode == 1 and "__errors__" in json.loads(out.stdout)


def test_same_answers_as_the_predictor_and_a_bundle_folder_works(setup):
    """``--model`` may name the folder holding bundle.zip; answers are the Predictor's."""
    model, folder = setup
    out = run("--image_source", str(folder), "--model", str(model.parent), "--plain")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    expected = dict(Predictor.load(model).predict_paths(sorted(folder.glob("img*.jpg"))))
    assert sorted(doc) == sorted(str(p) for p in expected)
    for path, answer in expected.items():
        assert doc[str(path)] == pytest.approx(answer["probabilities"], abs=1e-6)


def test_bundle_that_failed_its_gate_is_refused(setup, tmp_path):
    _, folder = setup
    failed = make_bundle(tmp_path / "failed.zip", gate_passed=False)
    out = run("--image_source", str(folder), "--model", str(failed))
    assert out.returncode == 2 and out.stdout == ""
    assert "failed.zip: the bundle did not pass its quality gate" in out.stderr


def test_special_entries_are_reported_never_a_traceback_or_a_hang(setup, tmp_path):
    """A FIFO is listed, not opened (that would block); ``/dev/null`` is no image: exit 1."""
    model, _ = setup
    folder = tmp_path / "mixed"
    f.write(folder / "img.jpg", f.jpeg(1))
    os.mkfifo(folder / "pipe")
    (folder / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    out = run("--image_source", str(folder), "--model", str(model))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [k for k in doc if not k.startswith("__")] == [str(folder / "img.jpg")]
    assert doc["__errors__"] == {
        str(folder / "dangling.jpg"): f"dangling symbolic link (to {tmp_path / 'gone.jpg'})",
        str(folder / "pipe"): "not a regular file (FIFO)",
    }
    assert "pipe: not a regular file (FIFO)" in out.stderr
    out = run("--image_source", "/dev/null", "--model", str(model))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert json.loads(out.stdout)["__errors__"] == {
        "/dev/null": "not a regular file (character device)"
    }
