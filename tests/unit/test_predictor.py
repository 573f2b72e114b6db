"""The shared predictor: loading bundles, compiled batches, decisions, version, MLflow URIs."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import yaml

from imgclf.bundle import INFO_ENTRY, MODEL_ENTRY
from imgclf.files import file_md5
from imgclf.imaging import decode_array, serving_input
from imgclf.serving.predictor import ModelLoadError, Predictor
from imgclf.testing import images as f
from imgclf.testing.bundles import (
    RUN_FACTS,
    bundle_info,
    make_bundle,
    save_tiny_model,
    string_values,
    write_raw_bundle,
)
from imgclf.testing.images import preprocess_options


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle") / "models")


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model.keras").read_bytes()


@pytest.fixture(scope="module")
def predictor(bundle):
    p = Predictor.load(bundle)
    p.warm((1, 4))
    return p


def test_loads_contract_and_compiles_once(predictor):
    assert predictor.class_names == ("safe", "sensitive")
    assert predictor.decode == preprocess_options(size=32)
    assert predictor.operating_point.positive_class == "sensitive"
    assert predictor.operating_point.threshold == 0.4
    assert predictor.operating_point.target_recall == 0.9
    for n in (1, 3, 7, 16):
        probs = predictor.predict_arrays(np.zeros((n, 32, 32, 3), np.uint8))
        assert probs.shape == (n, 2)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert predictor._infer.traces() == 1  # one fixed signature


def test_folder_holding_the_bundle_loads_the_same_bundle(bundle, predictor):
    p = Predictor.load(bundle.parent)
    assert p.version["bundle_md5"] == predictor.version["bundle_md5"] == file_md5(bundle)


def test_decodes_exactly_what_training_read(predictor, tmp_path):
    """Serving input is the training round trip: decode, fit, JPEG q95, TF decode."""
    path = f.write(tmp_path / "x.jpg", f.exif_rotated_jpeg())
    expected = serving_input(path, preprocess_options(size=32))
    got = predictor.decode_image(path)
    assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got, expected)
    # the JPEG round trip is really there: not the plain fitted pixels
    assert not np.array_equal(got, decode_array(path, preprocess_options(size=32)))
    np.testing.assert_array_equal(predictor.decode_image(path.read_bytes()), expected)


def test_decode_uses_the_bundles_jpeg_quality(tmp_path):
    decode = preprocess_options(size=32, jpeg_quality=40).to_dict()
    p = Predictor.load(make_bundle(tmp_path / "models", decode=decode))
    assert p.decode.jpeg_quality == 40
    path = f.write(tmp_path / "x.png", f.png(3))
    at_40 = serving_input(path, preprocess_options(size=32, jpeg_quality=40))
    np.testing.assert_array_equal(p.decode_image(path), at_40)
    assert not np.array_equal(at_40, serving_input(path, preprocess_options(size=32)))


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
    assert set(out[paths[0]]) == {"probabilities", "top_class", "top_probability", "decision"}
    assert set(out[paths[3]]) == {"probabilities", "top_class", "top_probability", "decision"}
    assert "truncated" in out[paths[1]]["error"]
    assert "too many pixels" in out[paths[2]]["error"]


def test_threshold_decision(predictor):
    d = predictor.decide({"safe": 0.61, "sensitive": 0.39})
    assert d == {
        "label": "safe",
        "rule": "threshold",
        "positive_class": "sensitive",
        "threshold": 0.4,
        "positive": False,
    }
    d = predictor.decide({"safe": 0.6, "sensitive": 0.4})
    assert d["label"] == "sensitive" and d["positive"] is True and d["threshold"] == 0.4


def test_threshold_decision_with_three_classes(tmp_path):
    """Below the threshold, the label is the likeliest of the other classes."""
    p = Predictor.load(make_bundle(tmp_path / "m", ("a", "b", "c"), threshold=0.5))
    assert p.operating_point.positive_class == "c"
    d = p.decide({"a": 0.2, "b": 0.35, "c": 0.45})
    assert d["label"] == "b" and d["positive"] is False and d["rule"] == "threshold"
    d = p.decide({"a": 0.05, "b": 0.45, "c": 0.5})
    assert d["label"] == "c" and d["positive"] is True


def test_describe(predictor):
    answer = predictor.describe(np.array([0.7, 0.3], np.float32))
    assert answer["top_class"] == "safe"
    assert answer["top_probability"] == pytest.approx(0.7)
    assert answer["probabilities"] == pytest.approx({"safe": 0.7, "sensitive": 0.3})
    assert answer["decision"]["label"] == "safe"


def test_max_pixels_only_tightens(bundle):
    assert Predictor.load(bundle, max_pixels=1000).decode.max_pixels == 1000
    own = preprocess_options().max_pixels  # what the bundle's decode settings say
    assert Predictor.load(bundle, max_pixels=own * 10).decode.max_pixels == own


def _flip_model_byte(data: bytes) -> bytes:
    """Change one byte inside the stored ``model.keras`` entry (its CRC no longer holds)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        offset = zf.getinfo(MODEL_ENTRY).header_offset
    name_len, extra_len = struct.unpack("<HH", data[offset + 26 : offset + 30])
    at = offset + 30 + name_len + extra_len + 200
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def _info_without(key):
    def build(tmp, model, good):
        info = bundle_info()
        del info[key]
        return write_raw_bundle(tmp / "bundle.zip", info, model)

    return build


