"""The origin's JSON document, shared by ``predict.py`` and the TCP server.

The origin printed ``{path: {class: probability}}`` (and the TCP server added ``__time__``).
We keep that shape: every path maps to its class probabilities only, so existing consumers
keep working, and everything else goes under top-level keys starting with ``__`` (which
origin consumers of the TCP output already had to skip for ``__time__``):

- ``__decision__``: ``{path: {"label", "rule", "threshold", ...}}`` at the stored threshold
- ``__errors__``: ``{path: reason}`` for files that could not be decoded (only if any)
- ``__time__``: seconds taken (TCP only, as in the origin)
- ``__model__``: the bundle that answered and where it came from (``predict.py`` only):
  ``{"source", "bundle_md5", "registry", "mlflow_run_id", "run_name", "git_commit"}``

:class:`StreamedDocument` writes the same document, pretty-printed exactly as
``json.dumps(doc, indent=2)`` would, in pieces: each file's entry as soon as its answer is
known, the sections that follow them at the end (for the TCP server's big folders).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

DECISION_KEY = "__decision__"
ERRORS_KEY = "__errors__"
TIME_KEY = "__time__"
MODEL_KEY = "__model__"
MODEL_FIELDS = ("source", "bundle_md5", "registry", "mlflow_run_id", "run_name", "git_commit")


def model_record(version: dict[str, Any]) -> dict[str, Any]:
    """``__model__``: the lineage fields of a predictor's ``/version`` description."""
    return {k: version.get(k) for k in MODEL_FIELDS}


def origin_document(answers: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """``{path: {class: prob}, "__decision__": {...}, "__errors__": {...}}`` from answers."""
    doc: dict[str, Any] = {}
    decisions: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for key, answer in answers:
        if "error" in answer:
            errors[key] = answer["error"]
        else:
            doc[key] = answer["probabilities"]
            decisions[key] = answer["decision"]
    doc[DECISION_KEY] = decisions
    if errors:
        doc[ERRORS_KEY] = errors
    return doc


class StreamedDocument:
    """:func:`origin_document`'s document plus extra keys, as the text of
    ``json.dumps(doc, indent=2)``, written in pieces: :meth:`begin`, :meth:`add` as answers
    come (their per-file entries at once; decisions and errors kept for the end), then
    :meth:`end`. The pieces joined are exactly what ``json.dumps`` gives, so the answers
    must come in the order the document lists them (sorted by path, as the TCP server
    does); errors are sorted at the end."""

    PIECE = 256  # entries of a section at the end per piece (each piece takes ~2 ms)

    def __init__(self) -> None:
        self._decisions: list[tuple[str, Any]] = []
        self._errors: dict[str, str] = {}
        self._keys = 0  # top-level keys written so far

    def begin(self) -> str:
        """The document's opening."""
        return "{"

    def add(self, answers: Iterable[tuple[str, dict[str, Any]]]) -> str:
        """The per-file entries of ``answers`` (``describe()`` fields or ``{"error"}``)."""
        parts = []
        for key, answer in answers:
            if "error" in answer:
                self._errors[key] = answer["error"]
            else:
                parts.append(self._key(key) + _pretty(answer["probabilities"], 1))
                self._decisions.append((key, answer["decision"]))
        return "".join(parts)

    def end(self, extra: dict[str, Any]) -> Iterator[str]:
        """The rest, in pieces of at most :attr:`PIECE` entries: ``__decision__``,
        ``__errors__`` (if any), the ``extra`` keys and the closing brace."""
        yield from self._section(DECISION_KEY, self._decisions)
        if self._errors:
            yield from self._section(ERRORS_KEY, sorted(self._errors.items()))
        for key, value in extra.items():
            yield self._key(key) + _pretty(value, 1)
        yield "\n}"

    def _key(self, key: str) -> str:
        """A top-level key, after the separator from the one before."""
        separator = ",\n  " if self._keys else "\n  "
        self._keys += 1
        return f"{separator}{json.dumps(key)}: "

    def _section(self, key: str, items: list[tuple[str, Any]]) -> Iterator[str]:
        if not items:
            yield self._key(key) + "{}"
            return
        head = self._key(key) + "{"
        for start in range(0, len(items), self.PIECE):
            yield head + ",".join(
                f"\n    {json.dumps(name)}: {_pretty(value, 2)}"
                for name, value in items[start : start + self.PIECE]
            )
            head = ","
        yield "\n  }"


def _pretty(value: Any, level: int) -> str:
    """``value`` as ``json.dumps(..., indent=2)`` writes it ``level`` levels deep (JSON
    strings hold no raw newline, so indenting every line is safe)."""
    return json.dumps(value, indent=2).replace("\n", "\n" + "  " * level)
