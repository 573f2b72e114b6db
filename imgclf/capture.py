"""Capture what C libraries write straight to file descriptor 2, below Python's
``sys.stderr`` (libtiff/libjpeg warnings during a decode, TensorFlow's C++ start-up lines),
plus Python warnings, so a stage's terminal shows only its own words."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import tempfile
import warnings
from types import TracebackType
from typing import IO

_SINKS: dict[int, IO[bytes]] = {}  # pid -> reusable temporary file (a forked child makes its own)


def short_messages(text: str, lines: int = 3, limit: int = 300) -> str:
    """A one-line digest of decoder output: its first ``lines`` distinct lines, joined with
    ``"; "``, a count of the rest, at most ``limit`` characters."""
    distinct: list[str] = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if line and line not in distinct:
            distinct.append(line)
    shown = "; ".join(distinct[:lines])
    if len(distinct) > lines:
        shown += f" (+{len(distinct) - lines} more)"
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


class CapturedOutput:
    """Context manager keeping what decoders say while it is active.

    C libraries (libtiff, libjpeg, ...) write straight to file descriptor 2, below Python:
    fd 2 is pointed at a private temporary file and restored on exit, and Python warnings
    are recorded too. ``text`` holds the digest (see :func:`short_messages`) after exit,
    also when the block raised. Not thread-safe: fd 2 is process-wide.
    """

    def __init__(self) -> None:
        self.text = ""
        self._saved = -1
        self._sink: IO[bytes] | None = None
        self._warnings: warnings.catch_warnings | None = None
        self._caught: list[warnings.WarningMessage] = []

    def __enter__(self) -> CapturedOutput:
        self._warnings = warnings.catch_warnings(record=True)
        caught = self._warnings.__enter__()
        self._caught = caught if caught is not None else []
        warnings.simplefilter("always")
        try:
            self._saved = os.dup(2)
        except OSError:  # no fd 2 at all: nothing can reach it
            return self
        pid = os.getpid()
        if pid not in _SINKS:
            _SINKS[pid] = tempfile.TemporaryFile()
            atexit.register(_SINKS[pid].close)
        self._sink = _SINKS[pid]
        _flush_stderr()
        os.dup2(self._sink.fileno(), 2)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        said = ""
        if self._sink is not None:
            _flush_stderr()
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._sink.seek(0)
            said = self._sink.read().decode("utf-8", errors="replace")
            self._sink.seek(0)
            self._sink.truncate()
        assert self._warnings is not None
        self._warnings.__exit__(exc_type, exc, tb)
        said += "".join(f"{w.category.__name__}: {w.message}\n" for w in self._caught)
        self.text = short_messages(said)


def _flush_stderr() -> None:
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to keep
            sys.stderr.flush()
