"""Score a folder tree of any size to CSV or JSON Lines, resumably (``imgclf-score``)::

    python serve/score.py --source /srv/uploads --output scores.csv
    python serve/score.py --source /srv/uploads --output scores.jsonl --workers 8

One row per entry of the tree, keyed by its path relative to ``--source`` (POSIX):

- CSV: ``path, top_class, top_probability, decision, positive, p_<class>`` for each class,
  ``error`` (empty for a scored file; the other fields are empty for an error row);
- JSON Lines: ``{"path", "probabilities": {class: p}, "top_class", "top_probability",
  "decision", "positive"}``, or ``{"path", "error"}``.

``decision`` is the label at the bundle's operating threshold, ``positive`` whether it is
the bundle's positive class. The tree is walked lazily (sorted within each folder, hidden
entries left out, symbolic links to folders not followed); files are decoded in a pool of
worker processes (one per core by default, a bounded number of files in flight, at most
``--decode-timeout`` seconds per file) and scored in batches in this process. Rows are
appended and flushed after each batch, in the walk's order; nothing else is kept per file
but the set of paths already in the output, so memory stays flat at any tree size.

Resuming: rerun the same command. The paths already in the output are skipped (a file
that got an error row counts as done), a last line torn by a kill is cut off, and the
CSV header is written only once. ``<output>.meta.json`` records the bundle's md5, the
runtime, the class names and the format; resuming with another bundle, class list or
format is refused: use a new ``--output``, or ``--restart`` to score everything afresh.

Exit status: 0 when the tree was scored (also when some files could not be decoded: they
get error rows, are logged and counted), 2 when the source or the model is missing, the
output's suffix is neither ``.csv`` nor ``.jsonl`` (without ``--format``), the output is
being written by another run, or the resume is refused; 130/143 after SIGINT/SIGTERM,
which stop after the current batch and leave a file that resumes. Never a traceback for
bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import io
import itertools
import json
import logging
import multiprocessing
import os
import signal
import stat
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from pebble import ProcessExpired, ProcessPool
from tqdm import tqdm

from imgclf import imaging
from imgclf.config import PATHS, load_serve, setup_logging, stage_main
from imgclf.files import write_json
from imgclf.imaging import DecodeOptions, InvalidImage
from imgclf.runtimes import RUNTIMES, cpu_threads
from imgclf.serving.listing import _not_regular, _why_not_found
from imgclf.serving.predictor import ModelLoadError, Predictor

log = logging.getLogger(__name__)

FORMATS = ("csv", "jsonl")
META_SUFFIX = ".meta.json"
WORKER_PRELOAD = ["imgclf.imaging"]  # what a decode worker imports (never TensorFlow)


class ScoreError(Exception):
    """The command cannot run as asked; the message is one line saying why and what to do."""


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
            yield Entry(rel, entry.path, _why_not_found(Path(entry.path), exc))
            continue
        if stat.S_ISREG(mode):
            yield Entry(rel, entry.path)
        elif not stat.S_ISDIR(mode):
            yield Entry(rel, entry.path, _not_regular(mode))
        elif entry.is_symlink():  # followed, it could lead back up: a loop
            yield Entry(rel, entry.path, "symbolic link to a folder (not followed)")
        else:
            yield from _walk_folder(entry.path, rel + "/", exclude)


# ------------------------------------------------------------------ decoding in workers
@dataclass(frozen=True)
class Decoded:
    """A file's training-JPEG bytes (see :func:`stored_jpeg`) or why it has none."""

    rel: str
    jpeg: bytes | None = None
    error: str | None = None


