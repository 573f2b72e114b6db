"""The benchmark corpus: photos made from real photographs that install with packages.

Sources: scikit-learn's ``china.jpg`` and ``flower.jpg`` and matplotlib's
``grace_hopper.jpg``. Each corpus photo is a random crop of one source, flipped or not,
resized to a camera size (12 MP 4000x3000 or 1080p 1920x1080), with a fixed field of
Gaussian sensor noise (sigma 4.5) rolled by a random offset, so files are unique and
compress like real photos (a few MB at 12 MP) rather than like smooth upscales. Some 12 MP
ones are portrait via an EXIF orientation tag, as phones write them; a few are PNG.

Two folders, written once under ``benchmarks/.corpus/<spec>/`` (gitignored):

- ``photos/<class>/<subclass>/``: the photos, round-robin over subclasses so each subclass
  holds the same mix (one subclass of 20 is 5% of the images);
- ``tree/<class>/<subclass>/``: many small (64x64) JPEG crops for the DVC overhead and
  memory figures.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.config import digest

log = logging.getLogger(__name__)

CLASSES = ("safe", "sensitive")
ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class CorpusSpec:
    """How many photos of each kind, and the small-file tree."""

    n_large: int
    n_hd: int
    n_png: int
    large: tuple[int, int] = (4000, 3000)
    hd: tuple[int, int] = (1920, 1080)
    subclasses: int = 20
    tree_files: int = 20_000
    tree_side: int = 64
    noise_sigma: float = 4.5
    seed: int = 7

    @property
    def n_photos(self) -> int:
        return self.n_large + self.n_hd + self.n_png

    @property
    def key(self) -> str:
        return digest(asdict(self))


# Equal 12 MP and 1080p JPEGs plus 5% PNG: the neutral reading of "a mix". 400 photos
# keep a full run of the stage long enough (~10 s) that DVC's fixed ~1 s does not
# dominate the incremental figure, and the whole harness within 15 minutes.
FULL = CorpusSpec(n_large=190, n_hd=190, n_png=20)
QUICK = CorpusSpec(
    n_large=2, n_hd=4, n_png=2, large=(1600, 1200), hd=(960, 540), subclasses=4, tree_files=200
)


def source_images() -> list[Path]:
    """The real photographs shipped with scikit-learn and matplotlib."""
    import matplotlib
    import sklearn

    sk = Path(sklearn.__file__).parent / "datasets" / "images"
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    paths = [sk / "china.jpg", sk / "flower.jpg", mpl / "grace_hopper.jpg"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sample photographs not found: {', '.join(missing)}")
    return paths


@dataclass(frozen=True)
class Corpus:
    """Where a generated corpus lives."""

    root: Path
    spec: CorpusSpec

    @property
    def photos(self) -> Path:
        return self.root / "photos"

    @property
    def tree(self) -> Path:
        return self.root / "tree"

    def photo_files(self) -> list[Path]:
        return sorted(p for p in self.photos.rglob("*") if p.is_file())

    def subclass_dirs(self) -> list[Path]:
        return sorted(d for d in self.photos.glob("*/*") if d.is_dir())


def subclass_of(index: int, spec: CorpusSpec) -> str:
    """``class/subclass`` for photo ``index`` (round-robin; ~70% safe like the origin)."""
    sub = index % spec.subclasses
    label = CLASSES[0] if sub < round(spec.subclasses * 0.7) else CLASSES[1]
    return f"{label}/sub{sub:02d}"


# --- photo generation (runs in worker processes) ---------------------------------------

_SOURCES: list[np.ndarray] = []
_NOISE: dict[tuple[int, int], np.ndarray] = {}


def _noise(size: tuple[int, int], seed: int, sigma: float) -> np.ndarray:
    if size not in _NOISE:
        rng = np.random.default_rng(seed)
        field = rng.normal(0.0, sigma, (size[1], size[0], 3))
        _NOISE[size] = np.rint(field).astype(np.int16)
    return _NOISE[size]


def _sources() -> list[np.ndarray]:
    if not _SOURCES:
        for path in source_images():
            with Image.open(path) as img:
                _SOURCES.append(np.asarray(img.convert("RGB")))
    return _SOURCES


def make_photo(index: int, size: tuple[int, int], seed: int, sigma: float) -> Image.Image:
    """One synthetic camera photo of ``size`` from a random crop of a real photograph."""
    rng = np.random.default_rng([seed, index])
    src = _sources()[index % len(_sources())]
    h, w = src.shape[:2]
    aspect = size[0] / size[1]
    scale = rng.uniform(0.6, 1.0)
    cw = min(w, round(h * aspect)) * scale
    ch = cw / aspect
    x0 = rng.uniform(0, w - cw)
    y0 = rng.uniform(0, h - ch)
    img = Image.fromarray(src).resize(
        size, Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch)
    )
    arr = np.asarray(img, dtype=np.int16)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    shift = (int(rng.integers(size[1])), int(rng.integers(size[0])))
    arr = arr + np.roll(_noise(size, seed, sigma), shift, axis=(0, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _photo_task(args: tuple[int, str, str, tuple[int, int], int, float]) -> None:
    index, kind, target, size, seed, sigma = args
    img = make_photo(index, size, seed, sigma)
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "png":
        img.save(path, format="PNG", compress_level=6)
    elif kind == "large" and index % 5 == 0:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = 6  # stored landscape, shown portrait
        img.save(path, format="JPEG", quality=92, exif=exif)
    else:
        img.save(path, format="JPEG", quality=92)


def photo_tasks(
    spec: CorpusSpec, photos: Path
) -> list[tuple[int, str, str, tuple[int, int], int, float]]:
    """(index, kind, path, size, seed, noise sigma) of every photo, kinds interleaved evenly."""
    kinds = ["large"] * spec.n_large + ["hd"] * spec.n_hd + ["png"] * spec.n_png
    rng = np.random.default_rng(spec.seed)
    rng.shuffle(kinds)
    tasks = []
    for index, kind in enumerate(kinds):
        size = spec.large if kind == "large" else spec.hd
        ext = "png" if kind == "png" else "jpg"
        target = photos / subclass_of(index, spec) / f"{kind}_{index:04d}.{ext}"
        tasks.append((index, kind, str(target), size, spec.seed, spec.noise_sigma))
    return tasks


def tree_images(spec: CorpusSpec, tree: Path, start: int, stop: int) -> None:
    """Write small JPEG crops ``start..stop-1`` of the tree (unique content each)."""
    rng = np.random.default_rng([spec.seed, start])
    small = [
        np.asarray(Image.fromarray(s).resize((s.shape[1] // 2, s.shape[0] // 2)))
        for s in _sources()
    ]
    side = spec.tree_side
    per_dir = max(1, spec.tree_files // spec.subclasses)
    for i in range(start, stop):
        src = small[i % len(small)]
        y = int(rng.integers(src.shape[0] - side))
        x = int(rng.integers(src.shape[1] - side))
        crop = src[y : y + side, x : x + side].astype(np.int16)
        crop = crop + rng.integers(-4, 5, crop.shape, dtype=np.int16)
        sub = min(i // per_dir, spec.subclasses - 1)
        label = CLASSES[0] if sub < round(spec.subclasses * 0.7) else CLASSES[1]
        target = tree / label / f"sub{sub:02d}" / f"t{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).save(target, quality=90)


def _tree_task(args: tuple[CorpusSpec, str, int, int]) -> None:
    spec, tree, start, stop = args
    tree_images(spec, Path(tree), start, stop)


def ensure_corpus(base: Path, spec: CorpusSpec, workers: int) -> Corpus:
    """Generate the corpus under ``base/<spec key>`` unless it is already complete."""
    corpus = Corpus(base / spec.key, spec)
    done = corpus.root / ".complete"
    if done.is_file():
        log.info("corpus: reusing %s", corpus.root)
        return corpus
    if corpus.root.exists():
        shutil.rmtree(corpus.root)
    corpus.root.mkdir(parents=True)
    log.info(
        "corpus: writing %d photos (%d at %dx%d, %d at %dx%d, %d PNG) and %d small files to %s",
        spec.n_photos,
        spec.n_large,
        *spec.large,
        spec.n_hd,
        *spec.hd,
        spec.n_png,
        spec.tree_files,
        corpus.root,
    )
    chunk = 1000
    tree_jobs = [
        (spec, str(corpus.tree), s, min(s + chunk, spec.tree_files))
        for s in range(0, spec.tree_files, chunk)
    ]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(max(1, workers)) as pool:
        pool.map(_photo_task, photo_tasks(spec, corpus.photos), chunksize=1)
        pool.map(_tree_task, tree_jobs, chunksize=1)
    size = sum(p.stat().st_size for p in corpus.photo_files())
    done.write_text(f"{spec}\n", encoding="utf-8")
    log.info("corpus: %d photos, %.0f MB", spec.n_photos, size / 1e6)
    return corpus


def corpus_facts(corpus: Corpus) -> str:
    """One line describing the photo corpus, for RESULTS.md."""
    files = corpus.photo_files()
    size = sum(p.stat().st_size for p in files)
    s = corpus.spec
    return (
        f"{len(files)} photos ({s.n_large} JPEG {s.large[0]}x{s.large[1]}, "
        f"{s.n_hd} JPEG {s.hd[0]}x{s.hd[1]}, {s.n_png} PNG {s.hd[0]}x{s.hd[1]}; "
        f"{size / 1e6:.0f} MB) in {s.subclasses} subclasses; tree of {s.tree_files:,} "
        f"{s.tree_side}x{s.tree_side} JPEGs; made from scikit-learn/matplotlib sample photos"
    )
