"""A throw-away git + DVC repository holding a copy of this project, for integration tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.common import copy_project, env


def run(repo: Path, *args: str, check: bool = True, extra_env: dict[str, str] | None = None):
    """Run a command in ``repo``; on failure the assertion shows its output."""
    proc = subprocess.run(
        list(args), cwd=repo, env=env(extra_env), capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def dvc(repo: Path, *args: str, **kwargs):
    return run(repo, sys.executable, "-m", "dvc", *args, **kwargs)


def python(repo: Path, *args: str, **kwargs):
    return run(repo, sys.executable, *args, **kwargs)


def make_repo(dest: Path, per_digit: int | None = 5) -> Path:
    """Copy the project into ``dest``, ``git init`` + ``dvc init``, write the sample,
    ``dvc add data/raw`` (as the README's run command does) and commit."""
    copy_project(dest)
    run(dest, "git", "init", "-q", "-b", "main")
    dvc(dest, "init", "-q")
    dvc(dest, "config", "core.autostage", "true")
    args = ["-m", "stages.sample", "--raw", str(dest / "data" / "raw")]
    if per_digit is not None:
        args += ["--per-digit", str(per_digit)]
    python(dest, *args)
    dvc(dest, "add", "-q", "data/raw")
    commit(dest, "initial")
    return dest


def commit(repo: Path, message: str) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "--allow-empty", "-m", message)


def ran(output: str) -> set[str]:
    """Names of the stages a ``dvc repro`` output says it ran."""
    return {
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    }
