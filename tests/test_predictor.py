"""The shared predictor: loading, compiled batches, decisions, version hashes, MLflow URIs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

import imagefactory as f
from serve.predictor import ModelLoadError, Predictor
from serve.version import dir_md5, file_md5, model_version_info
from serve_fixtures import make_model, metadata
from stages.imaging import DecodeOptions, decode_array


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model") / "models")


@pytest.fixture(scope="module")
def predictor(model_dir):
    p = Predictor.load(model_dir)
    p.warm((1, 4))
    return p


def test_loads_contract_and_compiles_once(predictor):
    assert predictor.class_names == ("safe", "sensitive")
    assert predictor.decode.size == 32
    for n in (1, 3, 7, 16):
        probs = predictor.predict_arrays(np.zeros((n, 32, 32, 3), np.uint8))
        assert probs.shape == (n, 2)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert predictor._infer.experimental_get_tracing_count() == 1  # one fixed signature


def test_decodes_like_preprocess(predictor, tmp_path):
    path = f.write(tmp_path / "x.jpg", f.exif_rotated_jpeg())
    expected = decode_array(path, DecodeOptions(size=32))
    np.testing.assert_array_equal(predictor.decode_image(path), expected)


def test_batch_answers_equal_single_answers(predictor, tmp_path):
    paths = [f.write(tmp_path / f"{i}.png", f.png(i)) for i in range(5)]
    batched = dict(predictor.predict_paths(paths, batch_size=2))
    for path in paths:
        (single,) = predictor.predict_paths([path], batch_size=1)
        assert single[1]["probabilities"] == pytest.approx(batched[path]["probabilities"], abs=1e-6)


def test_bad_file_gets_error_and_the_rest_run(predictor, tmp_path):
    paths = [
        f.write(tmp_path / "a.jpg", f.jpeg(1)),
        f.write(tmp_path / "b.jpg", f.truncated_jpeg()),
        f.write(tmp_path / "c.png", f.bomb_png()),
        f.write(tmp_path / "d.png", f.png(2)),
    ]
    out = dict(predictor.predict_paths(paths, batch_size=3))
    assert "probabilities" in out[paths[0]] and "probabilities" in out[paths[3]]
    assert "truncated" in out[paths[1]]["error"]
    assert "too many pixels" in out[paths[2]]["error"]


def test_threshold_decision(predictor):
    d = predictor.decide({"safe": 0.61, "sensitive": 0.39})
    assert d["label"] == "safe" and d["positive"] is False
    d = predictor.decide({"safe": 0.6, "sensitive": 0.4})
    assert d["label"] == "sensitive" and d["positive"] is True and d["threshold"] == 0.4


def test_without_operating_point_decision_is_argmax(tmp_path):
    p = Predictor.load(make_model(tmp_path / "m", ("a", "b", "c"), threshold=None))
    d = p.decide({"a": 0.2, "b": 0.5, "c": 0.3})
    assert d["label"] == "b" and d["rule"] == "argmax" and "no operating_point" in d["note"]


def test_operating_point_found_in_metrics_beside_models(tmp_path):
    make_model(tmp_path / "models", threshold=0.7)
    (tmp_path / "metrics").mkdir()
    shutil.move(tmp_path / "models" / "operating_point.json", tmp_path / "metrics")
    p = Predictor.load(tmp_path / "models")
    assert p.operating_point.threshold == 0.7


def test_max_pixels_only_tightens(model_dir):
    assert Predictor.load(model_dir, max_pixels=1000).decode.max_pixels == 1000
    assert Predictor.load(model_dir, max_pixels=10**12).decode.max_pixels == 89_478_485


@pytest.mark.parametrize(
    ("breakage", "words"),
    [
        (lambda d: (d / "model.keras").unlink(), "no model.keras"),
        (lambda d: (d / "metadata.json").unlink(), "no metadata.json"),
        (lambda d: (d / "metadata.json").write_text("{oops"), "cannot read"),
        (
            lambda d: (d / "metadata.json").write_text(
                json.dumps(metadata(("safe", "sensitive"), 48))
            ),
            "metadata says 48x48",
        ),
        (
            lambda d: (d / "metadata.json").write_text(
                json.dumps(metadata(("safe", "sensitive", "x"), 32))
            ),
            "outputs 2 values for 3 classes",
        ),
        (
            lambda d: (d / "operating_point.json").write_text('{"positive_class": "dog"}'),
            "numeric threshold",
        ),
        (
            lambda d: (d / "operating_point.json").write_text(
                '{"positive_class": "cat", "threshold": 0.5}'
            ),
            "not one of",
        ),
        (lambda d: (d / "model.keras").write_bytes(b"junk"), "cannot load"),
    ],
    ids=["no-model", "no-meta", "bad-json", "size", "classes", "op-keys", "op-class", "junk"],
)
def test_broken_model_folder_is_a_clear_error(tmp_path, model_dir, breakage, words):
    broken = tmp_path / "models"
    shutil.copytree(model_dir, broken)
    breakage(broken)
    with pytest.raises(ModelLoadError, match=words):
        Predictor.load(broken)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        Predictor.load(tmp_path / "nowhere")


def test_version_hashes_match_dvc(tmp_path, model_dir):
    """Our directory hash equals the one DVC computes; dvc.lock and the cache are read."""
    project = tmp_path / "project"
    shutil.copytree(model_dir, project / "models")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, check=True)
    subprocess.run([*dvc, "add", "-q", "models"], cwd=project, check=True)
    recorded = yaml.safe_load((project / "models.dvc").read_text())["outs"][0]["md5"]
    assert dir_md5(project / "models") == recorded
    lock = {"schema": "2.0", "stages": {"train": {"outs": [{"path": "models", "md5": recorded}]}}}
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    info = model_version_info(project / "models" / "model.keras", None)
    assert info["model_md5"] == file_md5(project / "models" / "model.keras")
    rec = info["dvc_lock"]
    assert rec["md5"] == recorded and rec["dir_matches"] is True
    assert rec["model_md5"] == info["model_md5"] and rec["model_matches"] is True
    (project / "models" / "metadata.json").write_text("{}")
    changed = model_version_info(project / "models" / "model.keras", None)
    assert changed["dvc_lock"]["dir_matches"] is False


def test_version_reads_a_file_out_of_dvc_lock(tmp_path, model_dir):
    """Our train stage declares ``models/model.keras`` as a file out."""
    shutil.copytree(model_dir, tmp_path / "models")
    model = tmp_path / "models" / "model.keras"
    outs = [{"path": "models/model.keras", "md5": file_md5(model), "hash": "md5"}]
    lock = {"schema": "2.0", "stages": {"train": {"outs": outs}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    rec = model_version_info(model, None)["dvc_lock"]
    assert rec["path"] == "models/model.keras" and rec["model_matches"] is True
    assert "dir_matches" not in rec
    outs[0]["md5"] = "0" * 32
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert model_version_info(model, None)["dvc_lock"]["model_matches"] is False


def test_loads_registered_model_from_mlflow(tmp_path, monkeypatch):
    """Log and register a tiny model in a local sqlite MLflow store, load models:/tiny/1."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        _log_load_and_compare(tmp_path)
    finally:
        mlflow.set_tracking_uri(previous)


