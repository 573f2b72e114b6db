"""Benchmark 1: preprocess throughput against the origin's approach, and output quality.

Ours: :func:`imgclf.pipeline.preprocess.preprocess` on the photo corpus (224 px, pad, one worker per
core, an empty content cache each repetition). Baseline: the origin's ``preprocess.py``,
sequential in one process: open, convert to RGB, save the full-size JPEG (Pillow's
default quality). Quality: our draft-decoded 224 px image against a full decode resized
the same way (SSIM, PSNR).
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from benchmarks.common import (
    PROJECT,
    Figure,
    Result,
    Settings,
    fmt,
    hot_spots,
    interleaved,
    rate,
    temp_dir,
)
from benchmarks.corpus import Corpus
from imgclf import imaging
from imgclf.imaging import DecodeOptions
from imgclf.pipeline.preprocess import preprocess
from imgclf.pipeline.preprocess_workers import process_image
from imgclf.testing.images import preprocess_options

log = logging.getLogger(__name__)

OPTIONS = preprocess_options(size=224, mode="pad", jpeg_quality=95)
QUALITY = OPTIONS.jpeg_quality
SSIM_GOAL = 0.98  # a common "visually identical" bar
PSNR_GOAL = 38.0  # dB


def origin_preprocess(raw: Path, out: Path) -> int:
    """The origin's preprocess: every image under ``raw/<class>/**`` re-saved full size."""
    count = 0
    for path in sorted(raw.rglob("*")):
        if not path.is_file():
            continue
        label = path.relative_to(raw).parts[0]
        try:
            img = Image.open(path).convert("RGB")
        except OSError:
            target = out / "invalid" / label / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            continue
        target = out / "processed" / label / f"{path.stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        img.save(target, format="JPEG")
        count += 1
    return count


def run_ours(raw: Path, work: Path, workers: int) -> int:
    """Our stage on explicit paths under ``work`` (fresh cache); returns images processed."""
    outcomes, _ = preprocess(
        raw,
        work / "processed",
        work / "invalid",
        work / "manifest.csv",
        work / "cache",
        OPTIONS,
        workers,
        work,
    )
    return sum(o.status == "processed" for o in outcomes)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over channels (Gaussian window, sigma 1.5; Wang et al. 2004 constants)."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(a.shape[2]):
        x = a[..., ch].astype(np.float64)
        y = b[..., ch].astype(np.float64)
        mx, my = gaussian_filter(x, 1.5), gaussian_filter(y, 1.5)
        vx = gaussian_filter(x * x, 1.5) - mx * mx
        vy = gaussian_filter(y * y, 1.5) - my * my
        cov = gaussian_filter(x * y, 1.5) - mx * my
        num = (2 * mx * my + c1) * (2 * cov + c2)
        den = (mx * mx + my * my + c1) * (vx + vy + c2)
        values.append(float(np.mean(num / den)))
    return float(np.mean(values))


