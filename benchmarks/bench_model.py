"""Benchmark 8: the default network and training recipe, old vs new, on a harder set.

Old: the ``train`` defaults before the ``cnn`` backbone (:data:`OLD_TRAIN`: ``small_cnn``
(16, 32, 64) flattened into a 64-unit dense layer, Adam at a constant 1e-3, batch 32,
early stopping with patience 8 and no minimum gain). New: ``params.yaml``'s ``train``
section as it is. Both go through the project's own code (``imgclf.pipeline``):
``model.build_from_params``, ``dataset.make_dataset`` (the stored JPEGs, decoded and cached
as ``train`` does) and ``train.fit`` (the recipe: schedule, weight decay, early stopping),
seeded by ``train.seed_everything``, with the same data, epoch budget and seed.

Data ("hard digits", :func:`make_set`): the bundled sample's digits are too easy to tell
good defaults from bad (the old default reached 0.985 test accuracy on it), so each image
here is one of
scikit-learn's 1,797 handwritten 8x8 digits (10 classes) drawn on a random crop of a real
photograph (scikit-learn's ``china.jpg`` / ``flower.jpg``, grey or colour, contrast
reduced), rotated (±35°), sheared, stretched, scaled (45-85% of the side) and moved, its
stroke thickened or thinned, in a random ink of either polarity, often next to a faint
fragment of another digit, then blurred and given Gaussian noise. The source digits are
split 60/15/25 (per class) into train/val/test before any image is drawn, so no test
image comes from a digit seen in training. Every random choice is drawn once per image,
relative to the side, and rendered at 32 and at 96 px: both sizes see the same images.
Deterministic (seeded), generated in about 20 s, written as JPEG q95 as ``preprocess``
stores images.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import PROJECT, Figure, Result, Settings, fmt, temp_dir
from benchmarks.corpus import Corpus
from imgclf.params import Train, load_params

log = logging.getLogger(__name__)

SIZES = (32, 96)
COUNTS = {"train": 3000, "val": 600, "test": 1200}
QUICK_COUNTS = {"train": 120, "val": 40, "test": 60}
# Per size, the same for old and new: the epoch budget (None: params.yaml's) and how many
# training seeds (base.seed, base.seed + 1, ...). At 96 px the old network takes ~10 s an
# epoch on 2 cores, so one seed and 15 epochs keep the whole run near 5 minutes.
EPOCHS = {32: None, 96: 15}
SEEDS = {32: 2, 96: 1}
QUICK_EPOCHS = 2
SEED = 0  # of the data set
CLASSES = 10

# The train section's defaults before the cnn backbone (learning rate constant, Adam:
# the new keys at the values that reproduce the old recipe exactly).
OLD_TRAIN: dict[str, Any] = {
    "backbone": "small_cnn",
    "cnn_filters": [16, 32, 64],
    "cnn_dense": 64,
    "dropout": 0.3,
    "batch_size": 32,
    "epochs": 40,
    "learning_rate": 0.001,
    "lr_schedule": "constant",
    "warmup_epochs": 0,
    "weight_decay": 0.0,
    "patience": 8,
    "min_delta": 0.0,
}
OLD_NAME = "old defaults: small_cnn (16, 32, 64) + dense 64, Adam 1e-3 constant, batch 32"


# -- the data set -----------------------------------------------------------------------


def _sources() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Digits (0-1 floats, 8x8), their labels, and the two sample photographs."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    photos = [np.asarray(p) for p in load_sample_images().images]
    return digits.images / 16.0, digits.target.astype(np.int32), photos


def split_sources(y: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Indices of the source digits of each side, 60/15/25 within each class."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in range(CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        a, b = round(0.6 * len(idx)), round(0.75 * len(idx))
        out["train"] += idx[:a].tolist()
        out["val"] += idx[a:b].tolist()
        out["test"] += idx[b:].tolist()
    return {k: np.array(sorted(v)) for k, v in out.items()}


def draw_specs(rng: np.random.Generator, pool: np.ndarray, n: int) -> list[dict[str, Any]]:
    """``n`` images' random choices (every source digit once before any repeats)."""
    specs = []
    for i in range(n):
        specs.append(
            {
                "src": int(pool[i]) if i < len(pool) else int(rng.choice(pool)),
                "scale": rng.uniform(0.45, 0.85),
                "angle": rng.uniform(-35, 35),
                "shear": rng.uniform(-0.25, 0.25),
                "aspect": rng.uniform(0.8, 1.2),
                "tx": rng.uniform(-0.18, 0.18),
                "ty": rng.uniform(-0.18, 0.18),
                "gamma": rng.uniform(0.5, 1.6),
                "photo": int(rng.integers(0, 2)),
                "crop": rng.uniform(0, 1, 3),
                "gray": bool(rng.random() < 0.5),
                "bg_contrast": rng.uniform(0.25, 0.8),
                "ink_delta": rng.uniform(50, 140) * rng.choice([-1, 1]),
                "ink_tint": rng.uniform(-30, 30, 3),
                "distractor": int(rng.choice(pool)) if rng.random() < 0.6 else -1,
                "d_alpha": rng.uniform(0.25, 0.55),
                "d_pos": rng.uniform(-0.55, 0.55, 2),
                "d_scale": rng.uniform(0.35, 0.6),
                "blur": rng.uniform(0.0, 1.0),
                "noise": rng.uniform(3, 18),
                "noise_seed": int(rng.integers(0, 2**31)),
            }
        )
    return specs


