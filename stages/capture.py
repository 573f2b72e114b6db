"""Capture what C libraries write straight to file descriptor 2 (below Python's
``sys.stderr``): TensorFlow's start-up lines, libtiff/libjpeg warnings."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from types import TracebackType


class CapturedStderr:
    """``with CapturedStderr() as c: ...`` points fd 2 at a temporary file; ``c.text`` holds
    what was written, after the block (also when it raised). Not thread-safe: fd 2 is
    process-wide."""

    def __init__(self) -> None:
        self.text = ""
        self._saved = -1
        self._sink: tempfile._TemporaryFileWrapper | None = None

    def __enter__(self) -> CapturedStderr:
        try:
            self._saved = os.dup(2)
        except OSError:  # no fd 2 at all: nothing can reach it
            return self
        self._sink = tempfile.TemporaryFile()
        _flush()
        os.dup2(self._sink.fileno(), 2)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sink is None:
            return
        _flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._sink.seek(0)
        self.text = self._sink.read().decode("utf-8", errors="replace").strip()
        self._sink.close()


def _flush() -> None:
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to keep
            sys.stderr.flush()
