"""The bundled sample data set."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgclf.pipeline.sample import ForeignDataError, write_sample


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")}


def test_sample_is_deterministic_imbalanced_and_nested(tmp_path: Path):
    assert write_sample(tmp_path / "one") == 1797
    assert write_sample(tmp_path / "two") == 1797
    one = tree(tmp_path / "one")
    assert one == tree(tmp_path / "two")
    classes = {rel.split("/")[0] for rel in one}
    assert classes == {"safe", "sensitive"}
    sub = {c: {rel.split("/")[1] for rel in one if rel.startswith(c)} for c in classes}
    assert all(len(s) >= 2 for s in sub.values())
    share = sum(rel.startswith("safe/") for rel in one) / len(one)
    assert 0.65 < share < 0.75


def test_rerun_is_idempotent_and_restores_missing(tmp_path: Path):
    write_sample(tmp_path, per_digit=3)
    (tmp_path / "safe" / "digit_0" / "digit_0_0000.png").unlink()
    assert write_sample(tmp_path, per_digit=3) == 1
    assert write_sample(tmp_path, per_digit=3) == 0


@pytest.mark.parametrize("rel", ["mine/cat/cat.jpg", "safe/digit_0/digit_0_0000.png"])
def test_refuses_a_folder_it_did_not_write(tmp_path: Path, rel: str):
    own = tmp_path / rel
    own.parent.mkdir(parents=True)
    own.write_bytes(b"user data")
    with pytest.raises(ForeignDataError, match="left untouched"):
        write_sample(tmp_path)
    assert own.read_bytes() == b"user data"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [own]


def test_cli_leaves_user_data_and_says_so(tmp_path: Path):
    import subprocess
    import sys

    own = tmp_path / "cats" / "tabby" / "1.jpg"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"user data")
    cmd = [sys.executable, "-m", "imgclf.pipeline.sample", "--raw", str(tmp_path)]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 2 and "left untouched" in refused.stderr
    kept = subprocess.run([*cmd, "--unless-user-data"], capture_output=True, text=True)
    assert kept.returncode == 0 and "your own data" in kept.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [own]
