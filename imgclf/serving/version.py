"""Which bundle is served, in terms a user can check: what ``dvc.lock`` recorded for it.

``promote`` declares ``models/bundle.zip`` as a file out, so ``dvc.lock`` holds the md5 of
its bytes; the server compares it with the md5 of the bytes it loaded. Only the bundle and
the ``dvc.lock`` above it are read: never the pipeline's ``metrics/`` (the bundle carries
its own metrics summary).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml

from imgclf.config import PATHS

log = logging.getLogger(__name__)


def shown_path(path: Path) -> str:
    """A path as ``/version`` shows it: relative to the project, else its name alone (no
    absolute server paths leave the process)."""
    resolved = path.resolve()
    for base in (PATHS.root, Path.cwd()):
        if resolved.is_relative_to(base.resolve()):
            return resolved.relative_to(base.resolve()).as_posix()
    return path.name


# DVC rewrites dvc.lock in place after each stage, and touches a persist out (the bundle)
# just before: a reload that this touch starts may read a half-written lock
LOCK_SETTLE_S = 1.0


def _read_lock(root: Path) -> dict[str, Any] | None:
    """``root/dvc.lock`` as a mapping; None when unreadable or not (yet) YAML."""
    try:
        return yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8")) or None
    except (OSError, yaml.YAMLError):
        return None


def _find(lock: dict[str, Any], rel: str, md5: str) -> dict[str, Any] | None:
    for stage, body in (lock.get("stages") or {}).items():
        for out in (body or {}).get("outs") or []:
            if str(out.get("path", "")) == rel:
                recorded = out.get("md5")
                return {"stage": stage, "path": rel, "md5": recorded, "matches": recorded == md5}
    return None


def dvc_lock_record(bundle: Path, md5: str) -> dict[str, Any] | None:
    """``{"stage", "path", "md5", "matches"}`` of the ``dvc.lock`` out that is ``bundle``,
    ``matches`` saying whether it records the served bytes (``md5``); None when no
    ``dvc.lock`` above the bundle records it. A lock that does not parse or lacks the
    bundle is read again for up to :data:`LOCK_SETTLE_S` (DVC may be writing it)."""
    bundle = bundle.resolve()
    root = next((d for d in bundle.parents if (d / "dvc.lock").is_file()), None)
    if root is None:
        return None
    rel = bundle.relative_to(root).as_posix()
    deadline = time.monotonic() + LOCK_SETTLE_S
    while True:
        lock = _read_lock(root)
        record = None if lock is None else _find(lock, rel, md5)
        if record is not None or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if lock is None:
        log.warning("cannot read %s as YAML", root / "dvc.lock")
    return record
