"""The split stage: stable, stratified, leak-free, keyed on raw content."""

from __future__ import annotations

import csv
import functools
import hashlib
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from imgclf.config import StageError
from imgclf.params import NearDuplicates, load_params
from imgclf.pipeline.near_duplicates import Fingerprint, fingerprint
from imgclf.pipeline.preprocess import Outcome, RawFile, preprocess, write_fingerprints
from imgclf.pipeline.sample import sample_files
from imgclf.pipeline.split import (
    Item,
    assign,
    check_counts,
    count_by_class,
    group_items,
    group_stats,
    groups_of,
    read_fingerprints,
    read_manifest,
    side_of,
)
from imgclf.testing import images as f
from imgclf.testing.noisy import near_copy
from imgclf.testing.project import SOURCE


def items(n: int, label: str, start: int = 0) -> list[Item]:
    out = []
    for i in range(start, start + n):
        sha = hashlib.sha256(f"{label}-{i}".encode()).hexdigest()
        out.append(Item(f"data/processed/{label}/{i}.jpg", label, sha))
    return out


def sides_by_path(sides: dict[str, list[Item]]) -> dict[str, str]:
    return {i.path: side for side, group in sides.items() for i in group}


def test_adding_and_removing_images_never_moves_others():
    base = items(600, "a") + items(300, "b")
    before = sides_by_path(assign(base, 7, 0.3, 0.15))
    grown = base[100:] + items(400, "a", start=1000)  # drop 100, add 400
    after = sides_by_path(assign(grown, 7, 0.3, 0.15))
    assert all(after[p] == before[p] for p in after if p in before)


def test_identical_images_land_on_the_same_side():
    sha = hashlib.sha256(b"same").hexdigest()
    twins = [Item(f"data/processed/a/{i}.jpg", "a", sha) for i in range(20)]
    sides = assign(twins + items(50, "a"), 1, 0.5, 0.2)
    assert len({s for s, g in sides.items() for i in g if i.sha256 == sha}) == 1


@pytest.mark.parametrize("test_size", [0.1, 0.3, 0.5])
def test_each_class_matches_test_size_closely(test_size):
    counts = count_by_class(assign(items(4000, "big") + items(1500, "small"), 3, test_size, 0.2))
    for label, n in (("big", 4000), ("small", 1500)):
        share = counts["test"][label] / n
        sigma = (test_size * (1 - test_size) / n) ** 0.5
        assert abs(share - test_size) < 4 * sigma, (label, share)
        kept = n - counts["test"][label]
        val_share = counts["val"][label] / kept
        assert abs(val_share - 0.2) < 4 * (0.2 * 0.8 / kept) ** 0.5, (label, val_share)


def test_seed_changes_the_split_and_is_deterministic():
    data = items(500, "a")
    assert assign(data, 1, 0.3, 0.1) == assign(list(reversed(data)), 1, 0.3, 0.1)
    assert assign(data, 1, 0.3, 0.1) != assign(data, 2, 0.3, 0.1)


def test_side_of_respects_bounds():
    sha = hashlib.sha256(b"x").hexdigest()
    assert side_of(sha, 0, 0.999999, 0.0) == "test"
    assert side_of(sha, 0, 1e-9, 0.0) == "train"
    assert side_of(sha, 0, 1e-9, 0.999999) == "val"


@pytest.mark.parametrize(("test_size", "val_size"), [(0, 0.1), (1, 0.1), (0.3, 1.0), (0.3, -0.1)])
def test_bad_fractions_are_refused(test_size, val_size):
    with pytest.raises(ValueError, match="split"):
        assign(items(10, "a"), 0, test_size, val_size)


def test_counts_are_checked():
    one_class = count_by_class(assign(items(50, "a"), 0, 0.3, 0.1))
    with pytest.raises(StageError, match="at least two classes"):
        check_counts(one_class, 0.3, 0.1)
    counts = {"train": {"a": 10, "b": 4}, "val": {"a": 1, "b": 1}, "test": {"a": 3, "b": 1}}
    check_counts(counts, 0.3, 0.15)  # two classes, each on every side: no error


