"""Paths, the params contract (``imgclf.params``) and the one-line stage errors."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from imgclf.config import Paths, StageError, digest, stage_main
from imgclf.params import (
    Params,
    ParamsError,
    load_params,
    load_serve_settings,
    min_images_per_class,
    raw_classes,
    validate,
)
from imgclf.testing import images as f

ROOT = Path(__file__).resolve().parents[2]
GOOD = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_workspace_is_found_from_a_queued_experiment_copy(tmp_path):
    assert Paths(tmp_path).workspace == tmp_path
    inner = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    assert Paths(inner).workspace == tmp_path
    assert Paths(inner).cache == tmp_path / ".cache"


def test_digest_is_order_independent():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_the_shipped_files_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.split.test_size == 0.3 and params.report.positive_class is None
    assert load_serve_settings(ROOT / "serve.yaml").tcp_port == 1235


def error_of(section: str, **changes) -> str:
    data = copy.deepcopy(GOOD)
    for key, value in changes.items():
        target = data[section]
        *path, last = key.split("__")
        for part in path:
            target = target[part]
        if value is KeyError:
            target.pop(last)
        else:
            target[last] = value
    with pytest.raises(ParamsError) as info:
        validate(data, Params, "params.yaml")
    return str(info.value)


@pytest.mark.parametrize(
    ("section", "changes", "message"),
    [
        (
            "report",
            {"min_acuracy": 0.999},
            "params.yaml: report.min_acuracy: unknown key (the quality gate is promote.metric "
            "and promote.min_value now)",
        ),
        (
            "train",
            {"epocs": 3, "epochs": KeyError},
            "params.yaml: train.epocs: unknown key (did you mean 'epochs'?)",
        ),
        (
            "train",
            {"epochs": "abc"},
            "params.yaml: train.epochs: input should be a valid integer, got 'abc'",
        ),
        ("train", {"epochs": KeyError}, "params.yaml: train.epochs: missing"),
        (
            "split",
            {"test_size": 1.2},
            "params.yaml: split.test_size: input should be less than 1 (got 1.2)",
        ),
        (
            "train",
            {"augment__flip": "diagonal"},
            "params.yaml: train.augment.flip: input should be 'none', 'horizontal', "
            "'vertical' or 'horizontal_and_vertical', got 'diagonal'",
        ),
        (
            "train",
            {"weights": "imagenet"},
            "params.yaml: train.weights: cnn has no ImageNet weights (use none or a file)",
        ),
        (
            "promote",
            {"metric": "f1"},
            "params.yaml: promote.metric: input should be 'accuracy', 'macro_f1', 'roc_auc' "
            "or 'pr_auc', got 'f1'",
        ),
    ],
)
def test_bad_params_give_one_line_naming_the_key(section, changes, message):
    got = error_of(section, **changes)
    assert got == message
    assert "\n" not in got


def test_serve_settings_are_not_pipeline_params():
    data = {**copy.deepcopy(GOOD), "serve": {"http_port": 8000}}
    with pytest.raises(ParamsError, match=r"^params.yaml: serve: unknown key \(serving settings"):
        validate(data, Params, "params.yaml")


def test_positive_class_is_checked_against_the_raw_class_folders(tmp_path):
    """A folder without an image (here ``nsfw/``: a hidden file and a caption) is no class."""
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({**GOOD, "report": {**GOOD["report"], "positive_class": "nsfw"}})
    )
    for name in ("cats", "dogs"):
        f.write(tmp_path / "raw" / name / "sub" / "a.png", f.png(1))
    f.write(tmp_path / "raw" / "nsfw" / ".DS_Store", b"\x00")
    f.write(tmp_path / "raw" / "nsfw" / "sub" / "caption.txt", b"a caption")
    with pytest.raises(ParamsError) as info:
        load_params(tmp_path / "params.yaml", tmp_path / "raw")
    assert str(info.value) == (
        "params.yaml: report.positive_class: 'nsfw' is not a class; raw/ has 'cats', 'dogs' "
        "(set one of them, or null for the rarest)"
    )


def test_raw_classes_are_the_folders_holding_an_image(tmp_path):
    raw = tmp_path / "raw"
    f.write(raw / "cats" / "a.jpg", f.jpeg(1))
    f.write(raw / "dogs" / "sub" / "deeper" / "noext", f.png(2))  # at any depth, any name
    f.write(raw / "broken" / "x.jpg", b"not decodable")  # a candidate: invalid, still a class
    (raw / "empty").mkdir()
    f.write(raw / "hidden_only" / ".DS_Store", b"\x00")
    f.write(raw / "sidecars_only" / "sub" / "notes.TXT", b"text")
    f.write(raw / ".git" / "a.png", f.png(3))  # a hidden folder is never a class
    (raw / "linked").symlink_to(raw / "cats", target_is_directory=True)  # not followed
    assert raw_classes(raw) == ["broken", "cats", "dogs"]
    assert raw_classes(tmp_path / "nowhere") == []


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ParamsError, match=r"^params.yaml: not found at "):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("base: [unclosed\n")
    with pytest.raises(ParamsError, match=r"^params.yaml: line 2: not valid YAML"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("- a list\n")
    with pytest.raises(ParamsError, match="must hold a mapping of sections, got list"):
        load_params(tmp_path / "params.yaml")


def test_exponent_floats_are_floats_as_in_yaml_1_2(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("learning_rate: 0.004", "learning_rate: 4e-3")
    assert "learning_rate: 4e-3" in text
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").train.learning_rate == 0.004


@pytest.mark.parametrize(("test_size", "val_size", "need"), [(0.3, 0.15, 10), (0.5, 0.5, 4)])
def test_min_images_per_class(test_size, val_size, need):
    assert min_images_per_class(test_size, val_size) == need


def test_stage_main_turns_errors_into_one_line(capsys):
    @stage_main
    def bad_params() -> None:
        raise ParamsError("params.yaml: train.epochs: missing")

    @stage_main
    def bad_data() -> None:
        raise StageError("class 'x' has 1 usable image(s)")

    assert bad_params() == 2
    assert bad_data() == 1
    assert capsys.readouterr().err == (
        "error: params.yaml: train.epochs: missing\nerror: class 'x' has 1 usable image(s)\n"
    )


def test_a_stage_with_a_bad_param_fails_fast_without_tensorflow(tmp_path):
    """The train stage reads params before importing TensorFlow or touching MLflow."""
    for name in ("stages", "params.yaml"):
        src = ROOT / name
        if src.is_dir():
            subprocess.run(["cp", "-r", str(src), str(tmp_path / name)], check=True)
        else:
            (tmp_path / name).write_text(src.read_text().replace("epochs: 40", "epochs: abc"))
    probe = (
        "import sys; from imgclf.pipeline import train; code = train.main(); "
        "print('tf' if 'tensorflow' in sys.modules else 'no-tf'); sys.exit(code)"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr
        == "error: params.yaml: train.epochs: input should be a valid integer, got 'abc'\n"
    )
    assert proc.stdout == "no-tf\n"
    assert not (tmp_path / "mlflow.db").exists()
    print(f"failed in {seconds:.2f} s")