def stored_jpeg(path: str, options: DecodeOptions) -> tuple[bytes | None, str | None]:
    """Worker: ``(JPEG bytes, None)`` of the stored training JPEG of the file at ``path``
    (the first steps of :func:`imgclf.imaging.serving_input`: decode, fit, encode), or
    ``(None, reason)``. The last step, TensorFlow's JPEG decode, runs in the scoring
    process, so workers never import TensorFlow."""
    try:
        img = imaging.fit_square(imaging.load_rgb(Path(path), options), options)
        return imaging.encode_jpeg(img, options.jpeg_quality), None
    except (InvalidImage, OSError) as exc:
        return None, str(exc)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines too) made one space."""
    return " ".join(text.split())


def _outcome(entry: Entry, future: Future | None, timeout: float) -> Decoded:
    """What became of one entry sent to the pool (``future`` None: it was never sent)."""
    if future is None:
        return Decoded(entry.rel, error=entry.error)
    try:
        jpeg, error = future.result()
    except TimeoutError:
        error = f"timeout: decode took longer than {timeout:g} s"
    except ProcessExpired as exc:
        error = f"decoder crashed: worker process died (exit code {exc.exitcode})"
    except Exception as exc:  # anything else a decoder raised on hostile bytes
        error = f"decode failed: {type(exc).__name__}: {exc}"
    return Decoded(entry.rel, jpeg, None if error is None else one_line(error))


def decode_all(
    entries: Iterable[Entry], options: DecodeOptions, workers: int, timeout: float, window: int
) -> Iterator[Decoded]:
    """Decode ``entries`` in a pool of ``workers`` processes, yielding results in the
    entries' order; at most ``window`` files are in flight (memory stays flat), each may
    take ``timeout`` seconds (a worker past it is replaced and the file gets an error).

    Workers start from a fork server that has imported only :mod:`imgclf.imaging`, not
    from this process (which runs TensorFlow's threads, unsafe to fork).
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    pool = ProcessPool(max(1, workers), context=context)
    pending: deque[tuple[Entry, Future | None]] = deque()
    try:
        for entry in entries:
            future = None
            if entry.error is None:
                future = pool.schedule(stored_jpeg, args=(entry.path, options), timeout=timeout)
            pending.append((entry, future))
            if len(pending) >= window:
                yield _outcome(*pending.popleft(), timeout)
        while pending:
            yield _outcome(*pending.popleft(), timeout)
    finally:
        pool.stop()  # every result was taken, or the caller stopped early
        pool.join()


# ------------------------------------------------------------------ scoring
def score_batch(predictor: Predictor, batch: Sequence[Decoded]) -> list[tuple[str, dict]]:
    """``(rel, answer)`` per item: :meth:`Predictor.describe`'s answer, or ``{"error"}``;
    the decoded items run through the model in one call."""
    arrays = [np.asarray(imaging.decode_stored_jpeg(d.jpeg)) for d in batch if d.jpeg is not None]
    probs = iter(predictor.predict_arrays(np.stack(arrays)) if arrays else ())
    return [
        (d.rel, {"error": d.error} if d.jpeg is None else predictor.describe(next(probs)))
        for d in batch
    ]


def csv_header(class_names: Sequence[str]) -> list[str]:
    """The CSV columns."""
    return [
        "path",
        "top_class",
        "top_probability",
        "decision",
        "positive",
        *(f"p_{c}" for c in class_names),
        "error",
    ]


def csv_row(rel: str, answer: dict[str, Any], class_names: Sequence[str]) -> list[Any]:
    """One CSV row (floats written as their shortest round-trip text)."""
    if "error" in answer:
        return [rel, "", "", "", "", *([""] * len(class_names)), answer["error"]]
    decision = answer["decision"]
    probabilities = answer["probabilities"]
    return [
        rel,
        answer["top_class"],
        answer["top_probability"],
        decision["label"],
        "true" if decision["positive"] else "false",
        *(probabilities[c] for c in class_names),
        "",
    ]


def jsonl_row(rel: str, answer: dict[str, Any]) -> dict[str, Any]:
    """One JSON Lines object."""
    if "error" in answer:
        return {"path": rel, "error": answer["error"]}
    return {
        "path": rel,
        "probabilities": answer["probabilities"],
        "top_class": answer["top_class"],
        "top_probability": answer["top_probability"],
        "decision": answer["decision"]["label"],
        "positive": answer["decision"]["positive"],
    }


def render(fmt: str, answers: Iterable[tuple[str, dict]], class_names: Sequence[str]) -> str:
    """The text of ``answers``' rows, one line each."""
    if fmt == "jsonl":
        return "".join(json.dumps(jsonl_row(rel, a)) + "\n" for rel, a in answers)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerows(csv_row(rel, a, class_names) for rel, a in answers)
    return buf.getvalue()


# ------------------------------------------------------------------ the output file
def output_format(output: Path, fmt: str | None) -> str:
    """``fmt``, else the one the output's suffix names; :class:`ScoreError` otherwise."""
    if fmt:
        return fmt
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ScoreError(
            f"cannot tell the format of {output}: name it .csv or .jsonl, or pass --format"
        )
    return suffix


def meta_path(output: Path) -> Path:
    """The sidecar that records what the output was scored with."""
    return output.with_name(output.name + META_SUFFIX)


def repair_tail(output: Path) -> int:
    """Cut a last line left without its newline (a kill during a write); bytes dropped."""
    with output.open("rb+") as fh:
        end = fh.seek(0, os.SEEK_END)
        keep = end
        while keep > 0:
            start = max(0, keep - 65536)
            fh.seek(start)
            chunk = fh.read(keep - start)
            if keep == end and chunk.endswith(b"\n"):
                return 0
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            keep = start
        fh.truncate(keep)
    return end - keep


def scored_paths(output: Path, fmt: str) -> set[str]:
    """The paths already in the output (its rows' first field)."""
    with output.open(encoding="utf-8", errors="surrogateescape", newline="") as fh:
        try:
            if fmt == "jsonl":
                return {json.loads(line)["path"] for line in fh if line.strip()}
            rows = csv.reader(fh)
            next(rows, None)  # the header
            return {row[0] for row in rows if row}
        except (ValueError, KeyError, TypeError, csv.Error) as exc:
            raise ScoreError(
                f"cannot read the paths already in {output} ({type(exc).__name__}: {exc}): "
                "use a new --output, or --restart to score everything afresh"
            ) from None


@dataclass(frozen=True)
class Meta:
    """What an output was scored with (``<output>.meta.json``)."""

    bundle_md5: str
    runtime: str
    class_names: tuple[str, ...]
    format: str
    source: str

    @classmethod
    def read(cls, path: Path) -> Meta | None:
        """The sidecar's record, None when there is none (or it cannot be read)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                data["bundle_md5"],
                data.get("runtime", ""),
                tuple(data["class_names"]),
                data["format"],
                data.get("source", ""),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def to_dict(self) -> dict[str, Any]:
        """As written to the sidecar."""
        return {**self.__dict__, "class_names": list(self.class_names)}


def refusal(output: Path, old: Meta | None, new: Meta) -> str | None:
    """Why rows of ``new`` must not be appended to ``output``'s, or None when they may."""
    how = "use a new --output, or --restart to score everything afresh"
    if old is None:
        return f"{output} has rows but no readable {meta_path(output).name}: {how}"
    if old.format != new.format:
        return f"{output} holds {old.format} rows, not {new.format}: {how}"
    if old.bundle_md5 != new.bundle_md5:
        return f"{output} was scored with bundle md5 {old.bundle_md5}, not {new.bundle_md5}: {how}"
    if old.class_names != new.class_names:
        return (
            f"{output} was scored for classes {', '.join(old.class_names)}, "
            f"not {', '.join(new.class_names)}: {how}"
        )
    return None


@contextlib.contextmanager
def open_output(output: Path, meta: Meta, restart: bool) -> Iterator[tuple[IO[str], set[str]]]:
    """The output, locked and opened for appending, and the paths it already holds.

    A fresh output (missing, empty, or ``restart``) gets a new sidecar and, as CSV, the
    header; an existing one is checked against the sidecar (:func:`refusal`) and its torn
    last line, if any, cut off.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("a", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ScoreError(f"{output} is being written by another run") from None
        if restart:
            fh.truncate(0)
        dropped = repair_tail(output)
        if dropped:
            log.warning("%s: cut off a torn last line (%d bytes)", output, dropped)
        done: set[str] = set()
        if output.stat().st_size == 0:  # the sidecar first: a kill in between starts afresh
            write_json(meta_path(output), meta.to_dict())
            if meta.format == "csv":
                fh.write(render_header(meta.class_names))
                fh.flush()
        else:
            _check_resume(output, meta)
            done = scored_paths(output, meta.format)
        yield fh, done


def render_header(class_names: Sequence[str]) -> str:
    """The CSV header line."""
    buf = io.StringIO()
    csv.writer(buf).writerow(csv_header(class_names))
    return buf.getvalue()


def _check_resume(output: Path, meta: Meta) -> None:
    old = Meta.read(meta_path(output))
    why = refusal(output, old, meta)
    if why:
        raise ScoreError(why)
    assert old is not None
    if old.runtime != meta.runtime:
        log.warning("%s: earlier rows ran on %s, these on %s", output, old.runtime, meta.runtime)
    if old.source != meta.source:
        log.warning("%s: earlier rows scored %s, these %s", output, old.source, meta.source)


# ------------------------------------------------------------------ the run
@dataclass
class Counts:
    """What one run did."""

    scored: int = 0
    errors: int = 0
    skipped: int = 0  # already in the output
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Files per second written by this run."""
        return (self.scored + self.errors) / self.seconds if self.seconds else 0.0


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM: the run ends after the batch it is on."""

    signum: int = 0
    _previous: dict[int, Any] = field(default_factory=dict)

    def __enter__(self) -> StopFlag:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._set)
        return self

    def __exit__(self, *_: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _set(self, signum: int, _frame: object) -> None:
        if not self.signum:
            log.warning("%s: stopping after the current batch", signal.Signals(signum).name)
        self.signum = signum


def excluded(source: Path, output: Path) -> frozenset[str]:
    """The output and its sidecar, as paths relative to ``source`` when they are inside it."""
    base = source.resolve()
    found = set()
    for path in (output, meta_path(output)):
        full = path.resolve()
        if full.is_relative_to(base):
            found.add(full.relative_to(base).as_posix())
    return frozenset(found)


def todo(entries: Iterable[Entry], done: set[str], counts: Counts) -> Iterator[Entry]:
    """The entries not in ``done`` (those are counted as skipped)."""
    for entry in entries:
        if entry.rel in done:
            counts.skipped += 1
        else:
            yield entry


@dataclass(frozen=True)
class Job:
    """How to score one tree."""

    source: Path
    output: Path
    fmt: str
    workers: int
    batch_size: int
    timeout: float


def batches(items: Iterable[Decoded], size: int) -> Iterator[list[Decoded]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def write_answers(
    out: IO[str], fmt: str, answers: list[tuple[str, dict]], class_names: Sequence[str]
) -> int:
    """Append ``answers``' rows in one write and flush them; how many were errors (each
    logged)."""
    out.write(render(fmt, answers, class_names))
    out.flush()
    errors = [(rel, a["error"]) for rel, a in answers if "error" in a]
    for rel, reason in errors:
        log.warning("%s: %s", rel, reason)
    return len(errors)


def score_tree(
    predictor: Predictor, job: Job, out: IO[str], done: set[str], stop: StopFlag
) -> Counts:
    """Score every entry under ``job.source`` not in ``done``, appending rows to ``out``
    (flushed after each batch), with progress on stderr; ends after the batch during which
    ``stop`` was set."""
    counts = Counts()
    start = time.perf_counter()
    exclude = excluded(job.source, job.output)
    total = sum(1 for e in walk(job.source, exclude) if e.rel not in done)
    window = max(2 * job.batch_size, 4 * job.workers)
    entries = todo(walk(job.source, exclude), done, counts)
    decoded = decode_all(entries, predictor.decode, job.workers, job.timeout, window)
    bar = tqdm(total=total, unit="img", file=sys.stderr, mininterval=0.5, disable=None)
    with contextlib.closing(decoded), bar:  # closing: the pool stops at once on a stop
        for batch in batches(decoded, job.batch_size):
            answers = score_batch(predictor, batch)
            errors = write_answers(out, job.fmt, answers, predictor.class_names)
            counts.errors += errors
            counts.scored += len(answers) - errors
            bar.update(len(answers))
            if stop.signum:
                break
    counts.seconds = time.perf_counter() - start
    return counts


# ------------------------------------------------------------------ the command
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module's doc)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--source", required=True, type=Path, help="folder tree to score")
    ap.add_argument("--output", required=True, type=Path, help="scores.csv or scores.jsonl")
    ap.add_argument("--format", choices=FORMATS, help="default: from the output's suffix")
    ap.add_argument(
        "--model",
        default=str(PATHS.bundle),
        help="bundle file (models/bundle.zip) or MLflow URI such as models:/imgclf@champion",
    )
    ap.add_argument(
        "--runtime",
        choices=("auto", *RUNTIMES),
        default=None,
        help="keras | tflite | onnx | auto (default: serve.yaml's runtime)",
    )
    ap.add_argument("--workers", type=int, default=0, help="decode processes (0: one per core)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per model call")
    ap.add_argument("--decode-timeout", type=float, default=30.0, help="seconds per file")
    ap.add_argument("--restart", action="store_true", help="start the output afresh")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0 or args.decode_timeout <= 0:
        ap.error("--batch-size must be >= 1, --workers >= 0 and --decode-timeout > 0")
    return args


def check_source(source: Path) -> None:
    """:class:`ScoreError` unless ``source`` is a folder this process may read."""
    try:
        mode = source.stat().st_mode
    except OSError as exc:
        raise ScoreError(f"source not found: {source} ({_why_not_found(source, exc)})") from None
    if not stat.S_ISDIR(mode):
        raise ScoreError(f"source is not a folder: {source}")
    if not os.access(source, os.R_OK | os.X_OK):
        raise ScoreError(f"source folder cannot be read: {source}")


def runtime_name(predictor: Predictor) -> str:
    """The name of the runtime the predictor runs on."""
    runtime = predictor.version.get("runtime") or "keras"
    return str(runtime.get("name", "")) if isinstance(runtime, dict) else str(runtime)


def load_predictor(args: argparse.Namespace) -> Predictor:
    """The model ``args`` name, with the server's pixel limit and (by default) runtime."""
    settings = load_serve()  # a bad serve.yaml: one line, 2
    try:
        return Predictor.load(args.model, settings.max_pixels, args.runtime or settings.runtime)
    except ModelLoadError as exc:
        raise ScoreError(str(exc)) from None