def test_a_class_missing_from_a_side_fails_naming_class_counts_and_need():
    counts = count_by_class(assign(items(60, "a") + items(1, "tiny"), 0, 0.3, 0.15))
    with pytest.raises(StageError) as info:
        check_counts(counts, 0.3, 0.15)
    have = {side: counts[side]["tiny"] for side in ("train", "val", "test")}
    assert str(info.value) == (
        f"class 'tiny' has 1 usable image(s) ({have['train']} train, {have['val']} val, "
        f"{have['test']} test): every class needs at least 1 in train, val and test, about "
        "10 images with split.test_size 0.3 and split.val_size 0.15; add images or remove "
        "the class"
    )


def raw_folder(root: Path) -> Path:
    """A few dozen raw files of several kinds in two classes."""
    raw = root / "raw"
    for i in range(24):
        f.write(raw / "safe" / "photos" / f"p{i}.jpg", f.jpeg(i, size=(120, 80)))
        f.write(raw / "sensitive" / "scans" / f"s{i}.png", f.png(100 + i, size=(60, 90)))
    f.write(raw / "sensitive" / "scans" / "alpha.png", f.rgba_png(128))
    f.write(raw / "safe" / "photos" / "cmyk.jpg", f.cmyk_jpeg())
    return raw


def test_membership_does_not_depend_on_preprocess_params(tmp_path):
    """Changing size, jpeg_quality or mode changes every processed byte but moves no raw
    file between train, val and test."""
    raw = raw_folder(tmp_path)
    base = f.preprocess_options(size=32, mode="pad", jpeg_quality=95)
    variants = {
        "base": base,
        "size": replace(base, size=48),
        "quality": replace(base, jpeg_quality=60),
        "mode": replace(base, mode="crop"),
    }
    memberships, processed_bytes = {}, {}
    for name, options in variants.items():
        out = tmp_path / name
        outcomes, _ = preprocess(
            raw, out / "processed", out / "invalid", out / "manifest.csv", tmp_path / "cache",
            options, 1, out,
        )  # fmt: skip
        raw_of = {f"processed/{o.output}": o.raw.rel for o in outcomes if o.status == "processed"}
        sides = assign(read_manifest(out / "manifest.csv", "processed/"), 5, 0.3, 0.2)
        memberships[name] = {s: sorted(raw_of[i.path] for i in g) for s, g in sides.items()}
        processed_bytes[name] = {
            p: (out / p).read_bytes() for p in sorted(raw_of) if (out / p).is_file()
        }
    assert sum(len(group) for group in memberships["base"].values()) == 50  # every raw file
    assert all(memberships["base"].values()), "every side holds images"
    for name in ("size", "quality", "mode"):
        assert memberships[name] == memberships["base"], name
        assert processed_bytes[name] != processed_bytes["base"], name


# --- near-duplicate groups ---------------------------------------------------------------


@functools.cache
def near_duplicate_settings() -> NearDuplicates:
    """The project's ``split.near_duplicates`` (params.yaml)."""
    return load_params(SOURCE / "params.yaml").split.near_duplicates


@functools.cache
def digit_files(per_digit: int) -> tuple[tuple[str, bytes], ...]:
    """The bundled digits (``per_digit`` of each) and, after them, a near copy of each
    (resized, brightened, re-encoded as JPEG; the same bytes for any ``per_digit``):
    ``(processed path, raw bytes)``."""
    originals = list(sample_files(per_digit=per_digit))
    copies = [
        (rel.replace(".png", "_copy.jpg"), near_copy(png, np.random.default_rng(zlib.crc32(png))))
        for rel, png in originals
    ]
    return tuple((f"data/processed/{rel}", data) for rel, data in originals + copies)


