"""Stage ``preprocess``: ``data/raw/<class>/<subclass>/...`` to training-size RGB JPEGs.

Outputs (``data/raw`` is only ever read):

- ``data/processed/<class>/<flat name>.jpg``: every usable image, upright, RGB, fitted to
  ``preprocess.size`` (pad or crop), so no later step decodes a full-size photo again;
- ``data/invalid/<class>/<flat name>``: byte copies of unusable files (the origin's
  quarantine), files outside any class folder go to ``data/invalid/_unlabelled/``;
- ``data/manifest.csv``: one row per raw file with its class, subclass, SHA-256 and
  outcome (``processed``, ``invalid`` with the reason in words, or ``skipped``), and
  ``flags`` (``blank`` for a near-uniform processed image: kept, but worth a look).

Rules:

- Sub-folders below the class folder may nest; the first is the subclass. A file lying
  directly in a class folder belongs to that class with an empty subclass.
- Flattening joins the path below the class folder with ``__``; when two files would get
  the same flat name, both get a short hash of their raw path appended, so nothing is
  ever overwritten.
- The same image content under two different classes is a label conflict: every copy is
  quarantined with that reason. Identical content within one class is kept.
- Hidden files (``.DS_Store``) and sidecar files by extension (``.txt`` captions, ``.json``,
  ...) are not images and not errors: they are listed as ``skipped`` and not copied.
  Everything else is decoded by content (so upper-case or missing extensions are fine).
- A file whose decode takes longer than ``decode_timeout`` seconds is quarantined with a
  ``timeout`` reason (its worker process is stopped and replaced) and the stage goes on.
- What decoder libraries print (libtiff writes to fd 2 directly) never reaches the log
  raw: it is added to the reason of an invalid file, or logged at DEBUG for a usable one.
  The log gets one summary of invalid files (counts by kind, the first few), not a line
  per file.

Incremental: results are cached by (content hash, processing settings, code version) in a
folder outside the DVC outs, and file hashes by (path, size, mtime), so a rerun decodes
only new or changed content. Timeouts are not cached (the limit is not part of the key).
Temporary files (``*.<pid>.tmp``) a killed run left behind are deleted at the start of
the next run, unless their process is still alive.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import logging
import multiprocessing
import os
import shutil
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import PIL
import psutil
from pebble import ProcessExpired, ProcessPool
from tqdm import tqdm

from imgclf import imaging
from imgclf.capture import CapturedOutput
from imgclf.config import PATHS, StageError, digest, load_params, setup_logging, stage_main
from imgclf.imaging import DecodeOptions, InvalidImage

log = logging.getLogger(__name__)

SIDECAR_SUFFIXES = frozenset(
    {".txt", ".json", ".xml", ".csv", ".tsv", ".md", ".yaml", ".yml", ".xmp", ".ini", ".db"}
)
UNLABELLED = "_unlabelled"
MANIFEST_FIELDS = (
    "raw_path",
    "class",
    "subclass",
    "sha256",
    "status",
    "output_path",
    "reason",
    "flags",
)
BLANK = "blank"  # flag of a processed image that is near-uniform (imaging.is_blank)


@dataclass(frozen=True, slots=True)
class RawFile:
    """One file under the raw folder. ``label`` is None for files outside a class folder."""

    rel: str  # posix path relative to the raw folder
    label: str | None
    subclass: str

    @property
    def skip_reason(self) -> str | None:
        """Why this file is not an image candidate at all, or None."""
        name = self.rel.rsplit("/", 1)[-1]
        if name.startswith("."):
            return "hidden file"
        suffix = os.path.splitext(name)[1].lower()
        if suffix in SIDECAR_SUFFIXES:
            return f"sidecar file ({suffix}), not an image"
        return None


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where one raw file ended up; ``output`` is relative to the output folder it lives in."""

    raw: RawFile
    sha256: str
    status: str  # processed | invalid | skipped
    output: str
    reason: str
    flags: str = ""  # "blank" for a near-uniform processed image, else empty


