"""A raw folder with known noise, for the audit's tests and benchmark.

The bundled digits (scikit-learn, 1,797 8x8 scans drawn as 32x32 PNGs), one class a digit
(``digit_<d>/scans/``); then a share of the files *moved* into a wrong class (the label
errors the audit must find) and a share of *near-duplicate copies* added beside their
original: resized, re-encoded as JPEG and brightness-shifted (what the split must keep on
one side). Every choice comes from ``seed``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from imgclf.files import write_bytes
from imgclf.pipeline.sample import digit_png


@dataclass
class Noise:
    """What was injected, by raw path relative to the raw folder."""

    moved: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (true, given)
    copies: list[tuple[str, str]] = field(default_factory=list)  # (original, copy)


def near_copy(png: bytes, rng: np.random.Generator) -> bytes:
    """A near-duplicate of an image: scaled 0.6-1.6x, brightness x0.85-1.2, JPEG q60-90."""
    with Image.open(io.BytesIO(png)) as img:
        rgb = img.convert("RGB")
    side = max(8, round(rgb.width * rng.uniform(0.6, 1.6)))
    changed = rgb.resize((side, side), Image.Resampling.BILINEAR)
    changed = ImageEnhance.Brightness(changed).enhance(rng.uniform(0.85, 1.2))
    buf = io.BytesIO()
    changed.save(buf, format="JPEG", quality=int(rng.integers(60, 91)))
    return buf.getvalue()


def noisy_digits(
    raw: Path,
    move_fraction: float,
    copy_fraction: float,
    seed: int,
    per_digit: int | None = None,
) -> Noise:
    """Write the noisy digits into ``raw``; return what was injected."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    files: list[tuple[str, int, bytes]] = []
    seen: dict[int, int] = {}
    for index, (pixels, target) in enumerate(zip(digits.data, digits.target, strict=True)):
        digit = int(target)
        seen[digit] = seen.get(digit, 0) + 1
        if per_digit is None or seen[digit] <= per_digit:
            files.append((f"scans/{index:04d}.png", digit, digit_png(pixels)))
    noise = Noise()
    n = len(files)
    moved = set(rng.choice(n, round(n * move_fraction), replace=False).tolist())
    copied = set(rng.choice(n, round(n * copy_fraction), replace=False).tolist())
    for i, (name, digit, png) in enumerate(files):
        given = digit
        if i in moved:
            given = int(rng.choice([d for d in range(10) if d != digit]))
        rel = f"digit_{given}/{name}"
        write_bytes(raw / rel, png)
        if i in moved:
            noise.moved[rel] = (f"digit_{digit}", f"digit_{given}")
        if i in copied:
            copy_rel = f"digit_{given}/{name.removesuffix('.png')}_copy.jpg"
            write_bytes(raw / copy_rel, near_copy(png, rng))
            noise.copies.append((rel, copy_rel))
    return noise
