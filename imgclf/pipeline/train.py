"""Stage ``train``: fit the classifier on the split lists; write the candidate model.

Input: ``data/split/{train,val}.csv`` (``path,label,sha256``; paths relative to the project
root) read with ``tf.data`` (parallel JPEG decode, in-memory cache, prefetch). Class names
are the sorted labels of the train list.

Outputs: the *candidate* ``models/candidate/model.keras`` (uint8-range pixels in, softmax
out; see ``imgclf.pipeline.model``) and ``models/candidate/metadata.json``, the per-epoch history
``metrics/train/history.csv`` (a DVC plot) and ``metrics/train.json``. A candidate is never
served: ``report`` judges it and ``promote`` bundles it only when it passes the gate. One
MLflow run is created here (see ``imgclf.tracking``); its id goes into ``metadata.json``
for ``report`` and ``promote`` to resume.

Deterministic: seeds from ``train.seed`` (else ``base.seed``) and TF op determinism, so the
same params and data give the same weights on the same machine, and the model file is saved
byte-stable (:func:`save_model`): ``dvc repro -f`` leaves ``dvc.lock`` unchanged. The MLflow
run id, which differs every run, goes to ``.mlflow-run.json``, outside every DVC out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.config import (
    PATHS,
    StageError,
    digest,
    import_tensorflow,
    load_params,
    setup_logging,
    stage_main,
)
from imgclf.imaging import DecodeOptions, decode_stored_jpeg
from imgclf.params import Train

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "lr")
TRAIN_SECTIONS = ("base", "preprocess", "split", "train", "mlflow")


def read_list(path: Path) -> tuple[list[str], list[str]]:
    """``(paths, labels)`` of a split list (paths as written: relative to the root)."""
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path} (run the split stage first)")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [r["path"] for r in rows], [r["label"] for r in rows]


def encode_labels(labels: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """Class indices of ``labels``; a label outside ``class_names`` is an error."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"labels not among the training classes {list(class_names)}: {unknown}")
    return np.array([index[label] for label in labels], dtype=np.int32)


def class_weights(y: np.ndarray, num_classes: int, mode: str) -> dict[int, float] | None:
    """``auto``: ``n / (k * n_c)`` per class (balanced); ``none``: no weighting."""
    if mode == "none":
        return None
    if mode != "auto":
        raise ValueError(f"train.class_weight must be auto or none, got {mode!r}")
    counts = np.bincount(y, minlength=num_classes)
    return {i: float(len(y) / (num_classes * c)) if c else 0.0 for i, c in enumerate(counts)}


def data_hash(files: Sequence[Path], decode: DecodeOptions) -> str:
    """SHA-256 over the split lists (every raw image's content hash and side) and the
    decode settings that turned raw images into training pixels."""
    h = hashlib.sha256(json.dumps(decode.to_dict(), sort_keys=True).encode())
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def make_dataset(
    paths: Sequence[str],
    labels: np.ndarray,
    image_size: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    cache: bool = True,
):
    """``tf.data`` pipeline of ``(float32 pixels 0-255, label)`` batches.

    Decoding runs in parallel (deterministic order); ``cache`` keeps decoded uint8 images in
    memory after the first pass; ``shuffle`` reshuffles each epoch from ``seed``.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, dtype=np.int32)))

    def load(path, label):
        img = decode_stored_jpeg(tf.io.read_file(path))
        return tf.ensure_shape(img, (image_size, image_size, 3)), label

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    return ds.prefetch(tf.data.AUTOTUNE)


def seed_everything(seed: int) -> None:
    """Python, NumPy and TF seeds plus TF op determinism."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