def digit_items(per_digit: int) -> tuple[list[Item], dict[str, Fingerprint]]:
    """Items of :func:`digit_files` (class = digit folder) and their fingerprints."""
    found, fps = [], {}
    for path, data in digit_files(per_digit):
        sha = hashlib.sha256(data).hexdigest()
        found.append(Item(path, path.split("/")[3], sha))
        fps[sha] = fingerprint(data)
    return found, fps


def copy_pairs(found: list[Item]) -> list[tuple[Item, Item]]:
    by_path = {i.path: i for i in found}
    return [(by_path[i.path.replace("_copy.jpg", ".png")], i) for i in found if "_copy" in i.path]


def test_near_copies_land_on_their_originals_side_for_every_seed():
    found, fps = digit_items(2)
    grouped = group_items(found, fps, near_duplicate_settings())
    pairs = copy_pairs(grouped)
    assert len(pairs) == 20
    for seed in range(20):
        side = sides_by_path(assign(grouped, seed, 0.3, 0.15))
        assert [(a.path, side[b.path]) for a, b in pairs] == [
            (a.path, side[a.path]) for a, _ in pairs
        ], seed
    # the guard: keyed on their own hashes, pairs do split (the test above can fail)
    apart = sides_by_path(assign(found, 0, 0.3, 0.15))
    assert [a.path for a, b in copy_pairs(found) if apart[a.path] != apart[b.path]] != []


def test_unrelated_images_added_later_move_no_image_and_rename_no_group():
    settings = near_duplicate_settings()
    few, few_fps = digit_items(2)
    many, many_fps = digit_items(4)  # 20 more digits and their copies
    before = group_items(few, few_fps, settings)
    after = group_items(many, many_fps, settings)
    assert {i.path for i in few} < {i.path for i in many}
    after_group = {i.path: i.group for i in after}
    assert {i.path: i.group for i in before} == {i.path: after_group[i.path] for i in before}
    for seed in (0, 7):
        old, new = sides_by_path(assign(before, seed, 0.3, 0.15)), assign(after, seed, 0.3, 0.15)
        assert old == {p: s for p, s in sides_by_path(new).items() if p in old}


def test_a_group_is_named_by_its_smallest_sha_and_a_lone_image_by_its_own():
    found, fps = digit_items(2)
    grouped = {i.path: i for i in group_items(found, fps, near_duplicate_settings())}
    for original, copy in copy_pairs(found):
        smallest = min(original.sha256, copy.sha256)
        assert (grouped[original.path].group, grouped[copy.path].group) == (smallest, smallest)
        assert grouped[original.path].key == smallest
    lone = Item("data/processed/x/lone.jpg", "x", hashlib.sha256(b"lone").hexdigest())
    fps[lone.sha256] = fingerprint(f.png(99))
    grouped = group_items([*found, lone], fps, near_duplicate_settings())
    assert [i.group for i in grouped if i.path == lone.path] == [lone.sha256]


def chained_fingerprints() -> dict[str, Fingerprint]:
    """Three fingerprints A ~ B ~ C (4 pHash bits apart each), A and C 8 bits apart, with
    one shared (non-uniform) thumbnail."""
    thumb = bytes(range(256))
    return {
        "c" * 64: Fingerprint(0, thumb),
        "a" * 64: Fingerprint(0b1111, thumb),
        "b" * 64: Fingerprint(0b1111_1111, thumb),
    }


def test_groups_join_a_chain_transitively():
    fps = chained_fingerprints()
    found = [Item(f"data/processed/k/{sha[0]}.jpg", "k", sha) for sha in fps]
    grouped = group_items(found, fps, NearDuplicates(max_distance=4, min_similarity=0.97))
    assert [i.group for i in grouped] == ["a" * 64] * 3
    apart = group_items(found, fps, NearDuplicates(max_distance=3, min_similarity=0.97))
    assert [i.group for i in apart] == [i.sha256 for i in found]