def run(args: argparse.Namespace, stop: StopFlag) -> int:
    """Score as ``args`` say; :class:`ScoreError` for anything that stops it before."""
    fmt = output_format(args.output, args.format)
    check_source(args.source)
    predictor = load_predictor(args)
    meta = Meta(
        bundle_md5=predictor.version["bundle_md5"],
        runtime=runtime_name(predictor),
        class_names=tuple(predictor.class_names),
        format=fmt,
        source=str(args.source.resolve()),
    )
    workers = args.workers or cpu_threads()
    job = Job(args.source, args.output, fmt, workers, args.batch_size, args.decode_timeout)
    counts = Counts()
    with open_output(args.output, meta, args.restart) as (out, done):
        if not stop.signum:  # a signal during the model's load: stop before scoring
            counts = score_tree(predictor, job, out, done, stop)
    log.info(
        "%s: %d scored, %d errors, %d skipped as already done, in %.1f s (%.1f files/s) -> %s",
        args.source, counts.scored, counts.errors, counts.skipped, counts.seconds,
        counts.rate, args.output,
    )  # fmt: skip
    if stop.signum:
        log.warning("stopped by %s: rerun the command to resume", signal.Signals(stop.signum).name)
        return 128 + stop.signum
    return 0


@stage_main
def main(argv: list[str] | None = None) -> int:
    """Score ``--source`` into ``--output``; the exit status as in the module's doc."""
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        with StopFlag() as stop:
            return run(args, stop)
    except ScoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