def fit(
    model,
    train_ds,
    val_ds,
    cfg: Train,
    weights: dict[int, float] | None,
    callbacks: Sequence[Any] = (),
) -> list[dict[str, float]]:
    """Phase 1 (head, or everything for a non-pretrained backbone), then the optional
    fine-tune phase. Each phase: AdamW with ``train.weight_decay``, the learning rate of
    ``train.lr_schedule`` (cosine: ``train.warmup_epochs`` of linear warm-up, then cosine
    decay to 0 at the phase's last epoch, per step), early stopping on ``val_loss``
    (``train.patience`` epochs without a gain over ``train.min_delta``) with the
    lowest-``val_loss`` weights restored. A fine-tune phase that does not beat phase 1 is
    undone. Returns one row per epoch; ``lr`` is the learning rate of its last step.
    """
    from imgclf.pipeline.model import (
        BACKBONE_LAYER,
        EarlyStop,
        compile_model,
        learning_rate_schedule,
        unfreeze_top,
    )

    steps = int(train_ds.cardinality())  # batches per epoch
    if steps == -2:  # unknown to tf.data (e.g. after a filter): count one pass
        steps = sum(1 for _ in train_ds)
    if steps <= 0:
        raise ValueError("the training dataset is empty or infinite")

    def phase(name: str, lr: float, first: int, epochs: int) -> list[dict[str, float]]:
        schedule = learning_rate_schedule(
            cfg.lr_schedule, lr, epochs * steps, cfg.warmup_epochs * steps
        )
        compile_model(model, schedule, cfg.weight_decay)
        stop = EarlyStop(cfg.patience, cfg.min_delta)
        hist = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=first + epochs,
            initial_epoch=first,
            class_weight=weights,
            callbacks=[stop, *callbacks],
            shuffle=False,  # the dataset shuffles itself (seeded)
            verbose=2,
        )
        history = dict(hist.history)
        rates = history.pop("learning_rate")
        if stop.stopped_epoch is not None:
            log.info(
                "early stop after epoch %d: no val_loss gain over %g in %d epochs; "
                "weights of epoch %d kept",
                stop.stopped_epoch + 1,
                cfg.min_delta,
                cfg.patience,
                (stop.best_epoch or 0) + 1,
            )
        return [
            {
                "epoch": first + i + 1,
                "phase": name,
                **{k: float(v[i]) for k, v in history.items()},
                "lr": float(rates[i]),
            }
            for i in range(len(history["loss"]))
        ]

    rows = phase("train", cfg.learning_rate, 0, cfg.epochs)
    ft_epochs = cfg.fine_tune_epochs
    # build_model freezes a backbone whose weights were loaded (imagenet or a file)
    backbone_is_frozen = not model.get_layer(BACKBONE_LAYER).trainable
    if ft_epochs > 0 and not backbone_is_frozen:
        log.info("fine-tune skipped: the backbone was trained from the start (no frozen part)")
    elif ft_epochs > 0:
        best = best_row(rows)["val_loss"]
        saved = model.get_weights()
        n = unfreeze_top(model, cfg.fine_tune_layers)
        log.info("fine-tune: %d layers of %s unfrozen", n, BACKBONE_LAYER)
        ft = phase("fine_tune", cfg.fine_tune_learning_rate, len(rows), ft_epochs)
        rows += ft
        if not best_row(ft)["val_loss"] < best:
            log.info("fine-tune did not improve val_loss (%.4f); phase-1 weights kept", best)
            model.set_weights(saved)
    return rows


