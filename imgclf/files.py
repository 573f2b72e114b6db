"""Writing outputs: JSON and CSV files, and replacing a file atomically.

Every stage writes through these, so an output is either the old file or the whole new one
(never half of it when a stage is interrupted), and JSON/CSV look the same everywhere.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def replacing(path: Path, mode: str = "w", fsync: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``
    in one rename, on error it is removed and ``path`` is left as it was.

    The temporary name holds the writer's pid (``.<name>.<pid>.tmp``), so a leftover of
    a killed writer can be told from a live one. ``fsync`` forces the bytes to disk
    before the rename (for files a server may load the moment they appear).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    binary = "b" in mode
    try:
        with tmp.open(mode, **({} if binary else {"encoding": "utf-8", "newline": ""})) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes, fsync: bool = False) -> Path:
    """Replace ``path`` with ``data`` atomically."""
    with replacing(path, "wb", fsync=fsync) as fh:
        fh.write(data)
    return Path(path)


def write_json(path: Path, data: Any) -> Path:
    """Replace ``path`` with ``data`` as indented JSON (a trailing newline, keys in order)."""
    with replacing(path) as fh:
        fh.write(json.dumps(data, indent=2) + "\n")
    return Path(path)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Replace ``path`` with a CSV file: ``header``, then one line per row (a sequence of
    values in header order, or a dict keyed by the header's names)."""
    with replacing(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.get(k, "") for k in header] if isinstance(row, dict) else row)
    return Path(path)


def file_md5(path: Path) -> str:
    """MD5 of a file's bytes, as DVC records it in ``dvc.lock``."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (the content key of raw images)."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
