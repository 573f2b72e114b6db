"""Which files a request names: shared by ``predict.py`` and the TCP server, so both scan a
folder the same way.

Files are not picked by extension: every regular file is classified, and one the bundle's
decode settings do not accept (its ``formats``, judged from the bytes) gets an error answer
naming the reason, rather than being skipped without a word.
"""

from __future__ import annotations

from pathlib import Path


def image_files(source: Path, recursive: bool = False) -> list[Path]:
    """``source`` itself when it is a file, else the regular files in the folder (also in
    its sub-folders when ``recursive``), sorted, hidden ones (``.name``) skipped."""
    if source.is_file():
        return [source]
    found = source.rglob("*") if recursive else source.iterdir()
    return sorted(p for p in found if p.is_file() and not p.name.startswith("."))
