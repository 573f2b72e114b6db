"""Real photos for tests and benchmarks: Fashion-MNIST, as Debian installs it.

Debian's package ``dataset-fashion-mnist`` puts Zalando's Fashion-MNIST (70,000 real 28x28
grey product photos, 10 classes) in ``/usr/share/datasets/fashion-mnist/`` as gzipped IDX
files; nothing is downloaded at run time. :func:`read_idx` parses an IDX file,
:func:`load_fashion` one side of the set, and :func:`write_shape` writes a raw folder
(``<raw>/<class>/<subclass>/*.png``) in one of the :data:`SHAPES` users bring: few or many
positives, ten classes, a 1:20 imbalance, flipped labels. Every choice comes from ``seed``;
the images are drawn from the ``train`` side (6,000 a class).
"""

from __future__ import annotations

import functools
import gzip
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.files import write_bytes

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
# Fashion-MNIST's labels 0-9, as class folder names
FASHION_CLASSES = (
    "tshirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
# the hardest class: mistaken for T-shirts/tops, pullovers and coats
POSITIVE_SOURCE = "shirt"
SUBCLASS = "fashion_mnist"  # the one subclass of each class of the ten-class shapes
IDX_UINT8 = 0x08  # the only IDX element type Fashion-MNIST uses


class MissingDataError(FileNotFoundError):
    """Fashion-MNIST's files are not installed."""


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped when its name ends in ``.gz``) as a read-only uint8 array.

    The header is two zero bytes, the element type (0x08: unsigned byte), the number of
    dimensions, then each dimension as a big-endian uint32; the elements follow.
    """
    raw = Path(path).read_bytes()
    data = gzip.decompress(raw) if str(path).endswith(".gz") else raw
    if len(data) < 4 or data[:2] != b"\0\0":
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != IDX_UINT8:
        raise ValueError(f"{path}: IDX element type {data[2]:#04x}, only 0x08 (uint8) is read")
    ndim = data[3]
    start = 4 + 4 * ndim
    if ndim == 0 or len(data) < start:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - start != math.prod(dims):
        raise ValueError(
            f"{path}: IDX header says {dims} ({math.prod(dims)} bytes), "
            f"the file holds {len(data) - start}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


@functools.lru_cache(maxsize=4)
def load_fashion(side: str = "train", root: Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's ``side`` (``train``: 60,000, ``t10k``: 10,000) as (images N x 28 x
    28, labels N), read-only; :class:`MissingDataError` naming the Debian package when
    the files are not there."""
    images = Path(root) / f"{side}-images-idx3-ubyte.gz"
    labels = Path(root) / f"{side}-labels-idx1-ubyte.gz"
    missing = [p.name for p in (images, labels) if not p.is_file()]
    if missing:
        raise MissingDataError(
            f"Fashion-MNIST is not installed ({', '.join(missing)} not in {root}): install "
            f"Debian's package {DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE})"
        )
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{root}: {side} images {x.shape} do not match labels {y.shape}")
    return x, y


@dataclass(frozen=True)
class Part:
    """``count`` images of Fashion class ``source`` in ``<cls>/<subclass>/``."""

    cls: str
    subclass: str
    source: str
    count: int


@dataclass(frozen=True)
class Shape:
    """A raw folder users bring: its parts, the class the threshold is for, label noise."""

    name: str
    parts: tuple[Part, ...]
    positive_class: str
    flip_fraction: float = 0.0


def _spread(total: int, n: int) -> list[int]:
    """``total`` split into ``n`` counts differing by at most one."""
    return [total // n + (i < total % n) for i in range(n)]


def _binary(positives: int, negatives: int) -> tuple[Part, ...]:
    """``sensitive`` = shirts, ``safe`` = the nine other classes, one subclass each."""
    others = [c for c in FASHION_CLASSES if c != POSITIVE_SOURCE]
    safe = [Part("safe", c, c, n) for c, n in zip(others, _spread(negatives, 9), strict=True)]
    return (Part("sensitive", POSITIVE_SOURCE, POSITIVE_SOURCE, positives), *safe)


def _ten(per_class: int) -> tuple[Part, ...]:
    """Each Fashion class its own class folder, one subclass each."""
    return tuple(Part(c, SUBCLASS, c, per_class) for c in FASHION_CLASSES)


SHAPES = {
    "binary_few": Shape("binary_few", _binary(60, 540), "sensitive"),
    "binary_many": Shape("binary_many", _binary(1200, 1800), "sensitive"),
    "ten_class": Shape("ten_class", _ten(300), POSITIVE_SOURCE),
    "imbalanced": Shape("imbalanced", _binary(100, 2000), "sensitive"),
    "noisy": Shape("noisy", _ten(300), POSITIVE_SOURCE, flip_fraction=0.05),
}


@dataclass(frozen=True)
class Written:
    """What :func:`write_shape` wrote: images per class (as labelled on disk), the class
    to set as ``report.positive_class``, and the flipped files (raw path relative to the
    raw folder -> (true class, given class))."""

    shape: str
    raw: Path
    counts: dict[str, int]
    positive_class: str
    flipped: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        """The class folders, sorted."""
        return sorted(self.counts)

    @property
    def total(self) -> int:
        """Images written."""
        return sum(self.counts.values())


def png_bytes(pixels: np.ndarray) -> bytes:
    """One grey image as PNG bytes (deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def _draw(
    shape: Shape, labels: np.ndarray, scale: float, rng: np.random.Generator
) -> list[tuple[str, str, str, int]]:
    """``(class, subclass, source class, image index)`` of every file, in a fixed order."""
    files = []
    for part in shape.parts:
        pool = np.flatnonzero(labels == FASHION_CLASSES.index(part.source))
        n = max(1, round(part.count * scale))
        picked = np.sort(rng.choice(pool, n, replace=False))
        files += [(part.cls, part.subclass, part.source, int(i)) for i in picked]
    return files


def write_shape(
    raw: Path, shape: str, seed: int = 0, scale: float = 1.0, root: Path = FASHION_DIR
) -> Written:
    """Write shape ``shape`` of :data:`SHAPES` into ``raw`` (which must hold no file), each
    part's count times ``scale`` (at least 1 image), as ``<class>/<subclass>/fm_<index>.png``
    (``index``: the image's place in Fashion-MNIST's train side)."""
    spec = SHAPES[shape]
    raw = Path(raw)
    if raw.exists() and any(p.is_file() for p in raw.rglob("*")):
        raise FileExistsError(f"{raw} already holds files; write a shape into an empty folder")
    images, labels = load_fashion("train", root)
    rng = np.random.default_rng(seed)
    files = _draw(spec, labels, scale, rng)
    classes = sorted({cls for cls, *_ in files})
    flips = round(len(files) * spec.flip_fraction)
    flip_at = set(rng.choice(len(files), flips, replace=False).tolist()) if flips else set()
    counts: dict[str, int] = dict.fromkeys(classes, 0)
    flipped: dict[str, tuple[str, str]] = {}
    for n, (cls, subclass, _, index) in enumerate(files):
        given = str(rng.choice([c for c in classes if c != cls])) if n in flip_at else cls
        rel = f"{given}/{subclass}/fm_{index:05d}.png"
        write_bytes(raw / rel, png_bytes(images[index]))
        counts[given] += 1
        if given != cls:
            flipped[rel] = (cls, given)
    return Written(shape, raw, counts, spec.positive_class, flipped)
