"""What ``preprocess`` keeps between runs, outside the DVC outs, so a rerun decodes only new
or changed content and rewrites only outputs that changed.

- :class:`ContentCache`: per raw content hash, the processed JPEG and the near-duplicate
  fingerprint of a usable file, or the reason the file is invalid, in a folder keyed by
  the processing settings and code version;
- :class:`StatRecords`: an SQLite file of raw file hashes by (path, size, mtime), so an
  unchanged file is not even read, and of what the last output sync wrote.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from imgclf.files import write_bytes

BLANK = "blank"  # flag of a processed image that is near-uniform (imaging.is_blank)


class CacheEntry(NamedTuple):
    """What the cache knows of one content hash: the invalid reason (None for a usable
    image), its flags and its near-duplicate fingerprint (bytes; empty when invalid)."""

    error: str | None
    flags: str
    fingerprint: bytes


@dataclass(frozen=True)
class ContentCache:
    """Per content hash: the processed JPEG (``.jpg``, or ``.blank.jpg`` for a near-uniform
    image, so the flag costs no extra file) and the fingerprint (``.fp``), or the invalid
    reason (``.err``)."""

    folder: Path

    def entry(self, sha: str, ext: str) -> Path:
        """The cache file of content ``sha`` with extension ``ext``."""
        return self.folder / sha[:2] / f"{sha}{ext}"

    def jpeg(self, sha: str, flags: str) -> Path:
        """The processed JPEG of ``sha`` with these flags."""
        return self.entry(sha, ".blank.jpg" if flags == BLANK else ".jpg")

    def lookup(self, sha: str) -> CacheEntry | None:
        """The entry of ``sha``, or None when it is not (completely) cached."""
        try:
            fingerprint = self.entry(sha, ".fp").read_bytes()
        except FileNotFoundError:
            err = self.entry(sha, ".err")
            if err.is_file():
                return CacheEntry(err.read_text(encoding="utf-8"), "", b"")
            return None
        for flags in ("", BLANK):
            if self.jpeg(sha, flags).is_file():
                return CacheEntry(None, flags, fingerprint)
        return None

    def store_jpeg(self, sha: str, flags: str, blob: bytes, fingerprint: bytes) -> None:
        """Keep the processed JPEG and the fingerprint of ``sha`` (each written atomically,
        the fingerprint last: parallel runs share the cache, and :meth:`lookup` needs both).
        """
        write_bytes(self.jpeg(sha, flags), blob)
        write_bytes(self.entry(sha, ".fp"), fingerprint)

    def store_error(self, sha: str, reason: str) -> None:
        """Keep why content ``sha`` is not a usable image."""
        write_bytes(self.entry(sha, ".err"), reason.encode("utf-8"))


class StatRecords:
    """SQLite records in the cache folder, so memory does not grow with them and parallel
    runs (queued experiments share the workspace cache) never corrupt them.

    ``hashes``: raw file (absolute path, size, mtime) -> SHA-256. ``outputs``: output file
    -> (content tag, size, mtime) of the last sync. :meth:`close` commits and closes
    (use it with ``contextlib.closing``).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=120)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS hashes "
            "(path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, sha TEXT)"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS outputs "
            "(path TEXT PRIMARY KEY, tag TEXT, size INTEGER, mtime INTEGER)"
        )

    def known_sha(self, path: str, size: int, mtime: int) -> str | None:
        """The SHA-256 recorded for a raw file with this stat, or None."""
        row = self.db.execute(
            "SELECT sha FROM hashes WHERE path = ? AND size = ? AND mtime = ?",
            (path, size, mtime),
        ).fetchone()
        return row[0] if row else None

    def remember_sha(self, path: str, size: int, mtime: int, sha: str) -> None:
        """Record the SHA-256 of a raw file with this stat."""
        self.db.execute(
            "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?)", (path, size, mtime, sha)
        )

    def output_is(self, path: str, tag: str, size: int, mtime: int) -> bool:
        """Whether the last sync wrote ``tag`` to ``path`` and the file still has that stat."""
        row = self.db.execute("SELECT tag, size, mtime FROM outputs WHERE path = ?", (path,))
        return row.fetchone() == (tag, size, mtime)

    def remember_output(self, path: str, tag: str, size: int, mtime: int) -> None:
        """Record that ``path`` (now with this stat) holds the content ``tag``."""
        self.db.execute(
            "INSERT OR REPLACE INTO outputs VALUES (?, ?, ?, ?)", (path, tag, size, mtime)
        )

    def commit(self) -> None:
        """Make the records so far durable (and visible to parallel runs)."""
        self.db.commit()

    def close(self) -> None:
        """Commit and close the database."""
        self.db.commit()
        self.db.close()
