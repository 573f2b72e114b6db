"""Keep ``data/processed`` and ``data/invalid`` holding exactly the files a run wants.

Both folders are DVC outs with ``persist: true``, so they survive a rerun: a file whose
source and on-disk stat match the record of the last sync is left alone, every other
wanted file is (re)written, and any file nothing wants is deleted. Writes go through a
temporary file (``.<name>.<pid>.tmp``) and a rename, so a file DVC linked from its cache is
replaced, never written through; :func:`remove_stale_temp_files` deletes what a killed run
left behind.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import psutil

from imgclf.files import replacing
from imgclf.pipeline.preprocess_cache import StatRecords

log = logging.getLogger(__name__)


class OutputFile(NamedTuple):
    """One file an output folder must hold: copied from ``source``; ``tag`` names its
    content (same tag and same on-disk stat as at the last sync: nothing to do)."""

    target: str
    source: str
    tag: str


def sync_outputs(
    wanted: Iterable[OutputFile], folders: Sequence[Path], records: StatRecords
) -> int:
    """Make ``folders`` hold exactly the ``wanted`` files (each inside one of them); return
    how many files were written."""
    kept: set[str] = set()
    written = 0
    for file in wanted:
        kept.add(file.target)
        if _is_current(file, records):
            continue
        try:
            with open(file.source, "rb") as src, replacing(Path(file.target), "wb") as dst:
                shutil.copyfileobj(src, dst)
        except OSError as exc:  # e.g. a raw file we may not read: listed, not copied
            log.warning("cannot copy %s: %s", file.source, exc)
            continue
        st = os.stat(file.target)
        records.remember_output(file.target, file.tag, st.st_size, st.st_mtime_ns)
        written += 1
    for folder in folders:
        remove_unwanted(folder, kept)
    return written


def _is_current(file: OutputFile, records: StatRecords) -> bool:
    try:
        st = os.stat(file.target)
    except FileNotFoundError:
        return False
    return records.output_is(file.target, file.tag, st.st_size, st.st_mtime_ns)


def remove_unwanted(folder: Path, wanted: set[str]) -> None:
    """Delete every file under ``folder`` not in ``wanted`` (paths as str), then the
    sub-folders left empty; ``folder`` itself is created when missing."""
    folder.mkdir(parents=True, exist_ok=True)
    top = os.fspath(folder)
    for dirpath, _, filenames in os.walk(top, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if path not in wanted:
                os.unlink(path)
        if dirpath != top and not os.listdir(dirpath):
            os.rmdir(dirpath)


def temp_owner(name: str) -> int | None:
    """The process id in a temporary file name ``<anything>.<pid>.tmp``, or None."""
    stem, dot, ext = name.rpartition(".")
    if not dot or ext != "tmp":
        return None
    pid = stem.rpartition(".")[2]
    return int(pid) if pid.isascii() and pid.isdigit() and int(pid) > 0 else None


def remove_stale_temp_files(folders: Iterable[Path]) -> int:
    """Delete the temporary files (``*.<pid>.tmp``) a killed run left under ``folders``;
    returns how many. A file whose process is still alive is kept: queued experiments
    share the content cache and may be writing it right now."""
    removed = 0
    for folder in folders:
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                pid = temp_owner(name)
                if pid is None or psutil.pid_exists(pid):
                    continue
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except FileNotFoundError:  # another run cleaned it first
                    pass
    return removed
