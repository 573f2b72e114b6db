"""``data/labels_override.csv``: the user's decisions on raw images, applied without ever
touching ``data/raw``.

One row per decision, ``raw_path,action`` (``raw_path`` exactly as in
``data/manifest.csv`` and ``metrics/audit/label_issues.csv``)::

    raw_path,action
    data/raw/safe/digit_1/digit_1_0042.png,relabel:sensitive
    data/raw/sensitive/digit_8/digit_8_0007.png,exclude

``relabel:<class>`` moves the image to another existing class; ``exclude`` leaves it out of
every split. Blank lines and lines starting with ``#`` are comments. The file is versioned
with git and is a dependency of ``preprocess``, so a decision reruns exactly the stages it
affects and ``dvc exp`` runs compare with and without it. A file that cannot be applied
(an unknown column, action, class or raw path, a path listed twice) stops the stage with
one line naming the file, the line and what is wrong; nothing is written.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from imgclf.config import StageError

COLUMNS = ("raw_path", "action")
EXCLUDE = "exclude"
RELABEL = "relabel:"


class OverrideError(StageError):
    """A decisions file that cannot be applied (one line: file, line, what is wrong)."""


@dataclass(frozen=True)
class Override:
    """One decision: ``label`` is the new class, or None to exclude the image."""

    line: int
    label: str | None

    @property
    def reason(self) -> str:
        """The manifest's reason for an image this decision applies to."""
        return f"labels_override.csv line {self.line}: " + (
            "excluded" if self.label is None else f"relabelled {self.label}"
        )


def parse_overrides(text: str, source: str, classes: set[str]) -> dict[str, Override]:
    """The decisions in ``text`` by raw path (``source`` names the file in errors); a
    relabel must name one of ``classes``."""
    lines = [
        (n, line)
        for n, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        return {}
    header = next(csv.reader([lines[0][1]]))
    if tuple(h.strip() for h in header) != COLUMNS:
        raise OverrideError(
            f"{source} line {lines[0][0]}: the header must be {','.join(COLUMNS)}, got "
            f"{lines[0][1].strip()!r}"
        )
    decisions: dict[str, Override] = {}
    for n, line in lines[1:]:
        row = next(csv.reader(io.StringIO(line)))
        if len(row) != len(COLUMNS):
            raise OverrideError(f"{source} line {n}: expected raw_path,action, got {line!r}")
        path, action = (cell.strip() for cell in row)
        if path in decisions:
            raise OverrideError(
                f"{source} line {n}: {path} is already decided on line {decisions[path].line}"
            )
        decisions[path] = Override(n, _label_of(action, f"{source} line {n}", classes))
    return decisions


def _label_of(action: str, where: str, classes: set[str]) -> str | None:
    if action == EXCLUDE:
        return None
    if action.startswith(RELABEL):
        label = action.removeprefix(RELABEL)
        if label not in classes:
            raise OverrideError(
                f"{where}: relabel:{label} names no class (classes: {', '.join(sorted(classes))})"
            )
        return label
    raise OverrideError(f"{where}: unknown action {action!r} (exclude or relabel:<class>)")


def read_overrides(path: Path, classes: set[str]) -> dict[str, Override]:
    """The decisions of the file at ``path``; none when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return {}
    return parse_overrides(text, path.name, classes)


def check_paths(decisions: dict[str, Override], known: set[str], source: str) -> None:
    """Every decided raw path must be a file of the raw folder (``known``)."""
    missing = sorted((d.line, p) for p, d in decisions.items() if p not in known)
    if missing:
        line, path = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise OverrideError(
            f"{source} line {line}: {path} is not a file under the raw folder{more}; fix the "
            "path (as in data/manifest.csv) or delete the line"
        )
