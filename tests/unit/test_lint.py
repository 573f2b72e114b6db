"""Ruff lint and format, and the import layers of ARCHITECTURE.md (import-linter), are
part of the suite (both configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUFF = Path(sys.executable).parent / "ruff"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


@pytest.mark.parametrize(
    "args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"]
)
def test_ruff(args):
    proc = subprocess.run([str(RUFF), *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_layers():
    """No stage imports another stage, pipeline and serving never import each other, the
    shared modules import neither, and nothing imports ``imgclf.testing``."""
    proc = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 4 kept, 0 broken." in proc.stdout
