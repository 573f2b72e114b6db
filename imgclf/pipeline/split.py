"""Stage ``split``: stable, stratified train / val / test file lists, near-duplicates kept
together.

Images whose raw content is identical or a near-duplicate (pHash within
``split.near_duplicates.max_distance`` bits and thumbnails correlating at least
``min_similarity``, from ``data/fingerprints.csv``; see
:mod:`~imgclf.pipeline.near_duplicates`) form one *group*, named by the smallest raw
SHA-256 among its members. A group's side depends only on that name and the split seed
(``split.seed``, else ``base.seed``), never on how images were preprocessed, so experiments
on ``preprocess`` params are scored on the same test images: ``u = H(seed, "test", group)``
uniform in [0, 1) puts it in test when ``u < test_size``; otherwise
``H(seed, "val", group) < val_size`` carves it into val (the fraction of train held out for
early stopping and for choosing the operating threshold). So:

- a resized, re-encoded or brightened copy always lands on its original's side (no
  train/test leakage); an image with no near-duplicate is its own group, named by its own
  hash;
- adding or removing unrelated images never moves an existing image between sides;
- the test share of each class is ``test_size`` up to the binomial noise
  ``sqrt(p(1-p)/n)`` (about 2 points for 500 images; more when groups are large).

Near-duplicates under two different classes are a label conflict: kept (on one side) and
reported, in the log, in ``metrics/split.json`` and in ``data/split/groups.csv`` (every
image of a group of two or more), which the ``audit`` stage lists for review.

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
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from imgclf.config import PATHS, StageError, load_params, setup_logging, stage_main
from imgclf.files import write_csv, write_json
from imgclf.params import NearDuplicates, min_images_per_class
from imgclf.pipeline.near_duplicates import Fingerprint, components, similar_pairs
from imgclf.pipeline.stage_outputs import SIDES, require

log = logging.getLogger(__name__)

LIST_FIELDS = ("path", "label", "sha256")
GROUP_FIELDS = ("group", "path", "label", "side")


@dataclass(frozen=True)
class Item:
    """One processed image: path (relative to the project root), class label, raw content
    hash, and the name of its near-duplicate group (its own hash when it has none)."""

    path: str
    label: str
    sha256: str
    group: str = ""

    @property
    def key(self) -> str:
        """What decides the side: the group's name."""
        return self.group or self.sha256


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
        sides[side_of(item.key, seed, test_size, val_size)].append(item)
    return sides


def group_items(
    items: list[Item], fingerprints: dict[str, Fingerprint], settings: NearDuplicates
) -> list[Item]:
    """``items`` with their group names: identical content, and near-duplicate content by
    ``settings`` (off when ``max_distance`` is None), joined transitively; a group is named
    by the smallest SHA-256 in it."""
    shas = sorted({i.sha256 for i in items})
    name = {sha: sha for sha in shas}
    if settings.max_distance is not None and len(shas) > 1:
        missing = [sha for sha in shas if sha not in fingerprints]
        if missing:
            raise StageError(
                f"{len(missing)} processed image(s) have no fingerprint in "
                f"{PATHS.fingerprints.name} (e.g. {missing[0][:12]}): rerun the preprocess stage"
            )
        found = [fingerprints[sha] for sha in shas]
        pairs = similar_pairs(found, settings.max_distance, settings.min_similarity)
        component = components(len(shas), pairs)
        first: dict[int, str] = {}
        for sha, c in zip(shas, component, strict=True):  # shas sorted: first is smallest
            first.setdefault(int(c), sha)
        name = {sha: first[int(c)] for sha, c in zip(shas, component, strict=True)}
    return [replace(i, group=name[i.sha256]) for i in items]


def groups_of(items: Iterable[Item]) -> dict[str, list[Item]]:
    """Groups of two or more images, by name, members sorted by path."""
    members: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        members[item.key].append(item)
    return {g: sorted(m, key=lambda i: i.path) for g, m in sorted(members.items()) if len(m) > 1}


def group_stats(groups: dict[str, list[Item]]) -> dict[str, Any]:
    """The ``near_duplicates`` entry of ``metrics/split.json``: groups of two or more images
    (identical or near-duplicate content), their images, the largest, and those spanning
    classes (label conflicts)."""
    conflicts = [m for m in groups.values() if len({i.label for i in m}) > 1]
    return {
        "groups": len(groups),
        "images": sum(len(m) for m in groups.values()),
        "largest": max((len(m) for m in groups.values()), default=0),
        "cross_class_groups": len(conflicts),
        "cross_class_images": sum(len(m) for m in conflicts),
    }


def read_fingerprints(path: Path) -> dict[str, Fingerprint]:
    """``data/fingerprints.csv`` by content hash."""
    require(path, written_by="preprocess")
    with path.open(newline="", encoding="utf-8") as fh:
        return {
            row["sha256"]: Fingerprint(int(row["phash"], 16), bytes.fromhex(row["thumb"]))
            for row in csv.DictReader(fh)
        }


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


def log_groups(stats: dict[str, Any], groups: dict[str, list[Item]], examples: int = 3) -> None:
    """One line on the groups; a warning naming the first cross-class groups."""
    log.info(
        "near-duplicates: %d group(s) of %d images kept on one side each (largest %d)",
        stats["groups"], stats["images"], stats["largest"],
    )  # fmt: skip
    conflicts = [m for m in groups.values() if len({i.label for i in m}) > 1]
    if conflicts:
        shown = "; ".join(
            " ~ ".join(f"{i.path} ({i.label})" for i in m[:3]) for m in conflicts[:examples]
        )
        log.warning(
            "%d near-duplicate group(s) span two classes (label conflicts, listed in %s and "
            "by the audit stage): %s",
            len(conflicts), "data/split/groups.csv", shown,
        )  # fmt: skip


@stage_main
def main() -> None:
    params = load_params()
    setup_logging(params.base.log_level)
    seed, cfg = params.split_seed, params.split
    prefix = f"{PATHS.processed.relative_to(PATHS.root).as_posix()}/"
    items = read_manifest(PATHS.manifest, prefix)
    items = group_items(items, read_fingerprints(PATHS.fingerprints), cfg.near_duplicates)
    sides = assign(items, seed, cfg.test_size, cfg.val_size)
    counts = count_by_class(sides)
    log.info(
        "split (seed %d, test_size %s, val_size %s):\n%s",
        seed, cfg.test_size, cfg.val_size, format_counts(counts),
    )  # fmt: skip
    check_counts(counts, cfg.test_size, cfg.val_size)
    side_of_path = {i.path: side for side, members in sides.items() for i in members}
    groups = groups_of(items)
    stats = group_stats(groups)
    log_groups(stats, groups)
    for side, members in sides.items():
        rows = ((i.path, i.label, i.sha256) for i in members)
        write_csv(PATHS.split_list(side), LIST_FIELDS, rows)
    write_csv(
        PATHS.split_dir / "groups.csv",
        GROUP_FIELDS,
        ((g, i.path, i.label, side_of_path[i.path]) for g, m in groups.items() for i in m),
    )
    write_json(PATHS.metrics / "split.json", {**counts, "near_duplicates": stats})


if __name__ == "__main__":
    sys.exit(main())