def scan_raw(raw: Path) -> list[RawFile]:
    """List every file under ``raw`` (sorted, symlinked folders not followed)."""
    if not raw.is_dir():
        raise FileNotFoundError(
            f"raw data folder not found: {raw} (put images in {raw}/<class>/<subclass>/, "
            "or run `python -m imgclf.pipeline.sample` for the bundled sample)"
        )
    files: list[RawFile] = []
    top = os.fspath(raw)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        folder = os.path.relpath(dirpath, top).replace(os.sep, "/")
        parts = [] if folder == "." else folder.split("/")
        # one shared string per class and subclass name, not one per file
        label = sys.intern(parts[0]) if parts else None
        subclass = sys.intern(parts[1]) if len(parts) > 1 else ""
        for name in sorted(filenames):
            rel = f"{folder}/{name}" if parts else name
            files.append(RawFile(rel, label, subclass))
    return files


def flat_names(files: Iterable[RawFile], suffix: str | None) -> dict[str, str]:
    """Map each raw path to a unique flat file name inside its class folder.

    ``suffix`` replaces the file's extension (``.jpg`` for processed), or None keeps the
    original name (invalid copies). Names that collide get ``-<hash of raw path>``.
    """
    proposed: dict[str, str] = {}
    groups: dict[tuple[str | None, str], list[str]] = defaultdict(list)
    for f in files:
        parts = f.rel.split("/")[1:] if f.label is not None else f.rel.split("/")
        name = "__".join(parts)
        if suffix is not None:
            name = "__".join([*parts[:-1], Path(parts[-1]).stem]) + suffix
        proposed[f.rel] = name
        groups[(f.label, name.casefold())].append(f.rel)
    for members in groups.values():
        if len(members) > 1:
            for rel in members:
                stem, dot, ext = proposed[rel].rpartition(".")
                tag = hashlib.sha1(rel.encode()).hexdigest()[:8]
                proposed[rel] = f"{stem}-{tag}{dot}{ext}" if dot else f"{ext}-{tag}"
    return proposed


def label_conflicts(hashes: dict[str, str], files: Iterable[RawFile]) -> dict[str, str]:
    """Raw paths whose content also appears under another class, with the reason."""
    by_hash: dict[str, list[RawFile]] = defaultdict(list)
    for f in files:
        if f.label is not None and f.rel in hashes:
            by_hash[hashes[f.rel]].append(f)
    reasons: dict[str, str] = {}
    for group in by_hash.values():
        labels = sorted({f.label for f in group if f.label is not None})
        if len(labels) > 1:
            for f in group:
                others = [g.rel for g in group if g.label != f.label]
                reasons[f.rel] = (
                    f"label conflict: identical image under classes {', '.join(labels)} "
                    f"(also at {', '.join(others[:3])})"
                )
    return reasons


def decide(
    files: list[RawFile],
    hashes: dict[str, str],
    errors: dict[str, str],
    flags: dict[str, str] | None = None,
) -> list[Outcome]:
    """Turn hashes, decode errors and image flags into one outcome per raw file (pure)."""
    flags = flags or {}
    conflicts = label_conflicts(hashes, (f for f in files if f.rel not in errors))
    candidates = [f for f in files if f.skip_reason is None]
    good = [f for f in candidates if f.label is not None and f.rel not in errors]
    good = [f for f in good if f.rel not in conflicts]
    good_set = {f.rel for f in good}
    bad = [f for f in candidates if f.rel not in good_set]
    processed_names = flat_names(good, ".jpg")
    invalid_names = flat_names(bad, None)
    outcomes = []
    for f in files:
        sha = hashes.get(f.rel, "")
        folder = f.label if f.label is not None else UNLABELLED
        if f.skip_reason is not None:
            outcomes.append(Outcome(f, sha, "skipped", "", f.skip_reason))
        elif f.rel in good_set:
            output = f"{folder}/{processed_names[f.rel]}"
            outcomes.append(Outcome(f, sha, "processed", output, "", flags.get(f.rel, "")))
        else:
            reason = (
                "not inside a class folder"
                if f.label is None
                else errors.get(f.rel) or conflicts[f.rel]
            )
            outcomes.append(Outcome(f, sha, "invalid", f"{folder}/{invalid_names[f.rel]}", reason))
    return outcomes


# --- the content cache -----------------------------------------------------------------


