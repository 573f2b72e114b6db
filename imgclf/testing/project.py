"""Throw-away copies of this project (git + DVC repositories) and the commands run in them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

# the source checkout: the folder holding this package (its code and settings are copied)
if TYPE_CHECKING:
    from imgclf.imaging import DecodeOptions
    from imgclf.pipeline.preprocess import Outcome
    from imgclf.pipeline.preprocess_workers import RunStats

SOURCE = Path(__file__).resolve().parents[2]
COPIED = (
    "Makefile",
    "imgclf",
    "stages",
    "serve",
    "params.yaml",
    "serve.yaml",
    "dvc.yaml",
    ".gitignore",
    ".dvcignore",
    "data/labels_override.csv",
    "data/params.checked",
)


class CommandFailed(RuntimeError):
    """A command exited non-zero; the message holds its arguments and output tail."""


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment whose ``python``/``dvc`` are this interpreter's, with DVC and TF quiet."""
    out = dict(os.environ)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    for key in ("AUTHOR", "COMMITTER"):
        out.setdefault(f"GIT_{key}_NAME", "imgclf-test")
        out.setdefault(f"GIT_{key}_EMAIL", "imgclf-test@example.com")
    out["DVC_NO_ANALYTICS"] = "1"
    out["TF_CPP_MIN_LOG_LEVEL"] = "2"
    out.update(extra or {})
    return out


def run(
    cwd: Path,
    *args: str,
    check: bool = True,
    timeout: float = 900,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a command in ``cwd``; with ``check``, a non-zero exit raises
    :class:`CommandFailed` showing its output."""
    proc = subprocess.run(
        list(args), cwd=cwd, env=env(extra_env), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise CommandFailed(f"{' '.join(args)} exited {proc.returncode}\n{tail}")
    return proc


def dvc(repo: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """``dvc ARGS`` with this interpreter's DVC."""
    return run(repo, sys.executable, "-m", "dvc", *args, **kwargs)


def run_queue(
    repo: Path, jobs: int, timeout: float, interval: float, env: dict[str, str] | None = None
) -> str:
    """``dvc queue start -j jobs`` (its workers get ``env``), wait until nothing is running
    or queued (checked every ``interval`` s, at most ``timeout`` s), stop the workers and
    return the last ``dvc queue status``; a failed task raises :class:`CommandFailed` with
    the end of its log."""
    dvc(repo, "queue", "start", "-j", str(jobs), extra_env=env)
    deadline, status = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        status = dvc(repo, "queue", "status").stdout
        if "Running" not in status and "Queued" not in status:
            break
        time.sleep(interval)
    dvc(repo, "queue", "stop", check=False)
    failed = [line.split()[0] for line in status.splitlines() if "Failed" in line]
    if failed:
        logs = [dvc(repo, "queue", "logs", task, check=False).stdout[-3000:] for task in failed]
        raise CommandFailed(status + "\n".join(logs))
    return status


def python(repo: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """``python ARGS`` with this interpreter."""
    return run(repo, sys.executable, *args, **kwargs)


def copy_project(dest: Path, params: dict[str, Any] | None = None) -> Path:
    """Copy the project's code and settings into ``dest`` (its stages then use ``dest``
    as their root); ``params`` overrides sections of ``params.yaml`` key by key."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = SOURCE / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    merged = yaml.safe_load((SOURCE / "params.yaml").read_text(encoding="utf-8"))
    for sec, values in (params or {}).items():
        merged.setdefault(sec, {}).update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False), encoding="utf-8")
    return dest


def set_params(repo: Path, values: dict[str, Any]) -> None:
    """Change ``repo``'s ``params.yaml`` by dotted key: ``{"split.test_size": 0.5}``.

    Every key must already be in the file (a typo raises KeyError naming it).
    """
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key, value in values.items():
        *parents, name = key.split(".")
        section = params
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict) or name not in section:
            raise KeyError(f"{key} is not in {path}")
        section[name] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def init_repo(dest: Path) -> Path:
    """``git init`` + ``dvc init`` in ``dest`` (DVC stages what it tracks itself)."""
    run(dest, "git", "init", "-q", "-b", "main")
    dvc(dest, "init", "-q")
    dvc(dest, "config", "core.autostage", "true")
    return dest


def make_repo(dest: Path, per_digit: int | None = 5) -> Path:
    """Copy the project into ``dest``, make it a git + DVC repository, write the bundled
    sample (``per_digit`` images a digit), ``dvc add data/raw`` (as the README's run
    command does) and commit."""
    init_repo(copy_project(dest))
    args = ["-m", "imgclf.pipeline.sample", "--raw", str(dest / "data" / "raw")]
    if per_digit is not None:
        args += ["--per-digit", str(per_digit)]
    python(dest, *args)
    dvc(dest, "add", "-q", "data/raw")
    commit(dest, "initial")
    return dest


def commit(repo: Path, message: str) -> None:
    """Commit everything in ``repo``."""
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "--allow-empty", "-m", message)


def ran(output: str) -> set[str]:
    """Names of the stages a ``dvc repro`` output says it ran."""
    return {
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    }


def preprocess_tree(
    tmp: Path,
    options: DecodeOptions,
    workers: int = 1,
    decode_timeout: float | None = None,
    overrides: Path | None = None,
) -> tuple[list[Outcome], RunStats]:
    """The ``preprocess`` stage's work on ``tmp``'s project layout (``data/raw`` in,
    ``data/processed``, ``data/invalid``, ``data/manifest.csv`` out, ``.cache``), in
    process."""
    from imgclf.pipeline.preprocess import preprocess

    return preprocess(
        raw=tmp / "data" / "raw",
        processed=tmp / "data" / "processed",
        invalid=tmp / "data" / "invalid",
        manifest=tmp / "data" / "manifest.csv",
        cache_dir=tmp / ".cache",
        options=options,
        workers=workers,
        root=tmp,
        decode_timeout=decode_timeout,
        overrides=overrides,
    )
