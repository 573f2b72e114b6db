"""Reading what an earlier stage wrote: the JSON, or one line naming the stage to run."""

from __future__ import annotations

import re

import pytest

from imgclf.config import Paths, StageError
from imgclf.pipeline import stage_outputs


@pytest.fixture
def paths(tmp_path, monkeypatch) -> Paths:
    paths = Paths(tmp_path)
    monkeypatch.setattr(stage_outputs, "PATHS", paths)
    return paths


def test_reads_the_json_an_earlier_stage_wrote(paths):
    paths.test_metrics.parent.mkdir(parents=True)
    paths.test_metrics.write_text('{"accuracy": 0.9, "roc_auc": null}\n', encoding="utf-8")
    got = stage_outputs.read_json(paths.test_metrics, written_by="report")
    assert got == {"accuracy": 0.9, "roc_auc": None}


def test_a_missing_file_names_the_stage_that_writes_it(paths, tmp_path):
    with pytest.raises(StageError) as err:
        stage_outputs.read_json(paths.model_metadata, written_by="train")
    assert str(err.value) == "models/candidate/metadata.json not found: run the train stage first"
    elsewhere = tmp_path.parent / "elsewhere.json"  # outside the root: shown in full
    with pytest.raises(StageError, match=f"^{re.escape(str(elsewhere))} not found: run the "):
        stage_outputs.read_json(elsewhere, written_by="report")


@pytest.mark.parametrize("content", [b'{"accuracy": 0.9', b"", b'{"x": "\xff"}'])
def test_a_file_that_is_not_json_is_one_line_saying_to_rerun_the_stage(paths, content):
    paths.operating_point.parent.mkdir(parents=True)
    paths.operating_point.write_bytes(content)
    with pytest.raises(StageError) as err:
        stage_outputs.read_json(paths.operating_point, written_by="report")
    message = str(err.value)
    assert message.startswith("metrics/operating_point.json is not JSON (")
    assert message.endswith("): rerun the report stage") and "\n" not in message