def _digit_mask(img8: np.ndarray, size: int, spec: dict[str, Any], distractor: bool) -> np.ndarray:
    """The 8x8 digit as a 0-1 ink mask of ``size`` px, transformed (bilinear)."""
    from PIL import Image

    if distractor:
        scale, angle, shear, aspect = spec["d_scale"], 0.0, 0.0, 1.0
        tx, ty = spec["d_pos"]
    else:
        scale, angle, shear, aspect = spec["scale"], spec["angle"], spec["shear"], spec["aspect"]
        tx, ty = spec["tx"], spec["ty"]
    padded = np.zeros((16, 16), np.float32)
    padded[4:12, 4:12] = img8
    k = scale * size / 8.0
    t = math.radians(angle)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    forward = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([k * aspect, k / aspect])
    inv = np.linalg.inv(forward)
    centre = np.array([size / 2 + tx * size, size / 2 + ty * size])
    offset = np.array([8.0, 8.0]) - inv @ centre  # source = inv @ output + offset
    data = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    out = Image.fromarray(padded, mode="F").transform(
        (size, size), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(out, np.float32), 0.0, 1.0)


def render(spec: dict[str, Any], size: int, digits: np.ndarray, photos: list) -> np.ndarray:
    """One image (uint8 RGB, ``size`` px) from its random choices."""
    from PIL import Image, ImageFilter

    photo = photos[spec["photo"]]
    h, w = photo.shape[:2]
    side = int(60 + spec["crop"][0] * 240)
    y0, x0 = int(spec["crop"][1] * (h - side)), int(spec["crop"][2] * (w - side))
    crop = Image.fromarray(photo[y0 : y0 + side, x0 : x0 + side])
    bg = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR), np.float32)
    if spec["gray"]:
        bg = np.repeat(bg.mean(axis=2, keepdims=True), 3, axis=2)
    mean = float(bg.mean())
    bg = mean + (bg - mean) * spec["bg_contrast"]
    level = mean + spec["ink_delta"]
    if not 15 <= level <= 240:  # no room on that side of the background: other polarity
        level = mean - spec["ink_delta"]
    ink = np.clip(level + spec["ink_tint"], 0, 255)
    if spec["distractor"] >= 0:
        frag = _digit_mask(digits[spec["distractor"]], size, spec, True)[..., None]
        frag = frag * spec["d_alpha"]
        bg = bg * (1 - frag) + ink * frag
    mask = (_digit_mask(digits[spec["src"]], size, spec, False) ** spec["gamma"])[..., None]
    img = Image.fromarray(np.clip(bg * (1 - mask) + ink * mask, 0, 255).astype(np.uint8))
    if spec["blur"] > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(spec["blur"] * size / 32))
    noise = np.random.default_rng(spec["noise_seed"]).normal(0, spec["noise"], (size, size, 1))
    return np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)


