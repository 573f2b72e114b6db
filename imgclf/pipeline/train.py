"""Stage ``train``: fit the classifier on the split lists; write the candidate model.

Input: ``data/split/{train,val}.csv`` through :mod:`imgclf.pipeline.dataset` (``tf.data``:
parallel JPEG decode, in-memory cache, prefetch). Class names are the sorted labels of the
train list.

Outputs: the *candidate* ``models/candidate/model.keras`` (uint8-range pixels in, softmax
out; see :mod:`imgclf.pipeline.model`), ``metadata.json`` and ``model.png``; the per-epoch
history, written by DVCLive's Keras callback into ``metrics/train/``
(``plots/metrics/train/{loss,accuracy,learning_rate}.tsv`` and
``plots/metrics/eval/{loss,accuracy}.tsv``, one row per epoch, ``step`` = epoch counted
from 1; plotted by ``dvc plots``; DVCLive's ``metrics.json`` beside them holds the last
epoch's values); and ``metrics/train.json`` (epochs run, best epoch). A candidate is
never served: ``report`` judges it and ``promote`` bundles it only when it passes the gate
and the champion race. One MLflow run is created here (see :mod:`imgclf.tracking`);
it gets every epoch's metrics as the training goes, named after their split
(``train_accuracy``, ``train_loss``, ``val_accuracy``, ``val_loss``, and
``learning_rate``), and its id goes to ``.mlflow-run.json`` for ``report`` and ``promote``
to resume.

Deterministic: seeds from ``train.seed`` (else ``base.seed``) and TF op determinism, so the
same params and data give the same weights on the same machine, and the model file is saved
byte-stable (:func:`save_model`): ``dvc repro -f`` leaves ``dvc.lock`` unchanged. The MLflow
run id, which differs every run, stays outside every DVC out.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
from imgclf.files import write_bytes, write_json
from imgclf.imaging import DecodeOptions
from imgclf.params import Params, Train
from imgclf.pipeline.dataset import SplitList, data_hash, encode_labels, make_dataset, read_list
from imgclf.pipeline.distribute import (
    TF_CONFIG,
    Role,
    cluster_role,
    local_cluster,
    lost_worker_error,
    make_strategy,
    watch_parent,
)
from imgclf.pipeline.suspects import excluded_paths
from imgclf.pipeline.training_loop import Batches, batches, class_weight_table, fit_epochs

log = logging.getLogger(__name__)

LOGGED_SECTIONS = ("base", "preprocess", "split", "audit", "train", "mlflow")
SIDES = ("train", "val", "test")  # all three name the data (data_hash); two are read


@dataclass(frozen=True)
class TrainingData:
    """The train and val sides, their labels encoded against the train list's classes."""

    class_names: list[str]
    train: SplitList
    val: SplitList
    y_train: np.ndarray
    y_val: np.ndarray


def load_training_data(
    train_list: Path, val_list: Path, exclude: frozenset[str] = frozenset()
) -> TrainingData:
    """Read both lists without the paths in ``exclude``; an empty side is a
    :class:`StageError`."""
    train, val = read_list(train_list, exclude), read_list(val_list, exclude)
    if exclude:
        log.info("audit.exclude: %d suspect(s) left out of train and val", len(exclude))
    if not train.paths or not val.paths:
        raise StageError("the train and val lists must not be empty: rerun the split stage")
    names = sorted(set(train.labels))
    data = TrainingData(
        names, train, val, encode_labels(train.labels, names), encode_labels(val.labels, names)
    )
    log.info("classes %s; %d train, %d val images", names, len(train.paths), len(val.paths))
    return data


def class_weights(y: np.ndarray, num_classes: int, mode: str) -> dict[int, float] | None:
    """``auto``: ``n / (k * n_c)`` per class (balanced); ``none``: no weighting."""
    if mode == "none":
        return None
    if mode != "auto":
        raise ValueError(f"train.class_weight must be auto or none, got {mode!r}")
    counts = np.bincount(y, minlength=num_classes)
    return {i: float(len(y) / (num_classes * c)) if c else 0.0 for i, c in enumerate(counts)}


