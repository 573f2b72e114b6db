"""The tree ``imgclf-score`` scores, walked lazily, and its files decoded in worker
processes (:mod:`imgclf.serving.score`): never TensorFlow in a worker, a bounded number of
files in flight, a per-file timeout."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path

from pebble import ProcessExpired, ProcessPool

from imgclf import imaging
from imgclf.imaging import DecodeOptions, InvalidImage
from imgclf.serving.listing import not_regular, why_not_found

log = logging.getLogger(__name__)

WORKER_PRELOAD = [__name__]  # what a decode worker imports (never TensorFlow)
STOP_POLL = 0.25  # seconds between looks at the stop flag while a file decodes


# ------------------------------------------------------------------ the tree
@dataclass(frozen=True)
class Entry:
    """One entry of the tree: its path relative to the source (POSIX), its path on disk,
    and why it cannot be scored (None for a regular file)."""

    rel: str
    path: str
    error: str | None = None


def walk(source: Path, exclude: frozenset[str] = frozenset()) -> Iterator[Entry]:
    """Every non-hidden entry under ``source``, depth first, sorted by name within each
    folder, lazily: only one folder's names are held at a time. Regular files come without
    an error; everything else that is not a folder (a FIFO, a dangling link...), a symbolic
    link to a folder and a folder that cannot be read come with the reason. Relative paths
    in ``exclude`` are left out."""
    yield from _walk_folder(str(source), "", exclude)


def _walk_folder(folder: str, prefix: str, exclude: frozenset[str]) -> Iterator[Entry]:
    try:
        with os.scandir(folder) as entries:
            found = sorted(entries, key=lambda e: e.name)
    except OSError as exc:
        reason = f"cannot read folder: {(exc.strerror or str(exc)).lower()}"
        yield Entry(prefix.rstrip("/"), folder, reason)
        return
    for entry in found:
        rel = prefix + entry.name
        if entry.name.startswith(".") or rel in exclude:
            continue
        try:
            mode = entry.stat().st_mode  # follows symbolic links
        except OSError as exc:
            yield Entry(rel, entry.path, why_not_found(Path(entry.path), exc))
            continue
        if stat.S_ISREG(mode):
            yield Entry(rel, entry.path)
        elif not stat.S_ISDIR(mode):
            yield Entry(rel, entry.path, not_regular(mode))
        elif entry.is_symlink():  # followed, it could lead back up: a loop
            yield Entry(rel, entry.path, "symbolic link to a folder (not followed)")
        else:
            yield from _walk_folder(entry.path, rel + "/", exclude)


# ------------------------------------------------------------------ decoding in workers
@dataclass(frozen=True)
class Decoded:
    """A file's training-JPEG bytes (see :func:`stored_jpeg`) or why it has none;
    ``lost``: the pool, not the decoder, failed it (a worker stopped or past the limit)."""

    rel: str
    jpeg: bytes | None = None
    error: str | None = None
    lost: bool = False


def stored_jpeg(path: str, options: DecodeOptions) -> tuple[bytes | None, str | None]:
    """Worker: ``(JPEG bytes, None)`` of the stored training JPEG of the file at ``path``
    (the first steps of :func:`imgclf.imaging.serving_input`: decode, fit, encode), or
    ``(None, reason)``. The last step, TensorFlow's JPEG decode, runs in the scoring
    process, so workers never import TensorFlow."""
    try:
        return imaging.stored_jpeg(Path(path), options), None
    except (InvalidImage, OSError) as exc:
        return None, str(exc)
    except Exception as exc:  # say, MemoryError: still this file's failure, not the pool's
        return None, f"decode failed: {type(exc).__name__}: {exc}"


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines too) made one space."""
    return " ".join(text.split())


class PoolBroken(RuntimeError):
    """The decode pool cannot go on (its fork server or manager failed): the files not yet
    written are left for a rerun."""


def _outcome(
    entry: Entry, future: Future | None, timeout: float, stopping: Callable[[], bool]
) -> Decoded:
    """What became of one entry sent to the pool (``future`` None: it was never sent).
    Once ``stopping()``, an unfinished file is not waited for: a worker stopped by the same
    signal may have taken its task without a word, leaving the future pending for ever."""
    if future is None:
        return Decoded(entry.rel, error=entry.error)
    while not future.done():
        if stopping():
            return Decoded(entry.rel, error="stopped", lost=True)
        wait([future], timeout=STOP_POLL)
    try:
        jpeg, error = future.result()
        return Decoded(entry.rel, jpeg, error and one_line(error))
    except TimeoutError:
        error = f"timeout: decode took longer than {timeout:g} s"
    except ProcessExpired as exc:
        error = f"decoder crashed: worker process died (exit code {exc.exitcode})"
    except Exception as exc:  # stored_jpeg returns its own failures: this is the pool's
        raise PoolBroken(f"the decode pool failed: {type(exc).__name__}: {exc}") from exc
    return Decoded(entry.rel, error=error, lost=True)


@contextlib.contextmanager
def decode_pool(workers: int) -> Iterator[ProcessPool]:
    """A pool of ``workers`` decode processes, started at once (they come up while the
    model loads), stopped on exit.

    Workers start from a fork server that has imported this module (not TensorFlow), not
    from this process (which runs TensorFlow's threads, unsafe to fork).
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    pool = ProcessPool(max(1, workers), context=context)
    for _ in range(max(1, workers)):
        pool.schedule(os.getpid)  # starts the fork server and the workers now
    try:
        yield pool
    finally:
        pool.stop()  # every result was taken, or the run stopped early
        pool.join()


def decode_all(
    pool: ProcessPool,
    entries: Iterable[Entry],
    options: DecodeOptions,
    timeout: float,
    window: int,
    stopping: Callable[[], bool] = lambda: False,
) -> Iterator[Decoded]:
    """Decode ``entries`` on ``pool``, yielding results in the entries' order; at most
    ``window`` files are in flight (memory stays flat), each may take ``timeout`` seconds
    (a worker past it is replaced and the file gets an error). Once ``stopping()``, no
    file is sent any more and those in flight come back ``lost``."""
    pending: deque[tuple[Entry, Future | None]] = deque()
    for entry in entries:
        if stopping():
            break
        future = None
        if entry.error is None:
            future = _schedule(pool, entry, options, timeout)
        pending.append((entry, future))
        if len(pending) >= window:
            yield _outcome(*pending.popleft(), timeout, stopping)
    while pending:
        yield _outcome(*pending.popleft(), timeout, stopping)


def _schedule(pool: ProcessPool, entry: Entry, options: DecodeOptions, timeout: float) -> Future:
    try:
        return pool.schedule(stored_jpeg, args=(entry.path, options), timeout=timeout)
    except RuntimeError as exc:  # pebble: "Unexpected error within the Pool"
        raise PoolBroken(f"the decode pool failed: {exc}") from exc