def code_version() -> str:
    """Hash of what decides processed bytes: this module, the decoder and Pillow."""
    h = hashlib.sha256(PIL.__version__.encode())
    for module_file in (imaging.__file__, __file__):
        h.update(Path(module_file).read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Cache:
    """Per content hash: the processed JPEG (``.jpg``, or ``.blank.jpg`` for a near-uniform
    image, so the flag costs no extra file) or the invalid reason (``.err``)."""

    folder: Path

    def entry(self, sha: str, ext: str) -> Path:
        return self.folder / sha[:2] / f"{sha}{ext}"

    def jpeg(self, sha: str, flags: str) -> Path:
        """The processed JPEG of ``sha`` with these flags."""
        return self.entry(sha, ".blank.jpg" if flags == BLANK else ".jpg")

    def lookup(self, sha: str) -> tuple[bool, str | None, str]:
        """(found, invalid reason or None, flags); one stat for the common case."""
        if self.entry(sha, ".jpg").is_file():
            return True, None, ""
        if self.entry(sha, ".blank.jpg").is_file():
            return True, None, BLANK
        err = self.entry(sha, ".err")
        if err.is_file():
            return True, err.read_text(encoding="utf-8"), ""
        return False, None, ""

    def store(self, sha: str, ext: str, blob: bytes) -> None:
        target = self.entry(sha, ext)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        tmp.replace(target)


def process_image(data: bytes, options: DecodeOptions, quality: int) -> tuple[bytes, str]:
    """Decode, fit and re-encode one image; returns (JPEG bytes, flags).

    ``flags`` is ``"blank"`` when the picture part of the fitted image (padding excluded)
    is near-uniform. Raises InvalidImage with the reason.
    """
    img = imaging.load_rgb(data, options)
    fitted, content = imaging.fit_square_content(img, options)
    flags = BLANK if imaging.is_blank(content) else ""
    return imaging.encode_jpeg(fitted, quality), flags


def process_bytes(data: bytes, options: DecodeOptions, quality: int) -> bytes:
    """Decode, fit and re-encode one image (raises InvalidImage with the reason)."""
    return process_image(data, options, quality)[0]


# --- third-party decoder messages --------------------------------------------------------

# --- workers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Settings shared by every worker task."""

    raw: Path
    cache: Cache
    options: DecodeOptions
    quality: int


class TaskResult(NamedTuple):
    """What a worker found for one raw file; ``messages``: decoder output of a file that was
    still usable (for the debug log)."""

    rel: str
    sha: str
    error: str | None
    decoded: bool
    flags: str = ""
    messages: str = ""


def run_task(job: Job, rel: str, known_sha: str | None) -> TaskResult:
    """Worker: hash one raw file, then fill the cache for it.

    What decoders print while it runs is kept: appended to the reason of an invalid file,
    returned in ``messages`` for a usable one; nothing reaches the stage's stderr.
    """
    try:
        data = (job.raw / rel).read_bytes()
    except OSError as exc:
        return TaskResult(rel, known_sha or "", f"unreadable file: {exc.strerror or exc}", False)
    sha = hashlib.sha256(data).hexdigest()
    found, error, flags = job.cache.lookup(sha)
    if found:
        return TaskResult(rel, sha, error, False, flags)
    said = CapturedOutput()
    try:
        with said:
            blob, flags = process_image(data, job.options, job.quality)
    except InvalidImage as exc:
        reason = f"{exc} (decoder said: {said.text})" if said.text else str(exc)
        job.cache.store(sha, ".err", reason.encode())
        return TaskResult(rel, sha, reason, True)
    job.cache.store(sha, ".blank.jpg" if flags == BLANK else ".jpg", blob)
    return TaskResult(rel, sha, None, True, flags, said.text)


_JOB: Job | None = None


def _init_worker(job: Job) -> None:
    global _JOB
    _JOB = job


def _pool_task(args: tuple[str, str | None]) -> TaskResult:
    assert _JOB is not None
    return run_task(_JOB, *args)


def timeout_reason(seconds: float) -> str:
    """The invalid reason of a file whose decode ran past the limit."""
    return f"timeout: decode took longer than {seconds:g} s"


def _file_sha(path: str) -> str:
    """SHA-256 of a file, or "" when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return ""


def _lost_task(job: Job, task: tuple[str, str | None], error: str) -> TaskResult:
    """The result of a task whose worker was stopped (timeout) or died; never cached, so a
    rerun (say with a larger limit) tries again."""
    rel, known = task
    return TaskResult(rel, known or _file_sha(os.path.join(job.raw, rel)), error, True)


def run_tasks(
    job: Job,
    tasks: list[tuple[str, str | None]],
    workers: int,
    timeout: float | None = None,
) -> Iterator[TaskResult]:
    """Run tasks, yielding results as they finish.

    Without ``timeout``, a small batch or one worker runs inline. With it, every batch runs
    on a pebble process pool (one task per file, at most ``timeout`` seconds each): a worker
    past the limit is stopped and replaced, and its file gets a ``timeout`` reason. A worker
    that dies (a decoder crash) quarantines its file too instead of stopping the stage.
    """
    if not tasks:
        return
    if timeout is None and (workers <= 1 or len(tasks) < 32):
        for task in tasks:
            yield run_task(job, *task)
        return
    size = max(1, min(workers, len(tasks)))
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPool(size, initializer=_init_worker, initargs=(job,), context=ctx)
    todo = iter(tasks)
    pending: dict[Future, tuple[str, str | None]] = {}
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
                    yield _lost_task(job, task, timeout_reason(timeout))
                except ProcessExpired as exc:
                    reason = f"decoder crashed: worker process died (exit code {exc.exitcode})"
                    yield _lost_task(job, task, reason)
        finished = True
    finally:
        if finished:
            pool.close()
        else:  # the caller stopped early or a task failed: do not wait for the rest
            pool.stop()
        pool.join()


# --- records kept between runs: file hashes by stat, and what the last sync wrote --------


class State:
    """SQLite records in the cache folder, so memory does not grow with them and parallel
    runs (queued experiments share the workspace cache) never corrupt them.

    ``hashes``: raw file (absolute path, size, mtime) -> SHA-256, so an unchanged file is
    not even read. ``outputs``: output file -> (content tag, size, mtime) of the last sync.
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
        row = self.db.execute(
            "SELECT sha FROM hashes WHERE path = ? AND size = ? AND mtime = ?",
            (path, size, mtime),
        ).fetchone()
        return row[0] if row else None

    def remember_sha(self, path: str, size: int, mtime: int, sha: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?)", (path, size, mtime, sha)
        )

    def output_is(self, path: str, tag: str, size: int, mtime: int) -> bool:
        row = self.db.execute("SELECT tag, size, mtime FROM outputs WHERE path = ?", (path,))
        return row.fetchone() == (tag, size, mtime)

    def remember_output(self, path: str, tag: str, size: int, mtime: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO outputs VALUES (?, ?, ?, ?)", (path, tag, size, mtime)
        )

    def close(self) -> None:
        self.db.commit()
        self.db.close()


