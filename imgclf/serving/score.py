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
being written by another run, or the resume is refused; 1 when the decode workers fail
for good (their fork server killed, say); 130/143 after SIGINT/SIGTERM, which stop after
the current batch. Exits 1 and 2 print one ``error:`` line, never a traceback; every way
of ending leaves a file that resumes.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from pebble import ProcessPool
from tqdm import tqdm

from imgclf import imaging
from imgclf.config import StageError, load_serve, setup_logging, stage_main
from imgclf.runtimes import cpu_threads
from imgclf.serving.listing import why_not_found
from imgclf.serving.predictor import ModelLoadError, Predictor, add_model_options
from imgclf.serving.score_input import Decoded, Entry, PoolBroken, decode_all, decode_pool, walk
from imgclf.serving.score_output import (
    FORMATS,
    Meta,
    ScoreError,
    meta_path,
    open_output,
    output_format,
    render,
)

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------ the run
@dataclass
class Counts:
    """What one run did."""

    scored: int = 0
    errors: int = 0
    skipped: int = 0  # already in the output
    seconds: float = 0.0

    def add(self, written: tuple[int, int]) -> None:
        """Count a batch's (scored, errors)."""
        self.scored += written[0]
        self.errors += written[1]

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
    out: IO[str], fmt: str, answers: list[tuple[str, dict]], predictor: Predictor
) -> tuple[int, int]:
    """Append ``answers``' rows in one write and flush them; (scored, errors), each error
    logged."""
    out.write(render(fmt, answers, predictor.class_names))
    out.flush()
    errors = [(rel, a["error"]) for rel, a in answers if "error" in a]
    for rel, reason in errors:
        log.warning("%s: %s", rel, reason)
    return len(answers) - len(errors), len(errors)


def score_tree(
    predictor: Predictor,
    job: Job,
    pool: ProcessPool,
    out: IO[str],
    done: set[str],
    stop: StopFlag,
) -> Counts:
    """Score every entry under ``job.source`` not in ``done``, appending rows to ``out``
    (flushed after each batch), with progress on stderr; ends after the batch during which
    ``stop`` was set. A decode pool that fails otherwise than by ``stop`` is a
    :class:`StageError` (the rows written so far resume)."""
    counts = Counts()
    start = time.perf_counter()
    exclude = excluded(job.source, job.output)
    total = sum(1 for e in walk(job.source, exclude) if e.rel not in done)
    window = max(2 * job.batch_size, 4 * job.workers)
    entries = todo(walk(job.source, exclude), done, counts)
    decoded = decode_all(
        pool, entries, predictor.decode, job.timeout, window, lambda: bool(stop.signum)
    )
    with tqdm(total=total, unit="img", file=sys.stderr, mininterval=0.5) as bar:
        try:
            for batch in batches(decoded, job.batch_size):
                if stop.signum:  # a signal to the process group stops the workers too:
                    batch = [d for d in batch if not d.lost]  # their files stay to be done
                written = write_answers(out, job.fmt, score_batch(predictor, batch), predictor)
                counts.add(written)
                bar.update(sum(written))
                if stop.signum:
                    break
        except PoolBroken as exc:
            if not stop.signum:
                raise StageError(f"{exc}: rerun the command to resume") from None
    counts.seconds = time.perf_counter() - start
    return counts


# ------------------------------------------------------------------ the command
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module's doc)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--source", required=True, type=Path, help="folder tree to score")
    ap.add_argument("--output", required=True, type=Path, help="scores.csv or scores.jsonl")
    ap.add_argument("--format", choices=FORMATS, help="default: from the output's suffix")
    add_model_options(ap)
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
        raise ScoreError(f"source not found: {source} ({why_not_found(source, exc)})") from None
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
    workers = args.workers or cpu_threads()
    job = Job(args.source, args.output, fmt, workers, args.batch_size, args.decode_timeout)
    counts = Counts()
    with decode_pool(workers) as pool:
        predictor = load_predictor(args)
        meta = Meta(
            bundle_md5=predictor.version["bundle_md5"],
            runtime=runtime_name(predictor),
            class_names=tuple(predictor.class_names),
            format=fmt,
            source=str(args.source.resolve()),
        )
        with open_output(args.output, meta, args.restart) as (out, done):
            if not stop.signum:  # a signal during the model's load: stop before scoring
                counts = score_tree(predictor, job, pool, out, done, stop)
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