def seed_everything(seed: int) -> None:
    """Python, NumPy and TF seeds plus TF op determinism."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


@dataclass(frozen=True)
class Phase:
    """One ``model.fit`` call of :func:`fit`."""

    name: str  # the history's ``phase``: train | fine_tune
    learning_rate: float  # peak of the schedule
    first_epoch: int  # epochs run before it
    epochs: int  # its budget


def fit_phase(
    model: Any,
    train: Batches,
    val: Any,
    cfg: Train,
    phase: Phase,
    weights: dict[int, float] | None,
    callbacks: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Compile (AdamW with ``train.weight_decay``, the ``train.lr_schedule`` over the phase's
    steps) under the strategy's scope and train with early stopping
    (:func:`imgclf.pipeline.training_loop.fit_epochs`); one history row per epoch run."""
    from imgclf.pipeline.model import EarlyStop, compile_model, learning_rate_schedule

    schedule = learning_rate_schedule(
        cfg.lr_schedule,
        phase.learning_rate,
        phase.epochs * train.steps,
        cfg.warmup_epochs * train.steps,
    )
    with train.strategy.scope():
        compile_model(model, schedule, cfg.weight_decay)
    stop = EarlyStop(cfg.patience, cfg.min_delta)
    history = fit_epochs(
        model,
        train,
        val,
        class_weight_table(weights, int(model.output_shape[-1])),
        phase.first_epoch,
        phase.first_epoch + phase.epochs,
        [stop, *callbacks],  # EarlyStop first: it adds learning_rate to the logs
    )
    if stop.stopped_epoch is not None:
        log.info(
            "early stop after epoch %d: no val_loss gain over %g in %d epochs; weights of "
            "epoch %d kept",
            stop.stopped_epoch + 1, cfg.min_delta, cfg.patience, (stop.best_epoch or 0) + 1,
        )  # fmt: skip
    return history_rows(history, phase)


def history_rows(history: dict[str, list[float]], phase: Phase) -> list[dict[str, Any]]:
    """Keras' ``History.history`` as rows: ``epoch`` (from 1, across phases), ``phase``, the
    logged metrics, and ``lr`` (the learning rate of the epoch's last step)."""
    metrics = {k: v for k, v in history.items() if k != "learning_rate"}
    return [
        {
            "epoch": phase.first_epoch + i + 1,
            "phase": phase.name,
            **{k: float(v[i]) for k, v in metrics.items()},
            "lr": float(history["learning_rate"][i]),
        }
        for i in range(len(history["loss"]))
    ]


