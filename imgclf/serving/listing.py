"""Which files a request names: shared by ``predict.py`` and the TCP server, so both scan a
folder the same way.

Files are not picked by extension: every regular file is classified, and one the bundle's
decode settings do not accept (its ``formats``, judged from the bytes) gets an error answer
naming the reason, rather than being skipped without a word. Hidden entries (``.name``) are
left out, and so are sub-folders unless the scan is recursive. Every other entry that is
not a regular file (a FIFO, a socket, a device, a dangling symbolic link, a link loop, a
folder that cannot be read) is named in :attr:`Listing.skipped` with the reason, and is
never opened: opening a FIFO would block until someone writes to it.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

KINDS = {
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


class SourceMissing(OSError):
    """The source path leads to nothing (missing, a dangling link, a link loop, a folder
    on the way that may not be entered); the message is the reason, in words."""


@dataclass
class Listing:
    """A scanned source: the files to classify (sorted) and every other entry with the
    reason it is not classified."""

    files: list[Path] = field(default_factory=list)
    skipped: dict[Path, str] = field(default_factory=dict)
    folders_left_out: int = 0  # sub-folders not scanned (the scan was not recursive)


def why_not_found(path: Path, exc: OSError) -> str:
    """In words, why ``os.stat(path)`` failed."""
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if exc.errno == errno.ENOENT and path.is_symlink():
        try:
            return f"dangling symbolic link (to {path.readlink()})"
        except OSError:
            return "dangling symbolic link"
    return (exc.strerror or str(exc)).lower()


def not_regular(mode: int) -> str:
    return f"not a regular file ({KINDS.get(stat.S_IFMT(mode), 'special file')})"


def scan(source: Path, recursive: bool = False) -> Listing:
    """``source`` itself when it is a file, else the regular files in the folder (also in
    its sub-folders when ``recursive``), sorted, with everything else in ``skipped``.

    Raises :class:`SourceMissing` when ``source`` leads to nothing.
    """
    try:
        mode = source.stat().st_mode
    except OSError as exc:
        raise SourceMissing(why_not_found(source, exc)) from None
    listing = Listing()
    if stat.S_ISREG(mode):
        listing.files.append(source)
    elif stat.S_ISDIR(mode):
        _scan_folder(source, recursive, listing)
        listing.files.sort()
    else:
        listing.skipped[source] = not_regular(mode)
    return listing


def _scan_folder(folder: Path, recursive: bool, listing: Listing) -> None:
    try:
        with os.scandir(folder) as entries:
            found = sorted(entries, key=lambda e: e.name)
    except OSError as exc:
        listing.skipped[folder] = f"cannot read folder: {(exc.strerror or str(exc)).lower()}"
        return
    for entry in found:
        if entry.name.startswith("."):
            continue
        path = folder / entry.name
        try:
            mode = entry.stat().st_mode  # follows symbolic links
        except OSError as exc:
            listing.skipped[path] = why_not_found(path, exc)
            continue
        if stat.S_ISREG(mode):
            listing.files.append(path)
        elif not stat.S_ISDIR(mode):
            listing.skipped[path] = not_regular(mode)
        elif not recursive:
            listing.folders_left_out += 1
        elif entry.is_symlink():  # followed, it could lead back up: a loop
            listing.skipped[path] = "symbolic link to a folder (not followed)"
        else:
            _scan_folder(path, recursive, listing)
