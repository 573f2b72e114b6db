"""What a run is named and tagged with: params flattened, git commit, DVC experiment,
the owning process (so an abandoned run can be told from a live one)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

OWNER_TAG = "imgclf.owner"  # the process holding a RUNNING run: host, pid, start time

# -- what a run is tagged with -----------------------------------------------------------


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": "3"}`` (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def git_commit(cwd: Path) -> str | None:
    """``git rev-parse HEAD`` in ``cwd`` (None outside a repository)."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def run_tags(data_hash: str, root: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """Git commit, DVC experiment name (under ``dvc exp run``) and the data hash."""
    env = os.environ if env is None else env
    tags = {"data_hash": data_hash}
    commit = git_commit(root)
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    if env.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = env["DVC_EXP_NAME"]
    if env.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = env["DVC_EXP_BASELINE_REV"]
    return tags


def run_name(env: dict[str, str] | None = None, commit: str | None = None) -> str:
    """The DVC experiment's name under ``dvc exp run``, else ``repro-<UTC time>-<commit>``."""
    env = os.environ if env is None else env
    if env.get("DVC_EXP_NAME"):
        return env["DVC_EXP_NAME"]
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"repro-{stamp}-{(commit or 'nogit')[:7]}"


def owner() -> str:
    """``host:pid:start time`` of this process (pids are reused; start times are not)."""
    import psutil

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.2f}"


def owner_alive(tag: str) -> bool | None:
    """Whether the process named by an owner tag still runs (None: another host's)."""
    import psutil

    host, _, rest = tag.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname():
        return None
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except (psutil.Error, ValueError):
        return False