@dataclass
class Stats:
    files: int = 0
    decoded: int = 0
    cached: int = 0
    written: int = 0
    seconds: float = 0.0


def hash_and_process(
    files: list[RawFile],
    job: Job,
    workers: int,
    state: State,
    decode_timeout: float | None = None,
) -> tuple[dict[str, str], dict[str, str], dict[str, str], Stats]:
    """Hash every image candidate and make sure its result is in the cache.

    Returns (sha by raw path, invalid reason by raw path, flags by raw path, stats).
    """
    start = time.perf_counter()
    hashes: dict[str, str] = {}
    errors: dict[str, str] = {}
    flags: dict[str, str] = {}
    stats = Stats(files=len(files))
    tasks: list[tuple[str, str | None]] = []
    stat_of: dict[str, tuple[int, int]] = {}  # only files that go to a worker
    for f in files:
        if f.skip_reason is not None:
            continue
        path = os.path.join(job.raw, f.rel)
        st = os.stat(path)
        sha = state.known_sha(path, st.st_size, st.st_mtime_ns)
        if sha is not None:
            found, error, flag = job.cache.lookup(sha)
            if found:
                hashes[f.rel] = sha
                if error is not None:
                    errors[f.rel] = error
                if flag:
                    flags[f.rel] = flag
                stats.cached += 1
                continue
        tasks.append((f.rel, sha))
        stat_of[f.rel] = (st.st_size, st.st_mtime_ns)
    bar = tqdm(total=len(tasks), desc="preprocess", unit="img", mininterval=0.5, disable=None)
    with bar:
        for rel, sha, error, decoded, flag, messages in run_tasks(
            job, tasks, workers, decode_timeout
        ):
            hashes[rel] = sha
            if error is not None:
                errors[rel] = error
            if flag:
                flags[rel] = flag
            if messages:
                log.debug("decoder messages for usable %s: %s", rel, messages)
            if sha:
                state.remember_sha(os.path.join(job.raw, rel), *stat_of[rel], sha)
            stats.decoded += int(decoded)
            stats.cached += int(not decoded)
            bar.update()
    stats.seconds = time.perf_counter() - start
    return hashes, errors, flags, stats


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


