"""Hash every raw image candidate and fill the content cache for it, in worker processes.

One task per raw file: read, hash, look the hash up in the :class:`ContentCache`, and on a
miss decode, fit and re-encode the image (:func:`process_image`). A decode may take at
most ``decode_timeout`` seconds: a worker past it is stopped and replaced and its file
gets a ``timeout`` reason, which is never cached (the limit is not part of the cache key).
What decoder libraries print (libtiff writes to fd 2 directly) never reaches the log raw:
it is added to the reason of an invalid file, or logged at DEBUG for a usable one.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import PIL
from pebble import ProcessExpired, ProcessPool
from tqdm import tqdm

from imgclf import capture, imaging
from imgclf.capture import CapturedOutput
from imgclf.files import file_sha256
from imgclf.imaging import DecodeOptions, InvalidImage
from imgclf.pipeline import near_duplicates, preprocess_cache
from imgclf.pipeline.preprocess_cache import BLANK, CacheEntry, ContentCache, StatRecords

log = logging.getLogger(__name__)

# below this many files (and without a time limit) a pool costs more than it saves
INLINE_MAX_TASKS = 32

Task = tuple[str, str | None]  # (raw path relative to the raw folder, SHA-256 if known)


def code_version() -> str:
    """Hash of the code that decides cached bytes: the decoder, the decoder-message digest,
    the fingerprint, this module, the cache layout, and Pillow's version."""
    h = hashlib.sha256(PIL.__version__.encode())
    sources = (imaging, capture, near_duplicates, preprocess_cache)
    for source in (*(m.__file__ for m in sources), __file__):
        h.update(Path(source).read_bytes())
    return h.hexdigest()[:16]


def process_image(data: bytes, options: DecodeOptions) -> tuple[bytes, str, bytes]:
    """Decode, fit and re-encode one image at ``options.jpeg_quality``; returns (JPEG
    bytes, flags, near-duplicate fingerprint bytes).

    ``flags`` is ``"blank"`` when the picture part of the fitted image (padding excluded)
    is near-uniform. The fingerprint comes from the raw bytes with fixed settings
    (:func:`~imgclf.pipeline.near_duplicates.fingerprint`), never from ``options``.
    Raises InvalidImage with the reason.
    """
    img = imaging.load_rgb(data, options)
    fitted, content = imaging.fit_square_content(img, options)
    flags = BLANK if imaging.is_blank(content) else ""
    jpeg = imaging.encode_jpeg(fitted, options.jpeg_quality)
    try:
        fingerprint = near_duplicates.fingerprint(data).to_bytes()
    except Exception as exc:  # as in load_rgb: hostile bytes raise anything
        raise InvalidImage(f"truncated or corrupt image: {type(exc).__name__}: {exc}") from None
    return jpeg, flags, fingerprint


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker task needs: where raw files are, the cache, how to decode."""

    raw: Path
    cache: ContentCache
    options: DecodeOptions


class TaskResult(NamedTuple):
    """What a worker found for one raw file; ``messages``: decoder output of a file that was
    still usable (for the debug log)."""

    rel: str
    sha: str
    error: str | None
    decoded: bool
    flags: str = ""
    fingerprint: bytes = b""
    messages: str = ""

    @classmethod
    def cached(cls, rel: str, sha: str, entry: CacheEntry) -> TaskResult:
        """The result of a file whose content is in the cache."""
        return cls(rel, sha, entry.error, False, entry.flags, entry.fingerprint)


@dataclass
class RunStats:
    """Counts and time of one run of the stage."""

    files: int = 0
    decoded: int = 0
    cached: int = 0
    written: int = 0
    seconds: float = 0.0


@dataclass
class ProcessResults:
    """What :func:`hash_and_process` found, by raw path: content hash, invalid reason (only
    for invalid files), flags (only when set); fingerprints by content hash (usable
    images); and the run's counts."""

    hashes: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, bytes] = field(default_factory=dict)
    stats: RunStats = field(default_factory=RunStats)

    def add(self, result: TaskResult) -> None:
        """Record one file's result."""
        self.hashes[result.rel] = result.sha
        if result.error is not None:
            self.errors[result.rel] = result.error
        if result.flags:
            self.flags[result.rel] = result.flags
        if result.fingerprint:
            self.fingerprints[result.sha] = result.fingerprint
        if result.decoded:
            self.stats.decoded += 1
        else:
            self.stats.cached += 1


