"""Which model is served: file hashes a user can compare with what DVC recorded.

DVC records a file out (``models/model.keras``, as our ``train`` stage declares it) in
``dvc.lock`` with the md5 of its bytes. A directory out (``models``) is recorded as
``<md5>.dir``: the md5 of the JSON listing ``[{"md5": <file md5>, "relpath": <posix
path>}, ...]`` sorted by ``relpath`` and dumped with ``json.dumps(..., sort_keys=True)``
(``dvc_data.hashfile.tree.Tree``). The listing itself is in the DVC cache under
``files/md5/<2>/<rest>.dir``, which gives the md5 DVC recorded for ``model.keras`` alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


def file_md5(path: Path) -> str:
    """md5 of a file's bytes (DVC 3's ``md5`` for a single file)."""
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_md5(folder: Path) -> str:
    """DVC's hash of a directory out: md5 of its sorted JSON listing, plus ``.dir``."""
    entries = [
        {"md5": file_md5(p), "relpath": p.relative_to(folder).as_posix()}
        for p in folder.rglob("*")
        if p.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    blob = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(blob, usedforsecurity=False).hexdigest() + ".dir"


def _dvc_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / "dvc.lock").is_file():
            return folder
    return None


def dvc_lock_record(model_dir: Path) -> dict[str, Any] | None:
    """What ``dvc.lock`` says about the out holding the model: the folder itself (a directory
    out) or ``model.keras`` (a file out, as this project's ``train`` stage declares it)."""
    root = _dvc_root(model_dir.resolve())
    if root is None:
        return None
    rel = model_dir.resolve().relative_to(root).as_posix()
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        log.warning("cannot read %s: %s", root / "dvc.lock", exc)
        return None
    for stage, body in (lock.get("stages") or {}).items():
        for out in (body or {}).get("outs") or []:
            path = str(out.get("path", "")).rstrip("/")
            if path in (rel, f"{rel}/model.keras"):
                record = {"stage": stage, "path": path, "md5": out.get("md5")}
                record["model_md5"] = _cached_file_md5(root, out.get("md5"), path, rel)
                return record
    return None


def _cached_file_md5(root: Path, md5: str | None, out_path: str, rel: str) -> str | None:
    """md5 of ``model.keras`` as recorded by DVC (single-file out, or the cached listing)."""
    if not md5:
        return None
    if not md5.endswith(".dir"):
        return md5 if out_path.endswith("model.keras") else None
    listing = root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    try:
        entries = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return next((e.get("md5") for e in entries if e.get("relpath") == "model.keras"), None)


def model_version_info(model_file: Path, operating_point: Path | None) -> dict[str, Any]:
    """Hashes of the served files and, when DVC tracks them, what ``dvc.lock`` records."""
    model_dir = model_file.parent
    info: dict[str, Any] = {
        "model_file": str(model_file),
        "model_md5": file_md5(model_file),
        "model_dir_md5": dir_md5(model_dir),
        "operating_point_md5": file_md5(operating_point) if operating_point else None,
    }
    record = dvc_lock_record(model_dir)
    if record is not None:
        if str(record["md5"] or "").endswith(".dir"):
            record["dir_matches"] = record["md5"] == info["model_dir_md5"]
        recorded = record.get("model_md5")
        record["model_matches"] = recorded == info["model_md5"] if recorded else None
    info["dvc_lock"] = record
    return info
