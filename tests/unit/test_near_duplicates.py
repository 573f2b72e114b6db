"""Near-duplicate fingerprints (imgclf.pipeline.near_duplicates): what pairs, what does not,
and what the fingerprint ignores (container, EXIF orientation, transparency, later frames)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from PIL import Image

from imgclf.params import NearDuplicates, load_params
from imgclf.pipeline import near_duplicates
from imgclf.pipeline.near_duplicates import (
    FINGERPRINT_BYTES,
    Fingerprint,
    components,
    fingerprint,
    similar_pairs,
)
from imgclf.pipeline.sample import sample_files
from imgclf.testing import images as f
from imgclf.testing.noisy import near_copy
from imgclf.testing.project import SOURCE


@functools.cache
def settings() -> NearDuplicates:
    """The project's ``split.near_duplicates`` (params.yaml): tests never restate it."""
    return load_params(SOURCE / "params.yaml").split.near_duplicates


@functools.cache
def digits() -> tuple[bytes, ...]:
    """20 bundled digit PNGs (two of each digit)."""
    return tuple(png for _, png in sample_files(per_digit=2))


def pairs_of(fps: list[Fingerprint], max_distance: int | None = None) -> list[tuple[int, int]]:
    cfg = settings()
    distance = cfg.max_distance if max_distance is None else max_distance
    return sorted(map(tuple, similar_pairs(fps, distance, cfg.min_similarity).tolist()))


def test_a_near_copy_pairs_with_its_original_and_nothing_else():
    rng = np.random.default_rng(0)
    originals = [fingerprint(png) for png in digits()]
    copies = [fingerprint(near_copy(png, rng)) for png in digits()]
    n = len(originals)
    assert pairs_of(originals + copies) == [(i, n + i) for i in range(n)]


def test_unrelated_images_do_not_pair():
    fps = [fingerprint(f.png(1)), fingerprint(f.png(2)), *map(fingerprint, digits()[:2])]
    assert similar_pairs(fps, settings().max_distance, settings().min_similarity).shape == (0, 2)


def test_a_uniform_image_pairs_with_nothing_even_at_any_hash_distance():
    grey = f.encode(f.solid((128, 128, 128)), "PNG")
    blank = [
        fingerprint(grey),
        fingerprint(f.encode(f.solid((200, 200, 200), (20, 20)), "PNG")),
        fingerprint(near_copy(grey, np.random.default_rng(1))),
    ]
    assert blank[0].phash == blank[1].phash == blank[2].phash  # pHash alone would pair them
    black = fingerprint(f.encode(f.solid((0, 0, 0)), "JPEG"))
    fps = [*blank, black, fingerprint(digits()[0])]
    assert pairs_of(fps, max_distance=64) == []


def test_a_uniform_image_pairs_with_nothing_at_any_allowed_min_similarity():
    blank = [fingerprint(f.encode(f.solid((v, v, v)), "PNG")) for v in (90, 160)]
    assert similar_pairs(blank, settings().max_distance, 0.0).shape == (0, 2)


def test_fingerprint_bytes_round_trip_and_a_wrong_length_is_refused():
    fp = fingerprint(digits()[3])
    data = fp.to_bytes()
    assert len(data) == FINGERPRINT_BYTES == 264
    assert data[:8] == fp.phash.to_bytes(8, "big")
    assert Fingerprint.from_bytes(data) == fp
    with pytest.raises(ValueError, match=r"^a fingerprint has 264 bytes, got 263$"):
        Fingerprint.from_bytes(data[:-1])
    with pytest.raises(ValueError, match=r"^a fingerprint has 264 bytes, got 0$"):
        Fingerprint.from_bytes(b"")


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}), ("PNG", {"compress_level": 0})],
)
def test_fingerprint_does_not_depend_on_the_container(fmt, options):
    img = f.pattern(3, (40, 30))
    assert fingerprint(f.encode(img, fmt, **options)) == fingerprint(f.encode(img, "PNG"))


def test_fingerprint_applies_exif_orientation():
    img = f.pattern(3, (40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    tagged = fingerprint(f.encode(img, "PNG", exif=exif.tobytes()))
    upright = fingerprint(f.encode(img.transpose(Image.Transpose.ROTATE_270), "PNG"))
    assert tagged == upright
    assert tagged != fingerprint(f.encode(img, "PNG"))


def test_fingerprint_puts_transparency_on_white_and_reads_the_first_frame():
    clear = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    clear.paste((0, 0, 0, 255), (0, 0, 10, 20))
    on_white = Image.new("RGB", (20, 20), (255, 255, 255))
    on_white.paste((0, 0, 0), (0, 0, 10, 20))
    assert fingerprint(f.encode(clear, "PNG")) == fingerprint(f.encode(on_white, "PNG"))
    first, second = (f.pattern(seed, (24, 24)).convert("P") for seed in (1, 2))
    animated = f.encode(first, "GIF", save_all=True, append_images=[second], duration=100)
    assert fingerprint(animated) == fingerprint(f.encode(first, "GIF"))
    assert fingerprint(animated) != fingerprint(f.encode(second, "GIF"))


def test_pairs_are_found_across_blocks(monkeypatch):
    rng = np.random.default_rng(2)
    originals = [fingerprint(png) for png in digits()[:6]]
    fps = originals + [fingerprint(near_copy(png, rng)) for png in digits()[:6]]
    whole = pairs_of(fps)
    assert whole == [(i, 6 + i) for i in range(6)]
    monkeypatch.setattr(near_duplicates, "BLOCK_CELLS", 3 * len(fps))  # blocks of 3 rows
    assert pairs_of(fps) == whole


def test_fewer_than_two_fingerprints_have_no_pairs():
    one = [fingerprint(digits()[0])]
    assert similar_pairs(one, 64, -1.0).shape == (0, 2)
    assert similar_pairs([], 64, -1.0).shape == (0, 2)


def test_components_join_a_chain_transitively():
    chain = np.array([[0, 1], [1, 2]])  # A~B, B~C: A and C are one group without a pair
    assert components(4, chain).tolist() == [0, 0, 0, 1]
    assert components(3, np.zeros((0, 2), dtype=np.int64)).tolist() == [0, 1, 2]
    assert components(5, np.array([[3, 4], [0, 2]])).tolist() == [0, 1, 0, 2, 2]
