"""Paths and params loading."""

from __future__ import annotations

import pytest

from stages.config import Paths, digest, load_params, section


def test_workspace_is_found_from_a_queued_experiment_copy(tmp_path):
    assert Paths(tmp_path).workspace == tmp_path
    inner = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    assert Paths(inner).workspace == tmp_path
    assert Paths(inner).cache == tmp_path / ".cache"


def test_params_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="params file not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(KeyError, match="no 'train' section"):
        section({"base": {}}, "train")


def test_digest_is_order_independent():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
