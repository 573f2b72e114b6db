"""What an earlier stage wrote, read by a later one: a missing file (or a JSON file that is
not JSON) is a one-line :class:`~imgclf.config.StageError` naming the stage to run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgclf.config import PATHS, StageError

# the sides of the split, in the order ``split`` writes them (``data/split/<side>.csv``)
SIDES = ("train", "val", "test")


def require(path: Path, written_by: str) -> Path:
    """``path`` as the user knows it (relative to the project root); a missing file is a
    :class:`StageError` naming the stage ``written_by`` (e.g. ``"split"``) to run."""
    shown = path.relative_to(PATHS.root) if path.is_relative_to(PATHS.root) else path
    if not path.is_file():
        raise StageError(f"{shown} not found: run the {written_by} stage first")
    return shown


def read_json(path: Path, written_by: str) -> dict[str, Any]:
    """The JSON file at ``path``, which the stage ``written_by`` (e.g. ``"train"``) writes."""
    shown = require(path, written_by)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # not JSON, or not UTF-8
        raise StageError(f"{shown} is not JSON ({exc}): rerun the {written_by} stage") from None
