"""The origin's JSON document, shared by ``predict.py`` and the TCP server.

The origin printed ``{path: {class: probability}}`` (and the TCP server added ``__time__``).
We keep that shape: every path maps to its class probabilities only, so existing consumers
keep working, and everything else goes under top-level keys starting with ``__`` (which
origin consumers of the TCP output already had to skip for ``__time__``):

- ``__decision__``: ``{path: {"label", "rule", "threshold", ...}}`` at the stored threshold
- ``__errors__``: ``{path: reason}`` for files that could not be decoded (only if any)
- ``__time__``: seconds taken (TCP only, as in the origin)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

DECISION_KEY = "__decision__"
ERRORS_KEY = "__errors__"
TIME_KEY = "__time__"


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
