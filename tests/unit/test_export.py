"""The export stage's pieces: the inference-only model, each format's writer, parity, the
manifest serving trusts, and the runtimes that load the exports."""

from __future__ import annotations

import json
import re
import shutil

import keras
import numpy as np
import pytest

from imgclf import runtimes
from imgclf.bundle import Bundle
from imgclf.config import StageError, load_params
from imgclf.pipeline import export
from imgclf.pipeline import export_formats as formats
from imgclf.pipeline.model import build_model
from imgclf.serving.predictor import ModelLoadError, Predictor
from imgclf.testing import images as f
from imgclf.testing.bundles import export_beside, make_bundle

AUGMENT = {"flip": "horizontal", "rotation": 0.1, "translation": 0.1, "zoom": 0.1, "contrast": 0.1}


def pixels(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def classifier():
    """The project's classifier with every augmentation layer and dropout."""
    keras.utils.set_random_seed(1)
    return build_model(32, 3, augment=AUGMENT, dropout=0.3, seed=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A bundle with its float exports and a dynamic-range TFLite variant beside it."""
    tmp = tmp_path_factory.mktemp("exported")
    bundle = make_bundle(tmp, class_names=("a", "b", "c"), threshold=0.3)
    export_beside(bundle, quantize="dynamic")
    return bundle


def test_inference_model_drops_exactly_the_training_only_layers(classifier):
    dropped = formats.training_only_layers(classifier)
    assert [type(classifier.get_layer(n)).__name__ for n in dropped] == [
        "RandomFlip", "RandomRotation", "RandomTranslation", "RandomZoom", "RandomContrast",
        "Dropout",
    ]  # fmt: skip
    lean = formats.inference_model(classifier)
    kept = [layer.name for layer in lean.layers[1:]]
    assert kept == [n.name for n in classifier.layers[1:] if n.name not in dropped]
    x = pixels(8)
    np.testing.assert_array_equal(lean(x).numpy(), classifier(x, training=False).numpy())
    assert lean.count_params() == classifier.count_params()  # the same weights, shared


def test_inference_model_refuses_a_graph_that_is_not_a_chain():
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(2, 3, name="left")(inputs)
    b = keras.layers.Conv2D(2, 3, name="right")(inputs)
    out = keras.layers.Add(name="join")([a, b])
    with pytest.raises(ValueError, match="layer right is not fed by left alone"):
        formats.inference_model(keras.Model(inputs, out))


def test_tflite_of_the_inference_model_has_no_image_transform_op(classifier, tmp_path):
    path = formats.write_tflite(formats.inference_model(classifier), tmp_path / "m.tflite")
    from ai_edge_litert.interpreter import Interpreter

    ops = {op["op_name"] for op in Interpreter(model_path=str(path))._get_ops_details()}
    assert not {o for o in ops if "Transform" in o or "Random" in o}, ops
    assert "CONV_2D" in ops


def test_two_onnx_conversions_give_the_same_bytes(classifier, tmp_path):
    """tf2onnx numbers folded constants differently each conversion; the canonical names
    make the bytes equal (dvc.lock stays unchanged on a forced rerun)."""
    tflite = formats.write_tflite(formats.inference_model(classifier), tmp_path / "m.tflite")
    first = formats.write_onnx(tflite, tmp_path / "a.onnx", 17).read_bytes()
    second = formats.write_onnx(tflite, tmp_path / "b.onnx", 17).read_bytes()
    assert first == second


def test_saved_model_fingerprint_has_no_random_uuid(classifier, tmp_path):
    from tensorflow.core.protobuf import fingerprint_pb2

    folder = formats.write_saved_model(formats.inference_model(classifier), tmp_path / "sm")
    fingerprint = fingerprint_pb2.FingerprintDef.FromString(
        (folder / "fingerprint.pb").read_bytes()
    )
    assert fingerprint.uuid == ""
    assert fingerprint.saved_model_checksum != 0
    x = pixels(5)
    np.testing.assert_allclose(
        formats.saved_model_call(folder)(x), classifier(x, training=False).numpy(), atol=1e-6
    )


def test_int8_needs_representative_images(classifier, tmp_path):
    with pytest.raises(ValueError, match="int8 quantisation needs representative images"):
        formats.write_tflite(classifier, tmp_path / "q.tflite", "int8", None)


def test_export_folder_holds_every_format_and_a_manifest_serving_can_check(exported):
    folder = exported.parent / runtimes.EXPORT_DIR
    manifest = json.loads((folder / runtimes.MANIFEST).read_text())
    bundle = Bundle.read(exported)
    assert manifest["bundle_md5"] == bundle.md5
    assert manifest["class_names"] == ["a", "b", "c"]
    assert manifest["operating_point"] == bundle.info["operating_point"]
    assert manifest["decode"] == bundle.info["decode"]
    assert set(manifest["exports"]) == {"tflite", "saved_model", "onnx", "tflite_dynamic"}
    for name, facts in manifest["exports"].items():
        path = folder / facts["path"]
        assert facts["md5"] == runtimes.tree_md5(path), name
        assert facts["bytes"] == runtimes.folder_bytes(path), name
    for name in ("tflite", "saved_model", "onnx"):
        facts = manifest["exports"][name]
        assert facts["passed"] is True
        assert facts["max_abs_diff"] <= 1e-4
        assert facts["decision_agreement"] == 1.0
        assert facts["accuracy_delta"] == 0.0
    assert "passed" not in manifest["exports"]["tflite_dynamic"]  # reported, not required
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["bundle.json", "saved_model", "model.tflite", "model.onnx", "model_dynamic.tflite"]
    )


@pytest.mark.parametrize("runtime", ["tflite", "onnx"])
def test_each_runtime_answers_as_keras_for_the_same_files(exported, runtime, tmp_path):
    files = [f.write(tmp_path / f"{i}.jpg", f.jpeg(i, (50 + i, 40))) for i in range(9)]
    keras_answers = dict(Predictor.load(exported, runtime="keras").predict_paths(files, 4))
    theirs = Predictor.load(exported, runtime=runtime)
    assert theirs.version["runtime"]["name"] == runtime
    assert theirs.version["runtime"]["parity"]["passed"] is True
    for path, answer in theirs.predict_paths(files, 4):
        expected = keras_answers[path]
        assert answer["decision"] == expected["decision"]
        assert answer["top_class"] == expected["top_class"]
        for name, p in answer["probabilities"].items():
            assert abs(p - expected["probabilities"][name]) <= 1e-4


def test_auto_keeps_the_fastest_and_says_so(exported):
    predictor = Predictor.load(exported)
    account = predictor.version["runtime"]
    timings = account["timings_ms"]
    assert set(timings) == {"keras", "tflite", "onnx"}
    assert account["name"] == runtimes.pick(timings)
    assert account["requested"] == "auto"
    assert account["unavailable"] == {}
    ranked = sorted(timings, key=timings.__getitem__)
    assert account["why"].startswith(f"fastest batch-1 call: {ranked[0]} ")
    assert account["why"].endswith(" (within 10%: tflite, onnx, keras in that order)")


def test_an_export_of_another_bundle_is_not_used(exported, tmp_path):
    other = make_bundle(tmp_path, class_names=("a", "b", "c"), seed=7)
    shutil.copytree(exported.parent / runtimes.EXPORT_DIR, tmp_path / runtimes.EXPORT_DIR)
    md5 = Bundle.read(other).md5
    shipped = Bundle.read(exported).md5
    why = f"export/ was exported from bundle md5 {shipped}, not {md5} (run the export stage)"
    with pytest.raises(ModelLoadError, match=r"runtime tflite is not available for this bundle"):
        Predictor.load(other, runtime="tflite")
    account = Predictor.load(other).version["runtime"]
    assert account["name"] == "keras"
    assert account["unavailable"] == {"tflite": why, "onnx": why}


def test_an_export_file_changed_after_its_check_is_not_used(exported, tmp_path):
    copy = tmp_path / "bundle.zip"
    shutil.copy(exported, copy)
    shutil.copytree(exported.parent / runtimes.EXPORT_DIR, tmp_path / runtimes.EXPORT_DIR)
    onnx = tmp_path / runtimes.EXPORT_DIR / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    exports = runtimes.read_exports(tmp_path / runtimes.EXPORT_DIR, Bundle.read(copy).md5)
    assert sorted(exports.files) == ["tflite"]
    assert exports.missing == {"onnx": "model.onnx is not the file the parity check passed"}


def test_without_an_export_only_keras_runs(tmp_path):
    bundle = make_bundle(tmp_path)
    with pytest.raises(ModelLoadError, match=r"runtime onnx is not available for this bundle: "
                       r"no export \(run the export stage: export/bundle.json"):  # fmt: skip
        Predictor.load(bundle, runtime="onnx")
    assert Predictor.load(bundle).version["runtime"]["name"] == "keras"


def test_parity_miss_is_one_error_naming_the_export_and_the_bound(tmp_path):
    bundle = make_bundle(tmp_path)
    with pytest.raises(StageError) as caught:
        export_beside(bundle, max_abs_diff=0.0)
    # SavedModel runs TF's own kernels (difference 0: within the bound); TFLite and ONNX not
    assert re.fullmatch(
        r"export parity failed on 64 test images \(tflite: max \|p - p_keras\| [\d.]+e-\d\d > 0"
        r" \| onnx: max \|p - p_keras\| [\d.]+e-\d\d > 0\); models/export/ is not written "
        r"\(figures in metrics/export.json\)",
        str(caught.value),
    ), str(caught.value)
    assert not (tmp_path / runtimes.EXPORT_DIR).exists()


def test_parity_counts_each_differing_decision():
    rule = export.Rule(positive=1, threshold=0.5)
    keras_probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]], np.float32)
    theirs = keras_probs.copy()
    theirs[1] = [0.51, 0.49]  # crosses the threshold: the decision flips
    labels = np.array([0, 1, 1, 0])
    parity = export.Parity(quantized=False)
    parity.add(keras_probs, theirs, labels, rule)
    cfg = load_params().export
    assert parity.max_abs_diff == pytest.approx(0.11, abs=1e-6)
    assert parity.misses(cfg) == [
        "max |p - p_keras| 0.11 > 0.0001",
        "1 of 4 decisions differ (agreement 0.7500 < 1)",
    ]
    assert parity.facts(cfg) == {
        "max_abs_diff": pytest.approx(0.11, abs=1e-6),
        "decision_agreement": 0.75,
        "accuracy": 0.75,
        "accuracy_delta": -0.25,
        "passed": False,
    }
    quantized = export.Parity(quantized=True)
    quantized.add(keras_probs, theirs, labels, rule)
    assert quantized.misses(cfg) == []
    assert "passed" not in quantized.facts(cfg)


@pytest.mark.parametrize(
    ("n", "chunks"), [(1, [1]), (37, [32, 4, 1]), (64, [64]), (130, [64, 64, 2]), (0, [])]
)
def test_tflite_batches_run_as_powers_of_two(n, chunks):
    assert runtimes._chunks(n, 64) == chunks


def test_tflite_batch_equals_its_rows_one_by_one(exported):
    folder = exported.parent / runtimes.EXPORT_DIR
    engine = runtimes.TfliteRuntime((folder / "model.tflite").read_bytes())
    x = pixels(37)
    together = engine(x)
    alone = np.concatenate([engine(x[i : i + 1]) for i in range(37)])
    assert together.shape == (37, 3)
    np.testing.assert_allclose(together, alone, atol=1e-6)


def test_predict_cli_answers_alike_on_each_runtime(exported, tmp_path, capsys):
    from imgclf.serving import predict

    image = str(f.write(tmp_path / "x.jpg", f.jpeg(3, (70, 50))))
    docs = {}
    for runtime in ("keras", "onnx", "tflite"):
        argv = ["--image_source", image, "--model", str(exported), "--runtime", runtime]
        assert predict.main(argv) == 0
        docs[runtime] = json.loads(capsys.readouterr().out)
    for runtime in ("onnx", "tflite"):
        assert docs[runtime]["__decision__"] == docs["keras"]["__decision__"]
        assert docs[runtime][image] == pytest.approx(docs["keras"][image], abs=1e-4)


def test_predict_cli_names_a_missing_export_and_exits_2(tmp_path, capsys, caplog):
    from imgclf.serving import predict

    bundle = make_bundle(tmp_path)
    image = str(f.write(tmp_path / "x.jpg", f.jpeg(3)))
    argv = ["--image_source", image, "--model", str(bundle), "--runtime", "tflite"]
    assert predict.main(argv) == 2
    assert capsys.readouterr().out == ""
    why = "no export (run the export stage: export/bundle.json: No such file or directory)"
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"bundle.zip: runtime tflite is not available for this bundle: {why}"
    ]


@pytest.mark.parametrize(
    ("timings", "chosen"),
    [
        ({"keras": 1.0, "tflite": 0.105, "onnx": 0.1}, "tflite"),  # a near-tie: preference
        ({"keras": 1.0, "tflite": 0.2, "onnx": 0.1}, "onnx"),  # clearly faster wins
        ({"keras": 0.5, "tflite": 0.56}, "keras"),
        ({"keras": 0.5, "onnx": 0.54}, "onnx"),
        ({"keras": 0.5}, "keras"),
    ],
)
def test_auto_settles_near_ties_by_preference(timings, chosen):
    assert runtimes.pick(timings) == chosen