def sync_outputs(
    outcomes: list[Outcome],
    raw: Path,
    cache: Cache,
    processed: Path,
    invalid: Path,
    state: State,
) -> int:
    """Make ``processed`` and ``invalid`` hold exactly the outcomes' files; return how many
    files were written.

    The folders are DVC outs with ``persist: true``, so they survive a rerun: a file whose
    source and on-disk stat match the record of the last sync is left alone, every other
    wanted file is (re)written, and any file no outcome wants is deleted. Writes go through
    a temporary file and a rename, so a file DVC linked from its cache is replaced, never
    written through.
    """
    wanted: set[str] = set()
    written = 0
    for o in outcomes:
        if o.status == "processed":
            target = os.path.join(processed, o.output)
            source = cache.jpeg(o.sha256, o.flags)
            tag = f"{cache.folder.name}/{o.sha256}"
        elif o.status == "invalid":  # unreadable files have no hash: always rewritten
            target = os.path.join(invalid, o.output)
            source = raw / o.raw.rel
            tag = f"raw/{o.sha256}" if o.sha256 else f"raw/unread/{time.time_ns()}"
        else:
            continue
        wanted.add(target)
        try:
            st = os.stat(target)
            if state.output_is(target, tag, st.st_size, st.st_mtime_ns):
                continue
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{os.getpid()}.tmp"  # the pid tells a stale one from a live one
        try:
            shutil.copyfile(source, tmp)
        except OSError as exc:  # e.g. a raw file we may not read: listed, not copied
            log.warning("cannot copy %s: %s", source, exc)
            continue
        os.replace(tmp, target)
        st = os.stat(target)
        state.remember_output(target, tag, st.st_size, st.st_mtime_ns)
        written += 1
    for folder in (processed, invalid):
        folder.mkdir(parents=True, exist_ok=True)
        for dirpath, _, filenames in os.walk(folder, topdown=False):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if path not in wanted:
                    os.unlink(path)
            if dirpath != str(folder) and not os.listdir(dirpath):
                os.rmdir(dirpath)
    return written


def write_manifest(
    outcomes: list[Outcome], path: Path, raw: Path, processed: Path, invalid: Path, root: Path
) -> None:
    """One CSV row per raw file; paths relative to ``root`` when inside it."""

    def prefix(folder: Path) -> str:
        shown = folder.relative_to(root) if folder.is_relative_to(root) else folder
        return f"{shown.as_posix()}/"

    raw_at, bases = prefix(raw), {"processed": prefix(processed), "invalid": prefix(invalid)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_FIELDS)
        for o in outcomes:
            out = bases[o.status] + o.output if o.status in bases else ""
            label = o.raw.label if o.raw.label is not None else ""
            writer.writerow(
                (
                    raw_at + o.raw.rel,
                    label,
                    o.raw.subclass,
                    o.sha256,
                    o.status,
                    out,
                    o.reason,
                    o.flags,
                )
            )


def check_layout(raw: Path, outputs: Iterable[Path]) -> None:
    """Refuse output folders inside the raw folder or around it (raw is never written)."""
    raw = raw.resolve()
    for out in outputs:
        out = out.resolve()
        if out == raw or out.is_relative_to(raw) or raw.is_relative_to(out):
            raise ValueError(f"output {out} overlaps the raw data folder {raw}")


def preprocess(
    raw: Path,
    processed: Path,
    invalid: Path,
    manifest: Path,
    cache_dir: Path,
    options: DecodeOptions,
    quality: int,
    workers: int,
    root: Path,
    *,
    decode_timeout: float | None = None,
) -> tuple[list[Outcome], Stats]:
    """Run the whole stage on explicit paths; returns the outcomes and timing stats.

    ``decode_timeout``: seconds one file may take to decode (None: no limit); a file past
    it is quarantined with a ``timeout`` reason, not cached, and the stage goes on.
    """
    if decode_timeout is not None and not decode_timeout > 0:
        raise ValueError(f"decode_timeout must be positive seconds, got {decode_timeout}")
    check_layout(raw, (processed, invalid, manifest, cache_dir))
    files = scan_raw(raw)
    settings = {**options.to_dict(), "quality": quality, "code": code_version()}
    cache = Cache(cache_dir / "preprocess" / digest(settings))
    stale = remove_stale_temp_files((processed, invalid, cache.folder))
    if stale:
        log.info("removed %d temporary file(s) left by an interrupted run", stale)
    state = State(cache_dir / "preprocess" / "state.sqlite")
    try:
        job = Job(raw, cache, options, quality)
        hashes, errors, flags, stats = hash_and_process(files, job, workers, state, decode_timeout)
        state.db.commit()
        outcomes = decide(files, hashes, errors, flags)
        stats.written = sync_outputs(outcomes, raw, cache, processed, invalid, state)
    finally:
        state.close()
    write_manifest(outcomes, manifest, raw, processed, invalid, root)
    return outcomes, stats