def _log_load_and_compare(tmp_path):
    import keras
    import mlflow

    exp = mlflow.create_experiment("serve-test", artifact_location=str(tmp_path / "artifacts"))
    src = make_model(tmp_path / "src", ("cat", "dog"), size=24, threshold=0.3)
    model = keras.models.load_model(src / "model.keras")
    meta = json.loads((src / "metadata.json").read_text())
    # 1. metadata carried by the model itself (MLmodel ``metadata``)
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.keras.log_model(model, name="model", registered_model_name="tiny", metadata=meta)
    p = Predictor.load("models:/tiny/1")
    assert p.class_names == ("cat", "dog") and p.decode.size == 24
    assert p.version["mlflow_run_id"] == run.info.run_id
    assert p.operating_point is None  # not logged: decisions fall back to argmax
    x = np.zeros((2, 24, 24, 3), np.uint8)
    np.testing.assert_allclose(p.predict_arrays(x), model.predict(x, verbose=0), atol=1e-6)
    # 2. as the pipeline logs it: bare model, metadata and threshold as run artifacts
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifact(str(src / "metadata.json"), "train")
        mlflow.log_artifact(str(src / "operating_point.json"), "report")
        info = mlflow.keras.log_model(model, name="model")
    mlflow.register_model(info.model_uri, "tiny")
    p = Predictor.load("models:/tiny/2")
    assert p.class_names == ("cat", "dog") and p.version["mlflow_run_id"] == run.info.run_id
    assert p.operating_point.threshold == 0.3 and p.operating_point.positive_class == "dog"