def run_task(settings: WorkerSettings, rel: str, known_sha: str | None) -> TaskResult:
    """Worker: hash one raw file, then fill the cache for it.

    What decoders print while it runs is kept: appended to the reason of an invalid file,
    returned in ``messages`` for a usable one; nothing reaches the stage's stderr.
    """
    try:
        data = (settings.raw / rel).read_bytes()
    except OSError as exc:
        return TaskResult(rel, known_sha or "", f"unreadable file: {exc.strerror or exc}", False)
    sha = hashlib.sha256(data).hexdigest()
    entry = settings.cache.lookup(sha)
    if entry is not None:
        return TaskResult.cached(rel, sha, entry)
    said = CapturedOutput()
    try:
        with said:
            blob, flags, fingerprint = process_image(data, settings.options)
    except InvalidImage as exc:
        reason = f"{exc} (decoder said: {said.text})" if said.text else str(exc)
        settings.cache.store_error(sha, reason)
        return TaskResult(rel, sha, reason, True)
    settings.cache.store_jpeg(sha, flags, blob, fingerprint)
    return TaskResult(rel, sha, None, True, flags, fingerprint, said.text)


def timeout_reason(seconds: float) -> str:
    """The invalid reason of a file whose decode ran past the limit."""
    return f"timeout: decode took longer than {seconds:g} s"


def run_tasks(
    settings: WorkerSettings, tasks: list[Task], workers: int, timeout: float | None = None
) -> Iterator[TaskResult]:
    """Run tasks, yielding results as they finish.

    Without ``timeout``, a small batch or one worker runs inline. With it, every batch runs
    on a pebble process pool (one task per file, at most ``timeout`` seconds each): a worker
    past the limit is stopped and replaced, and its file gets a ``timeout`` reason. A worker
    that dies (a decoder crash) quarantines its file too instead of stopping the stage.
    """
    if not tasks:
        return
    if timeout is None and (workers <= 1 or len(tasks) < INLINE_MAX_TASKS):
        for task in tasks:
            yield run_task(settings, *task)
        return
    yield from _run_on_pool(settings, tasks, max(1, min(workers, len(tasks))), timeout)


def _run_on_pool(
    settings: WorkerSettings, tasks: list[Task], size: int, timeout: float | None
) -> Iterator[TaskResult]:
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPool(size, initializer=_init_worker, initargs=(settings,), context=ctx)
    todo = iter(tasks)
    pending: dict[Future, Task] = {}
    finished = False
    try:
        while True:
            for task in itertools.islice(todo, size * 8 - len(pending)):  # bounded memory
                pending[pool.schedule(_pool_task, args=(task,), timeout=timeout)] = task
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                try:
                    yield future.result()
                except TimeoutError:
                    assert timeout is not None
                    yield _lost_task(settings, task, timeout_reason(timeout))
                except ProcessExpired as exc:
                    reason = f"decoder crashed: worker process died (exit code {exc.exitcode})"
                    yield _lost_task(settings, task, reason)
        finished = True
    finally:
        if finished:
            pool.close()
        else:  # the caller stopped early or a task failed: do not wait for the rest
            pool.stop()
        pool.join()


_SETTINGS: WorkerSettings | None = None  # of this worker process


def _init_worker(settings: WorkerSettings) -> None:
    global _SETTINGS
    _SETTINGS = settings


def _pool_task(task: Task) -> TaskResult:
    assert _SETTINGS is not None
    return run_task(_SETTINGS, *task)


def _lost_task(settings: WorkerSettings, task: Task, error: str) -> TaskResult:
    """The result of a task whose worker was stopped (timeout) or died; never cached, so a
    rerun (say with a larger limit) tries again."""
    rel, known = task
    if known is None:
        try:
            known = file_sha256(settings.raw / rel)
        except OSError:
            known = ""
    return TaskResult(rel, known, error, True)


def hash_and_process(
    candidates: list[str],
    settings: WorkerSettings,
    workers: int,
    records: StatRecords,
    decode_timeout: float | None = None,
) -> ProcessResults:
    """Hash every image candidate (raw paths relative to ``settings.raw``) and make sure
    its result is in the cache; a file whose stat and cache entry are known is not read."""
    start = time.perf_counter()
    results = ProcessResults()
    tasks: list[Task] = []
    stat_of: dict[str, tuple[int, int]] = {}  # only files that go to a worker
    for rel in candidates:
        path = os.path.join(settings.raw, rel)
        st = os.stat(path)
        sha = records.known_sha(path, st.st_size, st.st_mtime_ns)
        if sha is not None:
            entry = settings.cache.lookup(sha)
            if entry is not None:
                results.add(TaskResult.cached(rel, sha, entry))
                continue
        tasks.append((rel, sha))
        stat_of[rel] = (st.st_size, st.st_mtime_ns)
    with tqdm(
        total=len(tasks), desc="preprocess", unit="img", mininterval=0.5, disable=None
    ) as bar:
        for result in run_tasks(settings, tasks, workers, decode_timeout):
            results.add(result)
            if result.messages:
                log.debug("decoder messages for usable %s: %s", result.rel, result.messages)
            if result.sha:
                path = os.path.join(settings.raw, result.rel)
                records.remember_sha(path, *stat_of[result.rel], result.sha)
            bar.update()
    results.stats.seconds = time.perf_counter() - start
    return results