def make_set(
    sizes: tuple[int, ...], counts: dict[str, int], seed: int = SEED
) -> dict[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``{size: {side: (images uint8 (n, size, size, 3), labels)}}``, the same images at
    every size."""
    digits, y, photos = _sources()
    pools = split_sources(y, seed)
    rng = np.random.default_rng(seed + 1)
    out: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {s: {} for s in sizes}
    for side in ("train", "val", "test"):
        specs = draw_specs(rng, pools[side], counts[side])
        labels = y[[s["src"] for s in specs]]
        for size in sizes:
            images = np.stack([render(s, size, digits, photos) for s in specs])
            out[size][side] = (images, labels)
    return out


def write_jpegs(images: np.ndarray, folder: Path) -> list[str]:
    """The images as JPEG q95 files (as ``preprocess`` stores them); their paths."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(img).save(path, quality=95)
        paths.append(str(path))
    return paths


# -- training ---------------------------------------------------------------------------


def train_and_test(
    cfg: Train, size: int, files: dict[str, list[str]], labels: dict[str, np.ndarray], seed: int
) -> dict[str, Any]:
    """Train with the project's code as the ``train`` stage does; test accuracy, time."""
    import keras

    from imgclf.pipeline import train as trn
    from imgclf.pipeline.dataset import make_dataset
    from imgclf.pipeline.model import build_from_params

    keras.backend.clear_session()
    trn.seed_everything(seed)
    y = labels["train"]
    train_ds = make_dataset(files["train"], y, size, cfg.batch_size, True, seed)
    val_ds = make_dataset(files["val"], labels["val"], size, cfg.batch_size)
    model = build_from_params(size, CLASSES, cfg.model_copy(update={"weights": "none"}), seed)
    epoch_seconds: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            epoch_seconds.append(time.perf_counter() - self.start)

    start = time.perf_counter()
    rows = trn.fit(
        model,
        train_ds,
        val_ds,
        cfg,
        trn.class_weights(y, CLASSES, cfg.class_weight),
        callbacks=[Clock()],
    )
    seconds = time.perf_counter() - start
    test_ds = make_dataset(files["test"], labels["test"], size, 256, cache=False)
    probs = model.predict(test_ds, verbose=0)
    correct = probs.argmax(axis=1) == labels["test"]
    # the first epoch also decodes and caches the JPEGs and traces the graph
    steady = epoch_seconds[1:] or epoch_seconds
    out = {
        "accuracy": float(correct.mean()),
        "correct": correct,
        "epochs": len(rows),
        "best_epoch": int(trn.best_row(rows)["epoch"]),
        "seconds": seconds,
        "epoch_seconds": epoch_seconds,
        "s_per_epoch": statistics.median(steady),
        "params": model.count_params(),
        "train_accuracy": float(rows[-1]["accuracy"]),
        "best_val_accuracy": float(trn.best_row(rows)["val_accuracy"]),
    }
    log.info(
        "model %s %d px: test accuracy %.4f, %d epochs (best %d), %.2f s/epoch, %.0f s",
        cfg.backbone,
        size,
        out["accuracy"],
        out["epochs"],
        out["best_epoch"],
        out["s_per_epoch"],
        seconds,
    )
    return out


def paired_difference(new: np.ndarray, old: np.ndarray) -> tuple[float, float]:
    """Accuracy difference on the same test images and its 95% half-width (normal
    approximation of the paired per-image differences)."""
    d = new.astype(float) - old.astype(float)
    return float(d.mean()), 1.96 * float(d.std(ddof=1)) / math.sqrt(len(d))


def _describe(cfg: Train) -> str:
    if cfg.backbone == "cnn":
        net = f"cnn {tuple(cfg.cnn_filters)} x{cfg.cnn_depth} conv per stage"
    else:
        net = f"{cfg.backbone} {tuple(cfg.cnn_filters)} + dense {cfg.cnn_dense}"
    sched = (
        f"cosine, {cfg.warmup_epochs} warm-up epochs" if cfg.lr_schedule == "cosine" else "constant"
    )
    optimizer = f"AdamW (weight decay {cfg.weight_decay:g})" if cfg.weight_decay else "Adam"
    return (
        f"{net}, dropout {cfg.dropout:g}, {optimizer}, learning rate {cfg.learning_rate:g} "
        f"({sched}), batch {cfg.batch_size}, patience {cfg.patience}, min_delta {cfg.min_delta:g}"
    )


def _pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of one contender at one size (one per seed) as one: mean accuracy, median
    steady epoch time over all of them, every correct/epoch/seconds value kept."""
    steady = [t for r in runs for t in (r["epoch_seconds"][1:] or r["epoch_seconds"])]
    return {
        "accuracy": statistics.mean(r["accuracy"] for r in runs),
        "accuracies": [r["accuracy"] for r in runs],
        "correct": np.concatenate([r["correct"] for r in runs]),
        "epochs": statistics.mean(r["epochs"] for r in runs),
        "epochs_each": [r["epochs"] for r in runs],
        "best_each": [r["best_epoch"] for r in runs],
        "seconds": statistics.mean(r["seconds"] for r in runs),
        "seconds_each": [r["seconds"] for r in runs],
        "epoch_seconds": [t for r in runs for t in r["epoch_seconds"]],
        "s_per_epoch": statistics.median(steady),
        "params": runs[0]["params"],
        "train_accuracy": [r["train_accuracy"] for r in runs],
        "best_val_accuracy": [r["best_val_accuracy"] for r in runs],
    }


def _each(values: list[float]) -> str:
    return ", ".join(fmt(v) for v in values)


def bench(settings: Settings, corpus: Corpus | None) -> Result:
    params = load_params(PROJECT / "params.yaml")
    base_seed = params.base.seed
    new_cfg = params.train
    old_cfg = new_cfg.model_copy(update=OLD_TRAIN)
    counts = QUICK_COUNTS if settings.quick else COUNTS
    start = time.perf_counter()
    data = make_set(SIZES, counts)
    made = time.perf_counter() - start
    log.info("hard digits: %s images at %s px in %.1f s", counts, SIZES, made)
    result = Result("model", "Default model")
    budgets = {s: QUICK_EPOCHS if settings.quick else (EPOCHS[s] or new_cfg.epochs) for s in SIZES}
    seeds = {s: [base_seed + k for k in range(1 if settings.quick else SEEDS[s])] for s in SIZES}
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    with temp_dir(settings, "model") as tmp:
        for size in SIZES:
            files = {
                side: write_jpegs(images, tmp / str(size) / side)
                for side, (images, _) in data[size].items()
            }
            labels = {side: y for side, (_, y) in data[size].items()}
            done: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
            for seed in seeds[size]:  # old and new alternate, seed by seed
                for name, cfg in (("old", old_cfg), ("new", new_cfg)):
                    cfg = cfg.model_copy(update={"epochs": budgets[size]})
                    done[name].append(train_and_test(cfg, size, files, labels, seed))
            runs[size] = {name: _pooled(r) for name, r in done.items()}
    for size in SIZES:
        old, new = runs[size]["old"], runs[size]["new"]
        over = f" (mean of {len(seeds[size])} seeds)" if len(seeds[size]) > 1 else ""
        result.figures += [
            Figure(
                f"test accuracy at {size} px{over}",
                "",
                new["accuracy"],
                old["accuracy"],
                OLD_NAME,
                goal_on="diff",
                goal_value=0.0,
                ours_samples=new["accuracies"],
                baseline_samples=old["accuracies"],
            ),
            Figure(
                f"training seconds per epoch at {size} px",
                "s",
                new["s_per_epoch"],
                old["s_per_epoch"],
                OLD_NAME,
                goal_op="<=",
                goal_value=1.0,
                ours_samples=new["epoch_seconds"],
                baseline_samples=old["epoch_seconds"],
            ),
            Figure(
                f"epochs run at {size} px (budget {budgets[size]})",
                "",
                new["epochs"],
                old["epochs"],
                OLD_NAME,
                ours_samples=new["epochs_each"],
                baseline_samples=old["epochs_each"],
            ),
            Figure(
                f"training seconds at {size} px",
                "s",
                new["seconds"],
                old["seconds"],
                OLD_NAME,
                ours_samples=new["seconds_each"],
                baseline_samples=old["seconds_each"],
            ),
        ]
    for size in SIZES:
        old, new = runs[size]["old"], runs[size]["new"]
        diff, half = paired_difference(new["correct"], old["correct"])
        result.notes.append(
            f"{size} px, budget {budgets[size]} epochs, seeds {_each(seeds[size])}: test "
            f"accuracy new {_each(new['accuracies'])}, old {_each(old['accuracies'])} "
            f"(difference {diff:+.3f} ± {half:.3f}, 95%, paired over the "
            f"{len(new['correct']):,} test predictions); epochs run new "
            f"{_each(new['epochs_each'])} (best {_each(new['best_each'])}), old "
            f"{_each(old['epochs_each'])} (best {_each(old['best_each'])}); last-epoch train "
            f"accuracy new {_each(new['train_accuracy'])}, old {_each(old['train_accuracy'])}; "
            f"best val accuracy new {_each(new['best_val_accuracy'])}, old "
            f"{_each(old['best_val_accuracy'])}; parameters new {new['params']:,}, old "
            f"{old['params']:,}."
        )
    result.notes += [
        f"New: params.yaml train section: {_describe(new_cfg)}.",
        f"Old: {_describe(old_cfg)} (no minimum gain: any val_loss decrease resets patience).",
        f"Data: 'hard digits' (see benchmarks/bench_model.py), {counts['train']:,} train / "
        f"{counts['val']:,} val / {counts['test']:,} test images from disjoint source digits, "
        f"10 classes, the same images at {' and '.join(map(str, SIZES))} px, generated in "
        f"{made:.0f} s; trained from the stored JPEGs, augmentation of params.yaml (the same "
        "for both), old and new alternating with the same seed.",
        f"Budgets: {', '.join(f'{budgets[s]} epochs at {s} px' for s in SIZES)} for both "
        f"(params.yaml: {new_cfg.epochs}); a shorter budget than params.yaml's is time only "
        "(the old network takes ~10 s an epoch at 96 px): the new cosine schedule is "
        "compressed into it, the old constant rate is not affected by it.",
        "Seconds per epoch: median over every run's epochs 2 onwards (epoch 1 also decodes "
        "the JPEGs and traces the graph), training plus the val pass, one process on all "
        "cores; the samples column lists every epoch of every run.",
    ]
    return result
