"""Stage ``preprocess``: ``data/raw/<class>/<subclass>/...`` to training-size RGB JPEGs.

Outputs (``data/raw`` is only ever read):

- ``data/processed/<class>/<output name>.jpg``: every usable image, upright, RGB, fitted to
  ``preprocess.size`` (pad or crop), so no later step decodes a full-size photo again;
- ``data/invalid/<class>/<output name>``: byte copies of unusable files (the origin's
  quarantine), files outside any class folder go to ``data/invalid/_unlabelled/``;
- ``data/manifest.csv``: one row per raw file with its class, subclass, SHA-256 and
  outcome (``processed``, ``invalid`` with the reason in words, ``excluded`` by a decision,
  or ``skipped``), and ``flags`` (``blank`` for a near-uniform processed image: kept, but
  worth a look);
- ``data/fingerprints.csv``: the near-duplicate fingerprint (pHash and 16x16 thumbnail, see
  :mod:`~imgclf.pipeline.near_duplicates`) of every processed content hash, for ``split``.

Rules:

- Sub-folders below the class folder may nest; the first is the subclass. A file lying
  directly in a class folder belongs to that class with an empty subclass.
- Output names join the path below the class folder with ``__``; when two files would get
  the same name, both get a short hash of their raw path appended, so nothing is ever
  overwritten.
- ``data/labels_override.csv`` (:mod:`~imgclf.pipeline.overrides`) is applied first: a
  relabelled image is processed into its new class (the manifest's ``class``; its reason
  names the decision), an excluded one is listed as ``excluded``.
- The same image content under two different classes is a label conflict: every copy is
  quarantined with that reason. Identical content within one class is kept.
- Hidden files (``.DS_Store``) and sidecar files by extension (``.txt`` captions, ``.json``,
  ...) are not images and not errors: they are listed as ``skipped`` and not copied.
  Everything else is decoded by content (so upper-case or missing extensions are fine).
- A folder under the raw folder that holds no image (empty, or hidden and sidecar files
  only) is not a class (:mod:`imgclf.rawdata`): one WARNING line names it.
- A file whose decode takes longer than ``decode_timeout`` seconds is quarantined with a
  ``timeout`` reason and the stage goes on. The log gets one summary of invalid files
  (counts by kind, the first few), not a line per file.

The work is split by job: :mod:`~imgclf.pipeline.preprocess_workers` hashes and decodes
(in worker processes, with the time limit), :mod:`~imgclf.pipeline.preprocess_cache` keeps
results between runs so a rerun decodes only new or changed content, and
:mod:`~imgclf.pipeline.preprocess_outputs` rewrites only the output files that changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from imgclf.config import PATHS, StageError, digest, load_params, setup_logging, stage_main
from imgclf.files import write_csv
from imgclf.imaging import DecodeOptions
from imgclf.params import raw_classes
from imgclf.pipeline.near_duplicates import Fingerprint
from imgclf.pipeline.overrides import Override, OverrideError, check_paths, read_overrides
from imgclf.pipeline.preprocess_cache import BLANK, ContentCache, StatRecords
from imgclf.pipeline.preprocess_outputs import OutputFile, remove_stale_temp_files, sync_outputs
from imgclf.pipeline.preprocess_workers import (
    RunStats,
    WorkerSettings,
    code_version,
    hash_and_process,
)
from imgclf.rawdata import empty_class_folders, skip_reason, why_not_a_class

log = logging.getLogger(__name__)

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


@dataclass(frozen=True, slots=True)
class RawFile:
    """One file under the raw folder. ``label`` is None for files outside a class folder."""

    rel: str  # posix path relative to the raw folder
    label: str | None
    subclass: str

    @property
    def skip_reason(self) -> str | None:
        """Why this file is not an image candidate at all, or None."""
        return skip_reason(self.rel.rsplit("/", 1)[-1])


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where one raw file ended up; ``output`` is relative to the output folder it lives in."""

    raw: RawFile
    sha256: str
    status: str  # processed | invalid | excluded | skipped
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


