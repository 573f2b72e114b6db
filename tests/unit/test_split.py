"""The split stage: stable, stratified, leak-free, keyed on raw content."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from imgclf.config import StageError
from imgclf.pipeline.preprocess import preprocess
from imgclf.pipeline.split import Item, assign, check_counts, count_by_class, read_manifest, side_of
from imgclf.testing import images as f


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
