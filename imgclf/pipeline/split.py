"""Stage ``split``: stable, stratified train / val / test file lists.

An image's side depends only on the SHA-256 of its *raw* content (from
``data/manifest.csv``) and the split seed (``split.seed``, else ``base.seed``), never on how
it was preprocessed, so experiments on ``preprocess`` params are scored on the same test
images: ``u = H(seed, "test", sha)`` uniform in [0, 1) puts it in test when ``u < test_size``;
otherwise ``H(seed, "val", sha) < val_size`` carves it into val (the fraction of train
held out for early stopping and for choosing the operating threshold). So:

- adding or removing other images never moves an existing image between sides;
- identical images always land on the same side (no train/test leakage);
- each class is split on its own (stratified), and its test share is ``test_size`` up to
  the binomial noise ``sqrt(p(1-p)/n)`` (about 2 points for 500 images).

Every class needs at least one image on each side (train fits, val drives early stopping
and the threshold, test judges); a class without fails the stage, naming the class, its
counts and what it needs. Images are not re-encoded: the lists name files under
``data/processed``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from imgclf.config import PATHS, StageError, load_params, setup_logging, stage_main
from imgclf.files import write_csv, write_json
from imgclf.params import min_images_per_class
from imgclf.pipeline.stage_outputs import require

log = logging.getLogger(__name__)

SIDES = ("train", "val", "test")
LIST_FIELDS = ("path", "label", "sha256")


@dataclass(frozen=True)
class Item:
    """One processed image: path (relative to the project root), class label, raw content
    hash."""

    path: str
    label: str
    sha256: str


def unit_hash(seed: int, salt: str, sha: str) -> float:
    """Deterministic number in [0, 1) from the seed, a salt and a content hash."""
    h = hashlib.sha256(f"{seed}:{salt}:{sha}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def side_of(sha: str, seed: int, test_size: float, val_size: float) -> str:
    """The side (``train``, ``val`` or ``test``) of an image, from its identity alone."""
    if unit_hash(seed, "test", sha) < test_size:
        return "test"
    return "val" if unit_hash(seed, "val", sha) < val_size else "train"


def check_fractions(test_size: float, val_size: float) -> None:
    """Raise ValueError unless ``test_size`` is in (0, 1) and ``val_size`` in [0, 1)."""
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"split.test_size must be between 0 and 1 (exclusive), got {test_size}")
    if not 0.0 <= val_size < 1.0:
        raise ValueError(f"split.val_size must be in [0, 1), got {val_size}")


def assign(
    items: list[Item], seed: int, test_size: float, val_size: float
) -> dict[str, list[Item]]:
    """Split ``items`` into sides (each list sorted by path)."""
    check_fractions(test_size, val_size)
    sides: dict[str, list[Item]] = {side: [] for side in SIDES}
    for item in sorted(items, key=lambda i: i.path):
        sides[side_of(item.sha256, seed, test_size, val_size)].append(item)
    return sides


def count_by_class(sides: dict[str, list[Item]]) -> dict[str, dict[str, int]]:
    """``{side: {class: n}}`` with every class present on every side (zeros included)."""
    labels = sorted({i.label for items in sides.values() for i in items})
    counts = {side: Counter(i.label for i in items) for side, items in sides.items()}
    return {side: {label: counts[side][label] for label in labels} for side in sides}


def check_counts(counts: dict[str, dict[str, int]], test_size: float, val_size: float) -> None:
    """Raise :class:`StageError` unless there are two classes, each on every side."""
    labels = list(counts["train"])
    if len(labels) < 2:
        raise StageError(f"need at least two classes with usable images, found {labels}")
    need = min_images_per_class(test_size, val_size)
    for label in labels:
        have = {side: counts[side][label] for side in SIDES}
        if min(have.values()) == 0:
            raise StageError(
                f"class {label!r} has {sum(have.values())} usable image(s) "
                f"({', '.join(f'{n} {s}' for s, n in have.items())}): every class needs at "
                f"least 1 in train, val and test, about {need} images with split.test_size "
                f"{test_size} and split.val_size {val_size}; add images or remove the class"
            )


def read_manifest(manifest: Path, processed_prefix: str) -> list[Item]:
    """Every processed image of ``data/manifest.csv`` with its raw content hash."""
    require(manifest, written_by="preprocess")
    with manifest.open(newline="", encoding="utf-8") as fh:
        return [
            Item(row["output_path"], row["class"], row["sha256"])
            for row in csv.DictReader(fh)
            if row["status"] == "processed" and row["output_path"].startswith(processed_prefix)
        ]


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    """A small table of per-class counts for each side."""
    labels = list(counts["train"])
    width = max(len(label) for label in [*labels, "class"])
    lines = [f"{'class':<{width}} " + " ".join(f"{s:>7}" for s in SIDES)]
    for label in labels:
        lines.append(f"{label:<{width}} " + " ".join(f"{counts[s][label]:>7}" for s in SIDES))
    totals = [sum(counts[s].values()) for s in SIDES]
    lines.append(f"{'total':<{width}} " + " ".join(f"{t:>7}" for t in totals))
    return "\n".join(lines)


@stage_main
def main() -> None:
    params = load_params()
    setup_logging(params.base.log_level)
    seed, cfg = params.split_seed, params.split
    prefix = f"{PATHS.processed.relative_to(PATHS.root).as_posix()}/"
    sides = assign(read_manifest(PATHS.manifest, prefix), seed, cfg.test_size, cfg.val_size)
    counts = count_by_class(sides)
    log.info(
        "split (seed %d, test_size %s, val_size %s):\n%s",
        seed, cfg.test_size, cfg.val_size, format_counts(counts),
    )  # fmt: skip
    check_counts(counts, cfg.test_size, cfg.val_size)
    for side, items in sides.items():
        write_csv(PATHS.split_list(side), LIST_FIELDS, ((i.path, i.label, i.sha256) for i in items))
    write_json(PATHS.metrics / "split.json", counts)


if __name__ == "__main__":
    sys.exit(main())