def output_names(files: Iterable[RawFile], suffix: str | None) -> dict[str, str]:
    """Map each raw path to a unique output file name inside its class folder: the path
    below the class folder joined with ``__``.

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


def apply_labels(files: list[RawFile], decisions: dict[str, Override]) -> list[RawFile]:
    """``files`` with the classes of the relabel decisions (by raw path relative to the
    raw folder)."""
    out = []
    for f in files:
        decision = decisions.get(f.rel)
        relabel = decision is not None and decision.label is not None
        out.append(RawFile(f.rel, decision.label, f.subclass) if relabel else f)
    return out


def decide_outcomes(
    files: list[RawFile],
    hashes: dict[str, str],
    errors: dict[str, str],
    flags: dict[str, str] | None = None,
    decisions: dict[str, Override] | None = None,
) -> list[Outcome]:
    """Decide each raw file's outcome (processed, invalid, excluded or skipped) and output
    name from content hashes, decode errors, image flags and the user's ``decisions`` (by
    raw path relative to the raw folder; relabels already applied by :func:`apply_labels`)
    (pure)."""
    flags, decisions = flags or {}, decisions or {}
    excluded = {rel for rel, d in decisions.items() if d.label is None}
    usable = (f for f in files if f.rel not in errors and f.rel not in excluded)
    conflicts = label_conflicts(hashes, usable)
    candidates = [f for f in files if f.skip_reason is None and f.rel not in excluded]
    good = [f for f in candidates if f.label is not None and f.rel not in errors]
    good = [f for f in good if f.rel not in conflicts]
    good_set = {f.rel for f in good}
    bad = [f for f in candidates if f.rel not in good_set]
    processed_names = output_names(good, ".jpg")
    invalid_names = output_names(bad, None)
    outcomes = []
    for f in files:
        sha = hashes.get(f.rel, "")
        folder = f.label if f.label is not None else UNLABELLED
        decided = decisions[f.rel].reason if f.rel in decisions else ""
        if f.skip_reason is not None:
            outcomes.append(Outcome(f, sha, "skipped", "", f.skip_reason))
        elif f.rel in excluded:
            outcomes.append(Outcome(f, sha, "excluded", "", decided))
        elif f.rel in good_set:
            output = f"{folder}/{processed_names[f.rel]}"
            outcomes.append(Outcome(f, sha, "processed", output, decided, flags.get(f.rel, "")))
        else:
            reason = (
                "not inside a class folder"
                if f.label is None
                else errors.get(f.rel) or conflicts[f.rel]
            )
            outcomes.append(Outcome(f, sha, "invalid", f"{folder}/{invalid_names[f.rel]}", reason))
    return outcomes


def output_files(
    outcomes: Iterable[Outcome], raw: Path, cache: ContentCache, processed: Path, invalid: Path
) -> list[OutputFile]:
    """The files ``processed`` and ``invalid`` must hold: cached JPEGs of processed images,
    byte copies of invalid raw files (an unreadable one has no hash: always rewritten)."""
    wanted = []
    for o in outcomes:
        if o.status == "processed":
            source = os.fspath(cache.jpeg(o.sha256, o.flags))
            tag = f"{cache.folder.name}/{o.sha256}"
            wanted.append(OutputFile(os.path.join(processed, o.output), source, tag))
        elif o.status == "invalid":
            tag = f"raw/{o.sha256}" if o.sha256 else f"raw/unread/{time.time_ns()}"
            source = os.path.join(raw, o.raw.rel)
            wanted.append(OutputFile(os.path.join(invalid, o.output), source, tag))
    return wanted


def _prefix(folder: Path, root: Path) -> str:
    """How the manifest writes paths in ``folder``: relative to ``root`` when inside it."""
    shown = folder.relative_to(root) if folder.is_relative_to(root) else folder
    return f"{shown.as_posix()}/"


def write_manifest(
    outcomes: list[Outcome], path: Path, raw: Path, processed: Path, invalid: Path, root: Path
) -> None:
    """One CSV row per raw file; paths relative to ``root`` when inside it."""
    raw_at = _prefix(raw, root)
    bases = {"processed": _prefix(processed, root), "invalid": _prefix(invalid, root)}
    rows = (
        (
            raw_at + o.raw.rel,
            o.raw.label if o.raw.label is not None else "",
            o.raw.subclass,
            o.sha256,
            o.status,
            bases[o.status] + o.output if o.status in bases else "",
            o.reason,
            o.flags,
        )
        for o in outcomes
    )
    write_csv(path, MANIFEST_FIELDS, rows)


def write_fingerprints(
    outcomes: Iterable[Outcome], fingerprints: dict[str, bytes], path: Path
) -> None:
    """``sha256,phash,thumb`` (hex) of every processed content hash, sorted by hash."""
    shas = sorted({o.sha256 for o in outcomes if o.status == "processed"})
    rows = []
    for sha in shas:
        fp = Fingerprint.from_bytes(fingerprints[sha])
        rows.append((sha, f"{fp.phash:016x}", fp.thumb.hex()))
    write_csv(path, ("sha256", "phash", "thumb"), rows)


def relative_decisions(
    decisions: dict[str, Override], files: list[RawFile], raw_prefix: str, source: str
) -> dict[str, Override]:
    """``decisions`` keyed by raw path as in the manifest (``raw_prefix`` + path in the raw
    folder) re-keyed by path in the raw folder; an unknown path, or one that is no image
    candidate (hidden, sidecar), is an :class:`~imgclf.pipeline.overrides.OverrideError`.
    """
    check_paths(decisions, {raw_prefix + f.rel for f in files}, source)
    relative = {path.removeprefix(raw_prefix): d for path, d in decisions.items()}
    for f in files:
        if f.rel in relative and f.skip_reason is not None:
            raise OverrideError(
                f"{source} line {relative[f.rel].line}: {raw_prefix}{f.rel} is not an image "
                f"({f.skip_reason}); delete the line"
            )
    return relative


def warn_empty_class_folders(raw: Path, raw_prefix: str) -> list[Path]:
    """One WARNING line per folder under ``raw`` that holds no image, and so is not a
    class (shown as ``raw_prefix`` + its name); returns those folders."""
    empty = empty_class_folders(raw)
    for folder in empty:
        log.warning("%s", why_not_a_class(folder, f"{raw_prefix}{folder.name}/"))
    return empty


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
    workers: int,
    root: Path,
    *,
    decode_timeout: float | None = None,
    overrides: Path | None = None,
) -> tuple[list[Outcome], RunStats]:
    """Run the whole stage on explicit paths; returns the outcomes and timing stats.

    ``decode_timeout``: seconds one file may take to decode (None: no limit); a file past
    it is quarantined with a ``timeout`` reason, not cached, and the stage goes on.
    ``overrides``: the decisions file (:mod:`~imgclf.pipeline.overrides`), read and checked
    before anything is written. The fingerprints go to ``fingerprints.csv`` beside
    ``manifest``.
    """
    if decode_timeout is not None and not decode_timeout > 0:
        raise ValueError(f"decode_timeout must be positive seconds, got {decode_timeout}")
    check_layout(raw, (processed, invalid, manifest, cache_dir))
    files = scan_raw(raw)
    warn_empty_class_folders(raw, _prefix(raw, root))
    decisions: dict[str, Override] = {}
    if overrides is not None:
        found = read_overrides(overrides, set(raw_classes(raw)))
        decisions = relative_decisions(found, files, _prefix(raw, root), overrides.name)
        files = apply_labels(files, decisions)
    candidates = [f.rel for f in files if f.skip_reason is None]
    cache = ContentCache(
        cache_dir / "preprocess" / digest({**options.to_dict(), "code": code_version()})
    )
    stale = remove_stale_temp_files((processed, invalid, cache.folder))
    if stale:
        log.info("removed %d temporary file(s) left by an interrupted run", stale)
    settings = WorkerSettings(raw, cache, options)
    with closing(StatRecords(cache_dir / "preprocess" / "state.sqlite")) as records:
        found = hash_and_process(candidates, settings, workers, records, decode_timeout)
        records.commit()
        outcomes = decide_outcomes(files, found.hashes, found.errors, found.flags, decisions)
        wanted = output_files(outcomes, raw, cache, processed, invalid)
        found.stats.written = sync_outputs(wanted, (processed, invalid), records)
    found.stats.files = len(files)
    write_manifest(outcomes, manifest, raw, processed, invalid, root)
    write_fingerprints(outcomes, found.fingerprints, manifest.with_name("fingerprints.csv"))
    return outcomes, found.stats


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
    outcomes = list(outcomes)
    invalid = [o for o in outcomes if o.status == "invalid"]
    blank = sum(o.status == "processed" and o.flags == BLANK for o in outcomes)
    lines: list[str] = []
    if invalid:
        kinds = Counter(reason_kind(o.reason) for o in invalid)
        lines.append(
            f"{len(invalid)} of {len(outcomes)} file(s) invalid (every reason in {manifest}):"
        )
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


def log_run(outcomes: list[Outcome], stats: RunStats) -> None:
    """Per-class counts, throughput, and one summary of what needs a look."""
    for label, counts in summarize(outcomes).items():
        log.info("class %-12s %s", label, ", ".join(f"{k}: {v}" for k, v in counts.items()))
    rate = stats.decoded / stats.seconds if stats.seconds and stats.decoded else 0.0
    log.info(
        "preprocess: %d file(s), %d decoded (%.0f images/s), %d from cache, %d output(s) "
        "written, %.2fs",
        stats.files, stats.decoded, rate, stats.cached, stats.written, stats.seconds,
    )  # fmt: skip
    summary = problem_summary(outcomes, _shown(PATHS.manifest), f"{_shown(PATHS.raw)}/")
    if summary:
        log.warning("%s", summary)


@stage_main
def main() -> None:
    params = load_params()
    setup_logging(params.base.log_level)
    cfg = params.preprocess
    outcomes, stats = preprocess(
        PATHS.raw,
        PATHS.processed,
        PATHS.invalid,
        PATHS.manifest,
        PATHS.cache,
        DecodeOptions.from_params(cfg),
        cfg.workers or (os.cpu_count() or 1),
        PATHS.root,
        decode_timeout=cfg.decode_timeout,
        overrides=PATHS.overrides,
    )
    log_run(outcomes, stats)
    if not any(o.status == "processed" for o in outcomes):
        raise StageError(
            f"no usable image under {_shown(PATHS.raw)}/ (see {_shown(PATHS.manifest)})"
        )


if __name__ == "__main__":
    sys.exit(main())
