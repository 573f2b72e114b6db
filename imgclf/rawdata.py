"""What counts in the raw data folder (``data/raw/<class>/<subclass>/...``), one rule for
``preprocess`` and for the params' class check (:func:`imgclf.params.raw_classes`).

- A file is an image candidate unless it is hidden (``.DS_Store``) or a sidecar by its
  extension (``.txt`` captions, ``.json``, ...): :func:`skip_reason`.
- A class is a folder directly under the raw folder, not hidden, that holds at least one
  image candidate at any depth. A folder without one (empty, or only hidden and sidecar
  files) is no class: :func:`empty_class_folders`. Links to folders are not followed, as
  ``preprocess`` does not follow them: a linked class folder is no class either.
"""

from __future__ import annotations

import os
from pathlib import Path

SIDECAR_SUFFIXES = frozenset(
    {".txt", ".json", ".xml", ".csv", ".tsv", ".md", ".yaml", ".yml", ".xmp", ".ini", ".db"}
)


def skip_reason(name: str) -> str | None:
    """Why a file named ``name`` is not an image candidate at all, or None."""
    if name.startswith("."):
        return "hidden file"
    suffix = os.path.splitext(name)[1].lower()  # noqa: PTH122 (a name, not a path)
    if suffix in SIDECAR_SUFFIXES:
        return f"sidecar file ({suffix}), not an image"
    return None


def class_folders(raw: Path) -> list[Path]:
    """The folders directly under ``raw`` that may be classes (not hidden), sorted by name;
    none when ``raw`` does not exist."""
    if not raw.is_dir():
        return []
    return sorted(
        (p for p in raw.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def holds_image(folder: Path) -> bool:
    """Whether ``folder`` (not a link) holds an image candidate at any depth; stops at the
    first one found."""
    if folder.is_symlink():
        return False
    return any(skip_reason(name) is None for _, _, names in os.walk(folder) for name in names)


def empty_class_folders(raw: Path) -> list[Path]:
    """The folders under ``raw`` that look like classes but hold no image candidate."""
    return [p for p in class_folders(raw) if not holds_image(p)]


def why_not_a_class(folder: Path, shown: str) -> str:
    """One line saying why ``folder`` (shown as ``shown``) is not a class, and what to do."""
    what = "is a link to a folder, not followed" if folder.is_symlink() else "holds no image"
    return f"{shown} {what}: not a class (add images or remove the folder)"
