"""Which bundle is served, in terms a user can check: what ``dvc.lock`` recorded for it.

``promote`` declares ``models/bundle.zip`` as a file out, so ``dvc.lock`` holds the md5 of
its bytes; the server compares it with the md5 of the bytes it loaded. Only the bundle and
the ``dvc.lock`` above it are read: never the pipeline's ``metrics/`` (the bundle carries
its own metrics summary).
"""

from __future__ import annotations

import logging
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


def _read_lock(root: Path) -> dict[str, Any]:
    """``root/dvc.lock`` as a mapping (empty when unreadable, with a warning)."""
    try:
        return yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        log.warning("cannot read dvc.lock: %s", exc)
        return {}


def dvc_lock_record(bundle: Path, md5: str) -> dict[str, Any] | None:
    """``{"stage", "path", "md5", "matches"}`` of the ``dvc.lock`` out that is ``bundle``,
    ``matches`` saying whether it records the served bytes (``md5``); None when no
    ``dvc.lock`` above the bundle records it."""
    bundle = bundle.resolve()
    root = next((d for d in bundle.parents if (d / "dvc.lock").is_file()), None)
    if root is None:
        return None
    rel = bundle.relative_to(root).as_posix()
    for stage, body in (_read_lock(root).get("stages") or {}).items():
        for out in (body or {}).get("outs") or []:
            if str(out.get("path", "")) == rel:
                recorded = out.get("md5")
                return {"stage": stage, "path": rel, "md5": recorded, "matches": recorded == md5}
    return None
