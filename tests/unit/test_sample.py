"""The bundled sample data set."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
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
    # one subclass a digit: 0-6 safe (1,264 images, 70%), 7-9 sensitive (533)
    per_digit = {0: 178, 1: 182, 2: 177, 3: 183, 4: 181, 5: 182, 6: 181, 7: 179, 8: 174, 9: 180}
    assert Counter(rel.rsplit("/", 1)[0] for rel in one) == {
        f"{'safe' if d < 7 else 'sensitive'}/digit_{d}": n for d, n in per_digit.items()
    }


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


@pytest.mark.integration  # a subprocess: the CLI as a user runs it
def test_cli_leaves_user_data_and_says_so(tmp_path: Path):
    own = tmp_path / "cats" / "tabby" / "1.jpg"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"user data")
    cmd = [sys.executable, "-m", "imgclf.pipeline.sample", "--raw", str(tmp_path)]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 2 and "left untouched" in refused.stderr
    kept = subprocess.run([*cmd, "--unless-user-data"], capture_output=True, text=True)
    assert kept.returncode == 0 and "your own data" in kept.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [own]
