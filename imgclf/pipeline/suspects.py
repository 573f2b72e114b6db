"""The audit's suspects, as ``metrics/audit/label_issues.csv`` holds them: issue kinds,
columns, and which suspects ``audit.exclude`` leaves out of training.

Written by the ``audit`` stage; read by ``train`` and ``report`` (through
:mod:`~imgclf.pipeline.dataset`), which drop the excluded suspects from the train and val
sides only: the test side is never filtered, so a run with ``audit.exclude`` is scored on
exactly the test images of a run without.
"""

from __future__ import annotations

import csv
from pathlib import Path

from imgclf.pipeline.stage_outputs import require

LABEL_ISSUE = "label_issue"  # confident learning: the given label is likely wrong
CONFLICT = "near_duplicate_conflict"  # a near-duplicate of an image of another class
OUTLIER = "outlier"  # far from every other image (features)
BLANK = "blank"  # near-uniform picture (preprocess flag)
NEAR_DUPLICATE = "near_duplicate"  # a near-duplicate of another image of its class

KINDS = (LABEL_ISSUE, CONFLICT, OUTLIER, BLANK, NEAR_DUPLICATE)
FIELDS = (
    "rank",
    "raw_path",
    "path",
    "side",
    "issues",  # kinds joined by ";"
    "given_label",
    "suggested_label",
    "label_quality",  # cleanlab's self-confidence of the given label: low = likely wrong
    "outlier_score",  # cleanlab's out-of-distribution score: low = atypical
    "group",  # near-duplicate group (split's name), or empty
)
# audit.exclude -> the kinds it leaves out of train and val (never a plain near-duplicate:
# the split already keeps those on one side, and dropping one would drop its twin's label)
EXCLUDED_KINDS = {
    "none": frozenset(),
    "label_issues": frozenset({LABEL_ISSUE, CONFLICT}),
    "suspects": frozenset({LABEL_ISSUE, CONFLICT, OUTLIER, BLANK}),
}
TRAINING_SIDES = ("train", "val")


def excluded_paths(issues_csv: Path, mode: str) -> frozenset[str]:
    """Processed-image paths of the train and val suspects whose kinds ``mode`` (an
    ``audit.exclude`` value) excludes; none for ``none`` (the file is not even read)."""
    kinds = EXCLUDED_KINDS[mode]
    if not kinds:
        return frozenset()
    require(issues_csv, written_by="audit")
    with issues_csv.open(newline="", encoding="utf-8") as fh:
        return frozenset(
            row["path"]
            for row in csv.DictReader(fh)
            if row["side"] in TRAINING_SIDES and kinds.intersection(row["issues"].split(";"))
        )