def summarize(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """Counts of outcomes per class: ``{class: {status: n}}``."""
    table: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        table[o.raw.label if o.raw.label is not None else UNLABELLED][o.status] += 1
    return {label: dict(sorted(c.items())) for label, c in sorted(table.items())}


def reason_kind(reason: str) -> str:
    """What kind of problem an invalid reason is: its text before the first ``:`` or `` (``
    (the details after it, an exception or a size, differ from file to file)."""
    cut = min((i for i in (reason.find(":"), reason.find(" (")) if i > 0), default=len(reason))
    return reason[:cut].strip()


def problem_summary(
    outcomes: Iterable[Outcome], manifest: str, raw: str = "", examples: int = 3
) -> str:
    """One block for the log about what needs a look, or "" when nothing does.

    Invalid files are counted by :func:`reason_kind` (most frequent first), with the first
    ``examples`` of them (raw path shown as ``raw`` + relative path, and reason) and where
    every reason is (``manifest``); then the count of processed images flagged blank.
    """
    total = 0
    invalid: list[Outcome] = []
    blank = 0
    for o in outcomes:
        total += 1
        if o.status == "invalid":
            invalid.append(o)
        elif o.status == "processed" and o.flags == BLANK:
            blank += 1
    lines: list[str] = []
    if invalid:
        kinds = Counter(reason_kind(o.reason) for o in invalid)
        lines.append(f"{len(invalid)} of {total} file(s) invalid (every reason in {manifest}):")
        lines += [f"  {n:>6}  {kind}" for kind, n in sorted(kinds.items(), key=_by_count)]
        lines.append(f"  first {min(examples, len(invalid))}:")
        for o in invalid[:examples]:
            reason = o.reason if len(o.reason) <= 200 else o.reason[:197] + "..."
            lines.append(f"    {raw}{o.raw.rel}: {reason}")
    if blank:
        lines.append(f"{blank} processed image(s) near-uniform, flagged {BLANK!r} in {manifest}")
    return "\n".join(lines)


def _by_count(item: tuple[str, int]) -> tuple[int, str]:
    return -item[1], item[0]


def _shown(path: Path) -> str:
    """``path`` relative to the project root when inside it, as in the manifest."""
    return path.relative_to(PATHS.root).as_posix() if path.is_relative_to(PATHS.root) else str(path)


@stage_main
def main() -> None:
    params = load_params()
    setup_logging(params.base.log_level)
    cfg = params.preprocess
    options = DecodeOptions.from_params(cfg)
    outcomes, stats = preprocess(
        PATHS.raw,
        PATHS.processed,
        PATHS.invalid,
        PATHS.manifest,
        PATHS.cache,
        options,
        options.jpeg_quality,
        cfg.workers or (os.cpu_count() or 1),
        PATHS.root,
        decode_timeout=cfg.decode_timeout,
    )
    for label, counts in summarize(outcomes).items():
        log.info("class %-12s %s", label, ", ".join(f"{k}: {v}" for k, v in counts.items()))
    rate = stats.decoded / stats.seconds if stats.seconds and stats.decoded else 0.0
    log.info(
        "preprocess: %d file(s), %d decoded (%.0f images/s), %d from cache, %d output(s) "
        "written, %.2fs",
        stats.files,
        stats.decoded,
        rate,
        stats.cached,
        stats.written,
        stats.seconds,
    )
    summary = problem_summary(outcomes, _shown(PATHS.manifest), f"{_shown(PATHS.raw)}/")
    if summary:
        log.warning("%s", summary)
    if not any(o.status == "processed" for o in outcomes):
        raise StageError(
            f"no usable image under {_shown(PATHS.raw)}/ (see {_shown(PATHS.manifest)})"
        )


if __name__ == "__main__":
    sys.exit(main())