def best_row(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The epoch with the lowest ``val_loss`` (the weights kept: early stopping restores
    them, and a fine-tune phase is kept only when its lowest beats phase 1's)."""
    return min(rows, key=lambda r: r["val_loss"])


def write_history(rows: Sequence[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
            )


def _renumber_shared_objects(node: Any, ids: dict[int, int]) -> Any:
    """Keras names objects shared between layers by their Python ``id()``; number them
    1, 2, ... in order of appearance instead (same sharing, no memory address)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "shared_object_id" and isinstance(value, int):
                value = ids.setdefault(value, len(ids) + 1)
            out[key] = _renumber_shared_objects(value, ids)
        return out
    if isinstance(node, list):
        return [_renumber_shared_objects(v, ids) for v in node]
    return node


def save_model(model: Any, path: Path) -> None:
    """``model.save(path)``, then made byte-stable: Keras stamps the save time into the
    archive (``date_saved`` and the weights entry's zip time) and memory addresses into
    its config (``shared_object_id``); the first is dropped, the others fixed, so the same
    weights always give the same file."""
    model.save(path)
    out = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for entry in src.infolist():
            data = src.read(entry)
            if entry.filename == "metadata.json":
                meta = json.loads(data)
                meta.pop("date_saved", None)
                data = json.dumps(meta, sort_keys=True).encode()
            elif entry.filename == "config.json":
                data = json.dumps(_renumber_shared_objects(json.loads(data), {})).encode()
            fixed = zipfile.ZipInfo(entry.filename, (1980, 1, 1, 0, 0, 0))
            fixed.compress_type = entry.compress_type
            fixed.external_attr = entry.external_attr
            dst.writestr(fixed, data)
    path.write_bytes(out.getvalue())


def write_json(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@stage_main
def main() -> None:
    params = load_params()
    setup_logging(params.base.log_level)
    cfg, ml, seed = params.train, params.mlflow, params.train_seed
    decode = DecodeOptions.from_params(params.preprocess)
    lists = [PATHS.split_list(s) for s in ("train", "val", "test")]
    train_paths, train_labels = read_list(lists[0])
    val_paths, val_labels = read_list(lists[1])
    if not train_paths or not val_paths:
        raise StageError("the train and val lists must not be empty: rerun the split stage")
    class_names = sorted(set(train_labels))
    y_train = encode_labels(train_labels, class_names)
    y_val = encode_labels(val_labels, class_names)
    log.info("classes %s; %d train, %d val images", class_names, len(y_train), len(y_val))

    import_tensorflow()
    import keras

    from imgclf import tracking
    from imgclf.pipeline.architecture import can_draw, draw_model, missing
    from imgclf.pipeline.model import build_from_params

    seed_everything(seed)
    weights = class_weights(y_train, len(class_names), cfg.class_weight)
    root = str(PATHS.root)
    train_ds = make_dataset(
        [f"{root}/{p}" for p in train_paths], y_train, decode.size, cfg.batch_size, True, seed
    )
    val_ds = make_dataset([f"{root}/{p}" for p in val_paths], y_val, decode.size, cfg.batch_size)

    dhash = data_hash(lists, decode)
    logged = params.model_dump(include=set(TRAIN_SECTIONS))
    pdigest = digest(logged)
    uri = tracking.tracking_uri()
    tags = tracking.run_tags(dhash, PATHS.root)
    name = tracking.run_name(commit=tags.get("git_commit"))
    tracking.close_abandoned(uri, ml.experiment)
    run = tracking.Run.start(
        uri,
        ml.experiment,
        key=name,
        pending_dir=PATHS.cache / "mlflow-pending",
        run_name=name,
        tags={**tags, "params_digest": pdigest},
    )
    with tracking.taken(run):
        run.log_params(tracking.flatten(logged))

        class EpochLogger(keras.callbacks.Callback):
            """Per-epoch metrics to MLflow as the training goes."""

            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                run.log_metrics({k: float(v) for k, v in (logs or {}).items()}, step=epoch + 1)

        model = build_from_params(decode.size, len(class_names), cfg, seed)
        log.info("model %s: %d parameters", model.name, model.count_params())

        start = time.perf_counter()
        rows = fit(model, train_ds, val_ds, cfg, weights, callbacks=[EpochLogger()])
        seconds = time.perf_counter() - start
        best = best_row(rows)
        speed = len(y_train) * len(rows) / seconds
        log.info(
            "trained %d epochs in %.1f s (%.0f images/s); best epoch %d: val_loss %.4f, "
            "val_accuracy %.4f",
            len(rows),
            seconds,
            speed,
            best["epoch"],
            best["val_loss"],
            best["val_accuracy"],
        )

        PATHS.candidate.mkdir(parents=True, exist_ok=True)
        save_model(model, PATHS.model_file)
        if can_draw():
            draw_model(model, PATHS.candidate / "model.png")
        else:  # a picture is no reason to throw the training away
            log.warning("models/candidate/model.png not drawn: %s", missing())
        write_history(rows, PATHS.metrics / "train" / "history.csv")
        summary = {"epochs_run": len(rows), "best_epoch": int(best["epoch"])}
        write_json(summary, PATHS.metrics / "train.json")  # dvc exp show's train columns
        write_json(
            {
                "class_names": class_names,
                "class_counts": dict(sorted(Counter(train_labels).items())),
                "image_size": decode.size,
                "decode": decode.to_dict(),
                "backbone": cfg.backbone,
                "params_digest": pdigest,
                "data_hash": dhash,
            },
            PATHS.model_metadata,
        )
        tracking.write_run_link(run, name, dhash, tags.get("git_commit"))
        log.info("wrote the candidate %s", PATHS.candidate.relative_to(PATHS.root))
        run.log_metrics(
            summary
            | {"best_val_loss": best["val_loss"], "best_val_accuracy": best["val_accuracy"]}
            | {"train_seconds": seconds, "train_images_per_second": speed}
        )
        run.log_artifact(PATHS.metrics / "train" / "history.csv", "train")
        run.log_artifact(PATHS.model_metadata, "train")
        if (PATHS.candidate / "model.png").is_file():
            run.log_artifact(PATHS.candidate / "model.png", "train")
    tracking.check_required(run, ml.required)


if __name__ == "__main__":
    sys.exit(main())