def _raw(fmt=1, **changes):
    def build(tmp, model, good):
        return write_raw_bundle(tmp / "bundle.zip", bundle_info(**changes), model, fmt)

    return build


def _bytes(make):
    def build(tmp, model, good):
        path = tmp / "bundle.zip"
        path.write_bytes(make(good.read_bytes()))
        return path

    return build


def _only_model(tmp, model, good):
    with zipfile.ZipFile(tmp / "bundle.zip", "w") as zf:
        zf.writestr(MODEL_ENTRY, model)
    return tmp / "bundle.zip"


def _info_not_json(tmp, model, good):
    with zipfile.ZipFile(tmp / "bundle.zip", "w") as zf:
        zf.writestr(MODEL_ENTRY, model)
        zf.writestr(INFO_ENTRY, "{oops")
    return tmp / "bundle.zip"


BROKEN = {
    "empty": (_bytes(lambda d: b""), "bundle.zip is empty"),
    "truncated": (_bytes(lambda d: d[: len(d) // 2]), r"not a complete bundle \(BadZipFile"),
    "junk": (_bytes(lambda d: b"PK junk" * 50), r"not a complete bundle \(BadZipFile"),
    "crc": (_bytes(_flip_model_byte), r"bundle is corrupt \(CRC mismatch\)"),
    "no-info": (_only_model, r"not a complete bundle \(KeyError"),
    "info-not-json": (_info_not_json, r"not a complete bundle \(JSONDecodeError"),
    "info-not-object": (
        lambda tmp, model, good: write_raw_bundle(tmp / "bundle.zip", [1, 2], model),
        "bundle.json must hold a JSON object",
    ),
    "no-op": (_info_without("operating_point"), "bundle.json lacks operating_point"),
    "no-gate": (_info_without("gate"), "bundle.json lacks gate"),
    "format": (_raw(fmt=2), "bundle format 2 is not 1"),
    "no-format": (_raw(fmt=None), "bundle format None is not 1"),
    "one-class": (_raw(class_names=("only",)), "at least two classes"),
    "op-class": (_raw(positive_class="dog"), "does not fit the classes"),
    "op-threshold": (_raw(threshold=1.5), "does not fit the classes"),
    "gate-failed": (_raw(gate_passed=False), "did not pass its quality gate"),
    "size": (_raw(size=48), r"takes \(32, 32, 3\), its info says 48x48x3"),
    "classes": (_raw(class_names=("a", "b", "c")), "outputs 2 values for 3 classes"),
    "junk-model": (
        lambda tmp, model, good: write_raw_bundle(tmp / "bundle.zip", bundle_info(), b"junk"),
        "cannot load the bundle's model",
    ),
}


@pytest.mark.parametrize(("build", "words"), list(BROKEN.values()), ids=list(BROKEN))
def test_broken_or_unpromoted_bundle_is_a_clear_error(tmp_path, bundle, model_bytes, build, words):
    path = build(tmp_path, model_bytes, bundle)
    with pytest.raises(ModelLoadError, match=words) as caught:
        Predictor.load(path)
    # the message reaches /readyz and /version (last_reload_error): no server paths in it
    message = str(caught.value)
    assert message.startswith(("bundle.zip: ", "the bundle's model", "cannot load the")), message
    assert str(tmp_path) not in message and "/tmp" not in message, message


def test_missing_bundle_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no model bundle at nowhere\.zip: run `dvc repro`"):
        Predictor.load(tmp_path / "nowhere.zip")
    (tmp_path / "empty-models").mkdir()
    with pytest.raises(ModelLoadError, match=r"no model bundle at bundle\.zip"):
        Predictor.load(tmp_path / "empty-models")


def test_version_describes_the_bundle(predictor, bundle):
    v = predictor.version
    assert v["bundle_md5"] == file_md5(bundle)
    assert v["source"] == "bundle.zip"  # outside the project and cwd: the name alone
    assert v["dvc_lock"] is None and v["registry"] is None
    assert v["class_names"] == ["safe", "sensitive"] and v["image_size"] == 32
    assert v["operating_point"] == {"positive_class": "sensitive", "threshold": 0.4}
    info = bundle_info()
    for key in ("gate", "metrics", "data_hash"):
        assert v[key] == info[key], key
    for key in ("git_commit", "mlflow_run_id", "run_name"):  # from bundle.run.json
        assert v[key] == RUN_FACTS[key], key
    assert not [s for s in string_values(v) if s.startswith("/")]


def test_version_hash_matches_dvc_and_dvc_lock(tmp_path, monkeypatch):
    """The bundle md5 equals the one DVC records; dvc.lock's record is shown and compared."""
    project = tmp_path / "project"
    bundle = make_bundle(project / "models")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, check=True)
    subprocess.run([*dvc, "add", "-q", "models/bundle.zip"], cwd=project, check=True)
    recorded = yaml.safe_load((project / "models" / "bundle.zip.dvc").read_text())["outs"][0]["md5"]
    outs = [{"path": "models/bundle.zip", "hash": "md5", "md5": recorded, "size": 1}]
    lock = {"schema": "2.0", "stages": {"promote": {"cmd": "x", "outs": outs}}}
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    monkeypatch.chdir(project)
    v = Predictor.load(bundle).version
    assert v["bundle_md5"] == recorded == file_md5(bundle)
    assert v["source"] == "models/bundle.zip"
    assert v["dvc_lock"] == {
        "stage": "promote",
        "path": "models/bundle.zip",
        "md5": recorded,
        "matches": True,
    }
    make_bundle(project / "models", seed=3)  # a new bundle that dvc.lock does not record
    changed = Predictor.load(project / "models").version
    assert changed["bundle_md5"] != recorded
    assert changed["dvc_lock"]["matches"] is False and changed["dvc_lock"]["md5"] == recorded


def test_loads_registered_bundle_from_mlflow(tmp_path, monkeypatch):
    """Log and register a bundle as the pipeline does, in a local sqlite MLflow store."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        _register_load_and_compare(tmp_path, uri)
    finally:
        mlflow.set_tracking_uri(previous)


def _register_load_and_compare(tmp_path, uri):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment("serve-test", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    bundle = make_bundle(
        tmp_path / "promoted",
        ("cat", "dog"),
        size=24,
        threshold=0.3,
        mlflow_run_id=run_id,
        run_name="tiny-run",
    )
    # as imgclf.tracking.Run.register_bundle does
    client.log_artifact(run_id, str(bundle), "bundle")
    client.create_registered_model("tiny")
    mv = client.create_model_version("tiny", source=f"runs:/{run_id}/bundle", run_id=run_id)
    client.set_registered_model_alias("tiny", "champion", mv.version)
    client.log_artifact(run_id, str(f.write(tmp_path / "notes.txt", b"x")), "other")
    client.set_terminated(run_id)

    p = Predictor.load("models:/tiny@champion")
    assert p.class_names == ("cat", "dog") and p.decode.size == 24
    assert p.operating_point.threshold == 0.3 and p.operating_point.positive_class == "dog"
    v = p.version
    assert v["bundle_md5"] == file_md5(bundle)
    assert v["source"] == "models:/tiny@champion"
    assert v["registry"] == {"name": "tiny", "version": "1", "alias": "champion"}
    assert v["mlflow_run_id"] == run_id  # from the registry, not from a file
    assert v["run_name"] == client.get_run(run_id).info.run_name
    assert v["dvc_lock"] is None
    assert not [s for s in string_values(v) if s.startswith("/")]
    # the same bytes by every kind of URI (the same md5: the same model and threshold)
    by_version = Predictor.load("models:/tiny/1").version
    assert by_version["bundle_md5"] == file_md5(bundle) and by_version["registry"]["alias"] is None
    by_run = Predictor.load(f"runs:/{run_id}/bundle").version
    assert by_run["bundle_md5"] == file_md5(bundle) and by_run["registry"] is None
    with pytest.raises(ModelLoadError, match=f"runs:/{run_id}/other holds no bundle.zip"):
        Predictor.load(f"runs:/{run_id}/other")


def test_source_with_copied_bundle_keeps_its_md5(tmp_path, bundle):
    copy = tmp_path / "elsewhere" / "served.zip"
    copy.parent.mkdir()
    shutil.copy(bundle, copy)
    v = Predictor.load(copy).version
    assert v["bundle_md5"] == file_md5(bundle) and v["source"] == "served.zip"


# -- lineage by content: the registry knows a bundle by its md5 ----------------------------
LINEAGE = ("registry", "mlflow_run_id", "run_name", "git_commit")
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def test_a_registered_bundle_without_its_run_facts_is_traced_by_its_md5(tmp_path, monkeypatch):
    """As after ``git checkout`` of an older commit or ``dvc exp apply``: ``bundle.run.json``
    describes another bundle, or is absent; the registry finds the version by the md5."""
    from imgclf import tracking
    from imgclf.bundle import write_run_facts
    from imgclf.config import PATHS
    from imgclf.params import load_params

    ml = load_params(PATHS.params).mlflow  # the name and alias serving looks up
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run = tracking.Run.start(uri, "exp", "repro-old", tmp_path / "pending", run_name="repro-old")
    bundle = make_bundle(tmp_path / "models")
    registered = run.register_bundle(
        bundle, ml.registered_model, "accuracy", 0.9, ml.champion_alias, COMMIT
    )
    run.end()
    assert registered["version"] == "1" and run.ok
    expected = {
        "registry": {"name": ml.registered_model, "version": "1", "alias": ml.champion_alias},
        "mlflow_run_id": run.run_id,
        "run_name": "repro-old",
        "git_commit": COMMIT,
    }
    newer = {"bundle_md5": "0" * 32, "mlflow_run_id": "another-run", "git_commit": "f" * 40}
    write_run_facts(bundle, newer | {"run_name": "repro-newer"})  # the last promoted bundle's
    mismatched = Predictor.load(bundle, runtime="keras").version
    assert {k: mismatched[k] for k in LINEAGE} == expected
    (tmp_path / "models" / "bundle.run.json").unlink()
    absent = Predictor.load(bundle, runtime="keras").version
    assert {k: absent[k] for k in LINEAGE} == expected
    assert absent["bundle_md5"] == file_md5(bundle)


def test_an_unreachable_registry_leaves_the_lineage_empty_and_the_bundle_served(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # connection refused
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    bundle = make_bundle(tmp_path / "models")
    (tmp_path / "models" / "bundle.run.json").unlink()
    p = Predictor.load(bundle, runtime="keras")
    assert [p.version[k] for k in LINEAGE] == [None, None, None, None]
    assert p.predict_arrays(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 2)
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warning.getMessage().startswith(
        f"registry look-up of bundle md5 {file_md5(bundle)} in http://127.0.0.1:9 failed ("
    )


def test_run_facts_that_name_the_registration_are_used_without_a_look_up(
    tmp_path, monkeypatch, caplog
):
    from imgclf.bundle import write_run_facts

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never asked
    bundle = make_bundle(tmp_path / "models")
    registered = {"name": "imgclf", "version": "7", "alias": "champion"}
    facts = {**RUN_FACTS, "bundle_md5": file_md5(bundle), "mlflow_run_id": "r7"}
    write_run_facts(bundle, facts | {"registered": registered | {"champion_version": "7"}})
    v = Predictor.load(bundle, runtime="keras").version
    assert {k: v[k] for k in LINEAGE} == {
        "registry": registered,
        "mlflow_run_id": "r7",
        "run_name": RUN_FACTS["run_name"],
        "git_commit": RUN_FACTS["git_commit"],
    }
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []
