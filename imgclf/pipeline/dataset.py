"""The input pipeline ``train`` and ``report`` share: split lists in, ``tf.data`` batches out.

A split list (``data/split/{train,val,test}.csv``: ``path,label,sha256``, paths relative to
the project root) is read by :func:`read_list`; its labels become class indices with
:func:`encode_labels`; :func:`make_dataset` streams the stored JPEGs, decoded as serving
decodes them (:func:`imgclf.imaging.decode_stored_jpeg`), as float32 0-255 batches.
:func:`data_hash` names the data a model was trained on.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.imaging import DecodeOptions, decode_stored_jpeg
from imgclf.pipeline.stage_outputs import require


@dataclass(frozen=True)
class SplitList:
    """One side of the split: image paths as listed (relative to the root) and labels."""

    paths: list[str]
    labels: list[str]

    def files(self, root: Path) -> list[str]:
        """The images' paths under ``root`` (what :func:`make_dataset` reads)."""
        return [f"{root}/{path}" for path in self.paths]


def read_list(path: Path, exclude: frozenset[str] = frozenset()) -> SplitList:
    """The paths and labels of a split list, without the paths in ``exclude`` (a missing
    list says which stage to run)."""
    require(path, written_by="split")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["path"] not in exclude]
    return SplitList([r["path"] for r in rows], [r["label"] for r in rows])


def encode_labels(labels: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """Class indices of ``labels``; a label outside ``class_names`` is a ``ValueError``."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"labels not among the training classes {list(class_names)}: {unknown}")
    return np.array([index[label] for label in labels], dtype=np.int32)


def data_hash(
    files: Sequence[Path], decode: DecodeOptions, exclude: frozenset[str] = frozenset()
) -> str:
    """SHA-256 (16 hex digits) over the split lists (every raw image's content hash and
    side), the decode settings that turned raw images into training pixels, and the paths
    left out of training (``audit.exclude``; none adds nothing, so hashes of runs without
    exclusions are unchanged)."""
    h = hashlib.sha256(json.dumps(decode.to_dict(), sort_keys=True).encode())
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    if exclude:
        h.update(b"exclude\0" + "\n".join(sorted(exclude)).encode())
    return h.hexdigest()[:16]


def make_dataset(
    paths: Sequence[str],
    labels: np.ndarray,
    image_size: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    cache: bool = True,
    shards: int = 1,
    shard: int = 0,
    take: int | None = None,
) -> Any:
    """``tf.data`` pipeline of ``(float32 pixels 0-255, label)`` batches.

    Decoding runs in parallel (deterministic order); ``cache`` keeps decoded uint8 images in
    memory after the first pass; ``shuffle`` reshuffles each epoch from ``seed``. With
    ``take`` the (shuffled) stream stops after that many images, and with ``shards`` > 1 it
    keeps every ``shards``-th image from ``shard`` on, before batching: the input pipeline
    of one worker of a distributed training. An image
    that is not ``image_size`` square fails the pipeline when it is read.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, dtype=np.int32)))

    def load(path: Any, label: Any) -> tuple[Any, Any]:
        img = decode_stored_jpeg(tf.io.read_file(path))
        return tf.ensure_shape(img, (image_size, image_size, 3)), label

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    if take is not None and take < len(paths):
        ds = ds.take(take)
    if shards > 1:
        ds = ds.shard(shards, shard)
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    return ds.prefetch(tf.data.AUTOTUNE)


def predict_probs(model: Any, files: Sequence[str], image_size: int, batch_size: int) -> np.ndarray:
    """Class probabilities of the stored images at ``files``, streamed batch by batch."""
    if not files:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    labels = np.zeros(len(files), np.int32)
    ds = make_dataset(files, labels, image_size, batch_size, cache=False)
    return model.predict(ds.map(lambda x, _y: x), verbose=0)
