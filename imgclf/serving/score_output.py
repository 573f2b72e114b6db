"""``imgclf-score``'s output file: CSV or JSON Lines rows, the sidecar that ties a file to
one bundle, and what a resume finds in it (the paths already scored, a torn last line)."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from imgclf.files import write_json

log = logging.getLogger(__name__)

FORMATS = ("csv", "jsonl")
META_SUFFIX = ".meta.json"


class ScoreError(Exception):
    """The command cannot run as asked; the message is one line saying why and what to do."""


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
    with _appending(output) as fh:
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


@contextlib.contextmanager
def _appending(output: Path) -> Iterator[IO[str]]:
    """``output`` opened for appending (folders made) and locked against another run."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fh = output.open("a", encoding="utf-8", errors="surrogateescape", newline="")
    except OSError as exc:
        raise ScoreError(f"cannot write {output}: {(exc.strerror or str(exc)).lower()}") from None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ScoreError(f"{output} is being written by another run") from None
        yield fh


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