def test_without_near_duplicates_only_identical_content_is_grouped():
    found, _ = digit_items(2)
    twin = replace(found[0], path="data/processed/digit_0/twin.jpg")
    off = NearDuplicates(max_distance=None, min_similarity=near_duplicate_settings().min_similarity)
    grouped = group_items([*found, twin], {}, off)  # no fingerprint needed
    assert [i.group for i in grouped] == [i.sha256 for i in [*found, twin]]
    assert list(groups_of(grouped)) == [found[0].sha256]
    assert [i.path for i in groups_of(grouped)[found[0].sha256]] == sorted(
        [found[0].path, twin.path]
    )


def test_a_missing_fingerprint_is_a_stage_error_naming_the_stage():
    found, fps = digit_items(2)
    gone = found[5].sha256
    del fps[gone]
    with pytest.raises(
        StageError,
        match=(
            rf"^1 processed image\(s\) have no fingerprint in fingerprints\.csv "
            rf"\(e\.g\. {gone[:12]}\): rerun the preprocess stage$"
        ),
    ):
        group_items(found, fps, near_duplicate_settings())


def test_group_stats_counts_groups_images_and_label_conflicts():
    def item(name: str, label: str, group: str) -> Item:
        return Item(f"data/processed/{label}/{name}.jpg", label, f"sha-{name}", group)

    found = [
        item("1", "cat", "g1"),
        item("2", "cat", "g1"),
        item("3", "dog", "g1"),  # g1 spans two classes: a conflict of 3 images
        item("4", "dog", "g2"),
        item("5", "dog", "g2"),
        item("6", "cat", "g3"),
        item("7", "dog", "g3"),  # g3: another conflict, of 2
        item("8", "cat", "g4"),
        item("9", "cat", "g4"),
        item("10", "cat", "g4"),
        item("11", "cat", "g4"),  # the largest, one class
        item("12", "dog", ""),  # no group: its own hash, alone
        item("13", "cat", "sha-13"),  # named by its own hash, alone
    ]
    groups = groups_of(found)
    assert list(groups) == ["g1", "g2", "g3", "g4"]
    assert [i.path for i in groups["g1"]] == [
        "data/processed/cat/1.jpg",
        "data/processed/cat/2.jpg",
        "data/processed/dog/3.jpg",
    ]
    assert group_stats(groups) == {
        "groups": 4,
        "images": 11,
        "largest": 4,
        "cross_class_groups": 2,
        "cross_class_images": 5,
    }
    assert group_stats({}) == {
        "groups": 0,
        "images": 0,
        "largest": 0,
        "cross_class_groups": 0,
        "cross_class_images": 0,
    }


def test_read_fingerprints_reads_what_preprocess_writes(tmp_path: Path):
    _, fps = digit_items(2)
    shas = sorted(fps)[:3]
    outcomes = [
        Outcome(RawFile("a/s/2.png", "a", "s"), shas[2], "processed", "a/s__2.jpg", ""),
        Outcome(RawFile("a/s/0.png", "a", "s"), shas[0], "processed", "a/s__0.jpg", ""),
        Outcome(RawFile("b/s/0.png", "b", "s"), shas[0], "processed", "b/s__0.jpg", ""),  # twin
        Outcome(RawFile("a/s/1.png", "a", "s"), shas[1], "invalid", "a/s__1.png", "corrupt"),
        Outcome(RawFile("a/s/x.png", "a", "s"), "f" * 64, "excluded", "", "decided"),
    ]
    path = tmp_path / "fingerprints.csv"
    write_fingerprints(outcomes, {sha: fps[sha].to_bytes() for sha in shas}, path)
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["sha256", "phash", "thumb"]
    assert [r[0] for r in rows[1:]] == [shas[0], shas[2]]  # processed only, sorted, once
    assert rows[1][1:] == [f"{fps[shas[0]].phash:016x}", fps[shas[0]].thumb.hex()]
    assert read_fingerprints(path) == {shas[0]: fps[shas[0]], shas[2]: fps[shas[2]]}


def test_read_fingerprints_without_the_file_names_the_stage(tmp_path: Path):
    with pytest.raises(StageError, match=r"fingerprints\.csv not found: run the preprocess stage"):
        read_fingerprints(tmp_path / "fingerprints.csv")