def full_decode(path: Path, options: DecodeOptions) -> np.ndarray:
    """Reference: decode every pixel, then the same orientation, RGB and fit as ours."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img).convert("RGB")
        return np.asarray(imaging.fit_square(img, options))


def quality(files: list[Path], options: DecodeOptions) -> dict[str, float]:
    """SSIM / PSNR of draft vs full decode, and of both after our JPEG encode.

    PSNR is over the pooled squared error of all images (a mean of per-image PSNRs is
    infinite as soon as one image is identical).
    """
    ssims: list[float] = []
    sq: dict[str, list[float]] = {"draft": [], "jpeg": [], "ref_jpeg": []}
    for path in files:
        ref = full_decode(path, options)
        ours = imaging.decode_array(path, options)
        ssims.append(ssim(ours, ref))
        shipped = _jpeg_pixels(imaging.encode_jpeg(Image.fromarray(ours), QUALITY))
        ref_jpeg = _jpeg_pixels(imaging.encode_jpeg(Image.fromarray(ref), QUALITY))
        for key, img in (("draft", ours), ("jpeg", shipped), ("ref_jpeg", ref_jpeg)):
            sq[key].append(float(np.mean((img.astype(np.float64) - ref) ** 2)))
    out = {f"psnr_{k}": _psnr(float(np.mean(v))) for k, v in sq.items()}
    out["ssim"] = float(np.mean(ssims))
    out["ssim_min"] = float(np.min(ssims))
    return out


def _psnr(mse: float) -> float:
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def _jpeg_pixels(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as img:
        return np.asarray(img.convert("RGB"))


def per_kind(files: list[Path], n: int) -> dict[str, tuple[float, float]]:
    """Single-core ms per image of ours vs the origin, by kind (file-name prefix)."""
    out = {}
    for kind in ("large", "hd", "png"):
        chosen = [p for p in files if p.name.startswith(f"{kind}_")][:n]
        if not chosen:
            continue
        blobs = [p.read_bytes() for p in chosen]
        start = time.perf_counter()
        for blob in blobs:
            hashlib.sha256(blob).hexdigest()
            process_image(blob, OPTIONS)
        ours = (time.perf_counter() - start) / len(blobs)
        start = time.perf_counter()
        for blob in blobs:
            Image.open(io.BytesIO(blob)).convert("RGB").save(io.BytesIO(), format="JPEG")
        origin = (time.perf_counter() - start) / len(blobs)
        out[kind] = (ours * 1000, origin * 1000)
    return out


def bench(settings: Settings, corpus: Corpus) -> Result:
    """Throughput of ours vs the origin (median of ``settings.reps``) and draft quality."""
    result = Result("preprocess", "Preprocess throughput")
    raw = corpus.photos
    files = corpus.photo_files()
    for path in files:  # warm the page cache so neither side pays for the first read
        path.read_bytes()
    n = len(files)
    with temp_dir(settings, "pre-ours") as work:

        def fresh() -> None:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()

        timings = interleaved(
            {
                "ours": lambda: rate(lambda: run_ours(raw, work, settings.workers)),
                "origin": lambda: rate(lambda: origin_preprocess(raw, work)),
            },
            settings.reps,
            fresh,
        )
    ours_t, base_t = timings["ours"], timings["origin"]
    log.info("preprocess: ours %s, origin %s images/s", fmt(ours_t.median), fmt(base_t.median))
    result.figures.append(
        Figure(
            "Preprocess throughput",
            "images/s",
            ours_t.median,
            base_t.median,
            "origin: sequential open, RGB, full-size JPEG",
            goal_value=6.0,
            ours_samples=ours_t.samples,
            baseline_samples=base_t.samples,
        )
    )
    with temp_dir(settings, "pre-prof") as work:
        args = ("-m", "benchmarks.bench_preprocess", str(raw), str(work), str(settings.workers))
        profile = hot_spots(PROJECT, sys.executable, *args)
    jpegs = [p for p in files if p.suffix.lower() == ".jpg"]  # draft applies to JPEG only
    sample = jpegs[:: max(1, len(jpegs) // (4 if settings.quick else 24))]
    q = quality(sample, OPTIONS)
    log.info("preprocess quality: %s", {k: round(v, 3) for k, v in q.items()})
    result.figures += [
        Figure(
            "SSIM, draft decode vs full decode (224 px pad)",
            "",
            q["ssim"],
            None,
            "full decode + same resize",
            goal_on="ours",
            goal_value=SSIM_GOAL,
        ),
        Figure(
            "PSNR, draft decode vs full decode",
            "dB",
            q["psnr_draft"],
            None,
            "full decode + same resize",
            goal_on="ours",
            goal_value=PSNR_GOAL,
        ),
        Figure(
            "PSNR of the stored q95 JPEG vs full-decode resize",
            "dB",
            q["psnr_jpeg"],
            q["psnr_ref_jpeg"],
            "full decode + resize + same q95 JPEG",
        ),
    ]
    kinds = per_kind(files, 2 if settings.quick else 8)
    names = {"large": "12 MP JPEG", "hd": "1080p JPEG", "png": "1080p PNG"}
    counts = {k: sum(p.name.startswith(f"{k}_") for p in files) for k in kinds}
    gain = sum(counts[k] * b for k, (_, b) in kinds.items()) / sum(
        counts[k] * o for k, (o, _) in kinds.items()
    )
    result.notes.append(
        "Where the time goes, one core, ms per image (ours: hash + decode + fit + encode; "
        "origin: decode + full-size encode): "
        + "; ".join(f"{names[k]} {o:.1f} vs {b:.1f} ({b / o:.1f}x)" for k, (o, b) in kinds.items())
        + f". Weighted by this corpus' mix the per-core gain is {gain:.1f}x, so about "
        f"{gain * settings.workers:.1f}x is expected with {settings.workers} workers; the "
        f"goal needs {6 / settings.workers:.1f}x per core."
    )
    result.notes += [
        f"py-spy of one run of ours (all processes): {profile}. `PIL/ImageFile.py` is "
        "libjpeg/zlib decoding; draft mode skips most of the IDCT but not the entropy "
        "decoding of the whole file, and PNG cannot be drafted at all.",
        f"{n} photos, {settings.workers} worker process(es) for ours, one process for the "
        f"origin; output {OPTIONS.size} px, mode {OPTIONS.mode}, JPEG q{QUALITY}; each "
        "repetition starts from an empty content cache and empty output folders.",
        f"Quality over {len(sample)} JPEG photos (draft decoding applies to JPEG only): "
        f"mean SSIM {q['ssim']:.4f} (worst {q['ssim_min']:.4f}), PSNR "
        f"{q['psnr_draft']:.1f} dB. SSIM ≥ {SSIM_GOAL} and "
        f"PSNR ≥ {PSNR_GOAL:g} dB are the bars used here for 'no visible difference'.",
    ]
    return result


if __name__ == "__main__":  # one run of ours, for the profiler: RAW WORK WORKERS
    run_ours(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
