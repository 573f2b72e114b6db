"""Near-duplicate images: fingerprints of raw content, and the groups they form.

A fingerprint is computed from the raw bytes alone, with fixed settings (never the
``preprocess`` params), so the groups, and through them every image's split side, do not
depend on how images were preprocessed. It has two parts:

- a 64-bit perceptual hash (``imagehash``'s pHash: DCT of a 32x32 grey image): re-encoding,
  resizing and brightness changes move it by a few bits;
- a 16x16 grey thumbnail, to confirm a pHash match by the correlation of the thumbnails.

Why both (measured on the digits, 1,797 scans plus 90 resized, re-encoded and
brightness-shifted copies; ``benchmarks/bench_audit.py``, RESULTS.md "Data audit"): the
copies lie up to 8 bits from their original (median 2), but at 8 bits pHash alone links
about 1,600 pairs of *different* scans, which chain into a group of 168 images, 5 of the
groups mixing digits; requiring a thumbnail correlation of at least 0.98 as well (every
copy correlates 0.987 or more) keeps every copy with its original, the largest group at 8
images and no group mixing digits.

Pairs are searched in blocks (exact Hamming distance on all pairs, vectorised), so memory
stays bounded and progress is shown for large folders; groups are the connected components
of the confirmed pairs.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

log = logging.getLogger(__name__)

THUMB_SIDE = 16
FINGERPRINT_BYTES = 8 + THUMB_SIDE * THUMB_SIDE
DRAFT_SIDE = 128  # JPEG DCT-domain decode target: far more than pHash's 32 px needs
BLOCK_CELLS = 1 << 24  # pairs compared at once (about 150 MB of intermediate arrays)


@dataclass(frozen=True)
class Fingerprint:
    """pHash (64 bits) and a 16x16 grey thumbnail of one image."""

    phash: int
    thumb: bytes

    def to_bytes(self) -> bytes:
        """8 bytes of pHash (big-endian), then the 256 thumbnail bytes."""
        return self.phash.to_bytes(8, "big") + self.thumb

    @classmethod
    def from_bytes(cls, data: bytes) -> Fingerprint:
        """The inverse of :meth:`to_bytes`; ``ValueError`` on a wrong length."""
        if len(data) != FINGERPRINT_BYTES:
            raise ValueError(f"a fingerprint has {FINGERPRINT_BYTES} bytes, got {len(data)}")
        return cls(int.from_bytes(data[:8], "big"), data[8:])


def fingerprint(data: bytes) -> Fingerprint:
    """The fingerprint of an image file's bytes (the file must be a decodable image: call
    it after :func:`imgclf.imaging.load_rgb` accepted it). Fixed settings: first frame,
    EXIF orientation applied, transparency on white, grey."""
    import imagehash

    with Image.open(io.BytesIO(data)) as img:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        if (img.format or "").upper() in ("JPEG", "MPO"):
            img.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        factor = min(img.size) // (2 * DRAFT_SIDE)  # box average first: pHash needs 32 px
        reducible = factor > 1 and img.mode in ("L", "LA", "RGB", "RGBA")
        upright = img.reduce(factor) if reducible else img
        if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
            rgba = upright.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            upright = canvas
        grey = upright.convert("L")
    phash = int(str(imagehash.phash(grey)), 16)
    thumb = grey.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR).tobytes()
    return Fingerprint(phash, thumb)


def _unit_rows(thumbs: np.ndarray) -> np.ndarray:
    """Thumbnails (n x 256 uint8) as zero-mean unit vectors; a uniform one stays all zero,
    so it correlates with nothing (blank images are reported, never grouped)."""
    x = thumbs.astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 1e-6)


def similar_pairs(
    fingerprints: Sequence[Fingerprint], max_distance: int, min_similarity: float
) -> np.ndarray:
    """Index pairs ``(i, j)``, ``i < j``, whose pHashes differ in at most ``max_distance``
    bits and whose thumbnails correlate at least ``min_similarity`` (an ``(m, 2)`` array)."""
    n = len(fingerprints)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    hashes = np.array([f.phash for f in fingerprints], dtype=np.uint64)
    thumbs = np.frombuffer(b"".join(f.thumb for f in fingerprints), np.uint8).reshape(n, -1)
    unit = _unit_rows(thumbs)
    textured = unit.any(axis=1)  # a uniform thumbnail is all zero: it pairs with nothing
    block = max(1, BLOCK_CELLS // n)
    found: list[np.ndarray] = []
    starts = range(0, n, block)
    shown = None if len(starts) > 1 else True  # a bar only when there is more than one block
    for start in tqdm(starts, desc="near-duplicates", unit="block", disable=shown):
        stop = min(start + block, n)
        distance = np.bitwise_count(hashes[start:stop, None] ^ hashes[None, :])
        rows, cols = np.nonzero(distance <= max_distance)
        rows += start
        keep = cols > rows
        rows, cols = rows[keep], cols[keep]
        if rows.size:
            similarity = np.einsum("ij,ij->i", unit[rows], unit[cols])
            confirmed = (similarity >= min_similarity) & textured[rows] & textured[cols]
            found.append(np.stack([rows[confirmed], cols[confirmed]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """The connected component of each of ``n`` nodes linked by ``pairs`` (scipy's
    union-find), numbered from 0."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ones = np.ones(len(pairs), dtype=np.int8)
    graph = coo_matrix((ones, (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]
