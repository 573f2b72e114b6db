"""``/version``'s record of the bundle in ``dvc.lock``, read while DVC may be writing it."""

from __future__ import annotations

import logging
import threading

import pytest
import yaml

from imgclf.serving.version import dvc_lock_record

pytestmark = pytest.mark.unit

LOCK = {
    "schema": "2.0",
    "stages": {
        "train": {"outs": [{"path": "models/candidate", "md5": "c.dir"}]},
        "promote": {"outs": [{"path": "models/bundle.zip", "md5": "abc"}]},
    },
}


def test_a_lock_half_written_when_read_is_read_again(tmp_path):
    (tmp_path / "models").mkdir()
    bundle = tmp_path / "models" / "bundle.zip"
    bundle.write_bytes(b"zip")
    text = yaml.safe_dump(LOCK, sort_keys=False)
    # DVC rewrites the file in place: a reader may see it cut before the promote stage
    (tmp_path / "dvc.lock").write_text(text[: text.index("promote")])
    writer = threading.Timer(0.3, (tmp_path / "dvc.lock").write_text, [text])
    writer.start()
    try:
        record = dvc_lock_record(bundle, "abc")
    finally:
        writer.join()
    assert record == {
        "stage": "promote",
        "path": "models/bundle.zip",
        "md5": "abc",
        "matches": True,
    }


def test_a_lock_that_never_parses_is_no_record_and_a_warning(tmp_path, caplog):
    (tmp_path / "models").mkdir()
    bundle = tmp_path / "models" / "bundle.zip"
    bundle.write_bytes(b"zip")
    (tmp_path / "dvc.lock").write_text("stages: [unclosed\n")
    with caplog.at_level(logging.WARNING):
        assert dvc_lock_record(bundle, "abc") is None
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot read {tmp_path / 'dvc.lock'} as YAML"
    ]