def fit(
    model: Any,
    train_ds: Batches,
    val_ds: Any,
    cfg: Train,
    weights: dict[int, float] | None,
    callbacks: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Phase 1 (the head, or everything for a non-pretrained backbone), then the optional
    fine-tune phase (:func:`fine_tune`). Each phase: AdamW with ``train.weight_decay``, the
    learning rate of ``train.lr_schedule`` (cosine: ``train.warmup_epochs`` of linear
    warm-up, then cosine decay to 0 at the phase's last epoch, per step), early stopping on
    ``val_loss`` (``train.patience`` epochs without a gain over ``train.min_delta``) with the
    lowest-``val_loss`` weights restored. Returns one row per epoch (:func:`history_rows`).
    """
    rows = fit_phase(
        model, train_ds, val_ds, cfg, Phase("train", cfg.learning_rate, 0, cfg.epochs), weights,
        callbacks,
    )  # fmt: skip
    if cfg.fine_tune_epochs > 0:
        rows += fine_tune(model, train_ds, val_ds, cfg, weights, callbacks, rows)
    return rows


def fine_tune(
    model: Any,
    train_ds: Batches,
    val_ds: Any,
    cfg: Train,
    weights: dict[int, float] | None,
    callbacks: Sequence[Any],
    before: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Unfreeze the top ``train.fine_tune_layers`` of a pretrained (frozen) backbone and fit
    ``train.fine_tune_epochs`` more at ``train.fine_tune_learning_rate``; the phase is undone
    (weights of ``before``, the history so far) when its lowest ``val_loss`` is no better.
    A backbone trained from the start has nothing frozen to tune: skipped, no rows."""
    from imgclf.pipeline.model import BACKBONE_LAYER, unfreeze_top

    if model.get_layer(BACKBONE_LAYER).trainable:  # build_model freezes loaded weights only
        log.info("fine-tune skipped: the backbone was trained from the start (no frozen part)")
        return []
    best = best_row(before)["val_loss"]
    saved = model.get_weights()
    n = unfreeze_top(model, cfg.fine_tune_layers)
    log.info("fine-tune: %d layers of %s unfrozen", n, BACKBONE_LAYER)
    phase = Phase("fine_tune", cfg.fine_tune_learning_rate, len(before), cfg.fine_tune_epochs)
    rows = fit_phase(model, train_ds, val_ds, cfg, phase, weights, callbacks)
    if not best_row(rows)["val_loss"] < best:
        log.info("fine-tune did not improve val_loss (%.4f); phase-1 weights kept", best)
        model.set_weights(saved)
    return rows


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The epoch with the lowest ``val_loss`` (the weights kept: early stopping restores
    them, and a fine-tune phase is kept only when its lowest beats phase 1's)."""
    return min(rows, key=lambda r: r["val_loss"])


def train_summary(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """``metrics/train.json``: epochs run and the best epoch."""
    return {"epochs_run": len(rows), "best_epoch": int(best_row(rows)["epoch"])}


# Keras' log names -> MLflow's: each says its split (MLflow also holds report's test_*)
MLFLOW_EPOCH_NAMES = {"accuracy": "train_accuracy", "loss": "train_loss"}


def mlflow_epoch_metrics(logs: dict[str, Any]) -> dict[str, float]:
    """An epoch's Keras logs as MLflow metrics: ``train_accuracy``, ``train_loss``,
    ``val_accuracy``, ``val_loss``, ``learning_rate`` (DVCLive keeps Keras' names)."""
    return {MLFLOW_EPOCH_NAMES.get(k, k): float(v) for k, v in logs.items()}


def mlflow_epochs(run: Any) -> Any:
    """A Keras callback logging each epoch's metrics (:func:`mlflow_epoch_metrics`) to the
    MLflow ``run`` (step = epoch, from 1) as the training goes."""
    import keras

    def log_epoch(epoch: int, logs: dict[str, Any] | None) -> None:
        run.log_metrics(mlflow_epoch_metrics(logs or {}), step=epoch + 1)

    return keras.callbacks.LambdaCallback(on_epoch_end=log_epoch)


@contextmanager
def dvclive_history(directory: Path) -> Iterator[Any]:
    """DVCLive's Keras callback, writing each epoch's logs into ``directory`` (see the
    module docstring), ``step`` = epoch from 1 as in Keras' log and ``train.json``.

    DVCLive neither writes a ``dvc.yaml`` (the project's declares the plots) nor saves a
    DVC experiment, and its files hold no timestamp (byte-stable outputs). Open it before
    seeding: it draws a random experiment name.
    """
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback

    with Live(str(directory), dvcyaml=False, save_dvc_exp=False) as live:
        live.step = 1
        yield DVCLiveCallback(live=live)


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
    write_bytes(path, out.getvalue())


def candidate_metadata(
    data: TrainingData, decode: DecodeOptions, backbone: str, params_digest: str, dhash: str
) -> dict[str, Any]:
    """``models/candidate/metadata.json``: what ``report`` and ``promote`` need beside the
    model (classes, input size, decode settings) and what it was trained from."""
    return {
        "class_names": data.class_names,
        "class_counts": dict(sorted(Counter(data.train.labels).items())),
        "image_size": decode.size,
        "decode": decode.to_dict(),
        "backbone": backbone,
        "params_digest": params_digest,
        "data_hash": dhash,
    }


def train_candidate(
    data: TrainingData,
    size: int,
    cfg: Train,
    seed: int,
    strategy: Any,
    callbacks: Sequence[Any] = (),
) -> tuple[Any, list[dict[str, Any]], float]:
    """Build the model of ``cfg`` for ``size`` px under ``strategy`` (``train.distribute``)
    and ``train.mixed_precision``, and fit it on ``data`` (seeded), with ``callbacks``.
    Returns the model as it is saved (float32 layers, BatchNorm unsynchronised: the same
    file whatever the strategy or precision), the history rows and the seconds the fit
    took."""
    from imgclf.pipeline.model import build_from_params, precision, synchronize_batch_norm

    seed_everything(seed)
    root = PATHS.root
    train = batches(
        strategy, data.train.files(root), data.y_train, size, cfg.batch_size, True, seed
    )
    val = make_dataset(data.val.files(root), data.y_val, size, cfg.batch_size)
    with precision(cfg.mixed_precision), strategy.scope():
        model = build_from_params(size, len(data.class_names), cfg, seed)
    synchronize_batch_norm(model, strategy.num_replicas_in_sync > 1)
    log.info("model %s: %d parameters", model.name, model.count_params())
    weights = class_weights(data.y_train, len(data.class_names), cfg.class_weight)
    start = time.perf_counter()
    rows = fit(model, train, val, cfg, weights, callbacks)
    seconds = time.perf_counter() - start
    synchronize_batch_norm(model, False)
    if cfg.mixed_precision != "none":  # the saved model computes in float32
        with precision("none"):
            saved = build_from_params(size, len(data.class_names), cfg, seed)
        saved.set_weights(model.get_weights())
        model = saved
    return model, rows, seconds


def write_candidate(model: Any, metadata: dict[str, Any]) -> list[Path]:
    """``models/candidate/``: the model, its metadata and (where Graphviz is installed) its
    picture; returns the files written."""
    from imgclf.pipeline.architecture import draw_if_possible

    PATHS.candidate.mkdir(parents=True, exist_ok=True)
    save_model(model, PATHS.model_file)
    written = [write_json(PATHS.model_metadata, metadata)]
    picture = draw_if_possible(model, PATHS.candidate / "model.png")
    log.info("wrote the candidate %s", PATHS.candidate.relative_to(PATHS.root))
    return written + ([picture] if picture else [])


def log_training(
    run: Any, rows: Sequence[dict[str, Any]], seconds: float, n_images: int, files: list[Path]
) -> None:
    """The log line and the MLflow summary of a training: epochs, best epoch and its val
    figures, time and speed; ``files`` as artifacts under ``train/``."""
    best = best_row(rows)
    speed = n_images * len(rows) / seconds
    log.info(
        "trained %d epochs in %.1f s (%.0f images/s); best epoch %d: val_loss %.4f, "
        "val_accuracy %.4f",
        len(rows), seconds, speed, best["epoch"], best["val_loss"], best["val_accuracy"],
    )  # fmt: skip
    run.log_metrics(
        train_summary(rows)
        | {"best_val_loss": best["val_loss"], "best_val_accuracy": best["val_accuracy"]}
        | {"train_seconds": seconds, "train_images_per_second": speed}
    )
    for path in files:  # a folder is logged as <artifact path>/<its name>/...
        run.log_artifact(path, None if path.is_dir() else "train")


def lost_worker(exc: BaseException, who: str) -> str:
    """The one-line error of a multi_worker training whose cluster lost a worker."""
    lines = [line.strip() for line in str(getattr(exc, "message", exc)).splitlines()]
    said = next((x for x in lines if "aborted by" in x), next((x for x in lines if x), ""))
    return f"multi_worker training stopped: {who} ({said}); nothing written"


def train_and_write(
    params: Params, data: TrainingData, exclude: frozenset[str], strategy: Any
) -> None:
    """The chief: one MLflow run, DVCLive's history, the candidate and its metrics."""
    from imgclf import tracking

    cfg, decode = params.train, DecodeOptions.from_params(params.preprocess)
    lists = [PATHS.split_list(side) for side in SIDES]
    logged = params.model_dump(include=set(LOGGED_SECTIONS))
    dhash, pdigest = data_hash(lists, decode, exclude), digest(logged)
    history = PATHS.metrics / "train"  # a folder named train: MLflow artifacts train/...
    run, name, commit = tracking.start_run(
        params.mlflow.experiment, dhash, {"params_digest": pdigest}
    )
    with tracking.taken(run):
        run.log_params(tracking.flatten(logged))
        with dvclive_history(history) as live:
            model, rows, seconds = train_candidate(
                data, decode.size, cfg, params.train_seed, strategy, [mlflow_epochs(run), live]
            )
        metadata = candidate_metadata(data, decode, cfg.backbone, pdigest, dhash)
        files = write_candidate(model, metadata)
        write_json(PATHS.metrics / "train.json", train_summary(rows))
        tracking.write_run_link(run, name, dhash, commit)
        log_training(run, rows, seconds, len(data.y_train), [*files, history])
    tracking.check_required(run, params.mlflow.required)


@stage_main
def main() -> None:
    params = load_params()
    setup_logging(params.base.log_level)
    cfg = params.train
    exclude = excluded_paths(PATHS.audit / "label_issues.csv", params.audit.exclude)
    data = load_training_data(PATHS.split_list("train"), PATHS.split_list("val"), exclude)
    launch = cfg.distribute == "multi_worker" and not os.environ.get(TF_CONFIG)
    command = [sys.executable, "-m", "imgclf.pipeline.train"]
    with local_cluster(
        cfg.workers if launch else 1, command, PATHS.cache / "train-workers"
    ) as cluster:
        multi = cfg.distribute == "multi_worker"
        role = cluster_role(os.environ.get(TF_CONFIG)) if multi else Role(0, 1, True)
        watch_parent()
        import_tensorflow()
        strategy = make_strategy(cfg.distribute, role)
        try:
            if role.chief:
                train_and_write(params, data, exclude, strategy)
            else:  # the chief alone writes
                train_candidate(data, params.preprocess.size, cfg, params.train_seed, strategy)
        except Exception as exc:
            if not (multi and lost_worker_error(exc)):
                raise
            dead = cluster.dead() if cluster else None
            who = dead.describe() if dead else "a worker is gone"
            if cluster:
                cluster.stop()
            # TensorFlow's collectives are broken now: its thread pools fail as they are
            # collected ("Exception ignored ... Bad file descriptor") and a normal exit can
            # hang; say why in one line and leave at once
            sys.unraisablehook = lambda _: None
            print(f"error: {lost_worker(exc, who)}", file=sys.stderr, flush=True)
            logging.shutdown()
            os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
