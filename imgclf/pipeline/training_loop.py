"""The one training step of every ``train.distribute`` mode: ``strategy.run`` inside a
``tf.function``, over a distributed dataset, on the Keras model.

Why not ``model.fit``: under ``MultiWorkerMirroredStrategy`` Keras 3's ``fit`` fails
("Attempt to convert a value (PerReplica...) to a Tensor", keras-team/keras#20585), and
TensorFlow's documented way round is this custom step. Using it for all three modes keeps
one training path: ``none`` is the same loop on TensorFlow's default strategy.

What a step computes is what ``fit`` computed: Keras' own ``model.compute_loss`` (the
compiled sparse categorical cross-entropy, each example weighted by its class weight
(``train.class_weight``), the model's own losses), rescaled from the replica's mean to its
share of the *global* batch (so a replica with a short or empty last batch counts right;
exactly 1 with one replica); AdamW of :func:`imgclf.pipeline.model.compile_model` applies
the gradients, summed across replicas by Keras' optimizer; a ``mixed_float16`` model gets
the loss scaling ``compile`` wrapped around it. Training figures (``loss``,
``accuracy``) are sums reduced across replicas; validation is not distributed: every
worker scores the whole (small) validation set locally with the same weights. So every
worker sees the same epoch figures and makes the same early-stopping decision.

Shuffle order: a ``tf.data`` shuffle draws a new order for each iterator made, and Keras'
``fit`` makes two per epoch (one it uses, and one at the epoch's end that it drops), so
epoch ``e`` trained on the ``2e - 1``-th order. :func:`fit_epochs` makes the same unused
iterator, so a single worker sees the batches of the ``fit``-based trainer of earlier
versions in the same order and, where the batches divide the data, ends with the same
weights bit for bit (tested); a short last batch differs by float rounding (1e-7).

Data (:func:`batches`): each worker builds the same seeded, shuffled stream and keeps
every ``n``-th element (``n`` = input pipelines), batched per replica; so step ``k`` of a
2-worker run sees exactly the images of step ``k`` of a 1-worker run with the same global
``train.batch_size``, split in halves.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgclf.pipeline.dataset import make_dataset

log = logging.getLogger(__name__)

METRICS = ("accuracy", "loss", "val_accuracy", "val_loss")  # the order of Keras' history


@dataclass(frozen=True)
class Batches:
    """A distributed dataset and how many global batches one pass holds."""

    strategy: Any
    dataset: Any
    steps: int


def batches(
    strategy: Any,
    paths: Sequence[str],
    labels: np.ndarray,
    image_size: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> Batches:
    """:func:`imgclf.pipeline.dataset.make_dataset` on every input pipeline of
    ``strategy``: global ``batch_size``, each replica's share of every global batch.
    ``batch_size`` must be a multiple of the replicas (a :class:`ValueError` says so).
    With several replicas, each pass leaves out its last ``len(paths) % batch_size``
    images (different ones each epoch, after the shuffle), so that every replica gets a
    full share of every step: TensorFlow cannot hand a replica an empty batch."""
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(
            f"train.batch_size {batch_size} must be a multiple of the {replicas} replicas "
            "training in sync"
        )
    whole = len(paths) - len(paths) % batch_size if replicas > 1 else len(paths)
    if whole == 0:
        raise ValueError(
            f"{len(paths)} training images do not fill one batch of {batch_size} for "
            f"{replicas} replicas: lower train.batch_size"
        )

    def pipeline(context: tf.distribute.InputContext) -> Any:
        return make_dataset(
            paths, labels, image_size, context.get_per_replica_batch_size(batch_size),
            shuffle, seed, shards=context.num_input_pipelines,
            shard=context.input_pipeline_id, take=whole,
        )  # fmt: skip

    dataset = strategy.distribute_datasets_from_function(pipeline)
    return Batches(strategy, dataset, math.ceil(whole / batch_size))


def class_weight_table(weights: dict[int, float] | None, num_classes: int) -> np.ndarray:
    """Per-class weights as a vector (all ones without weighting)."""
    table = np.ones(num_classes, dtype=np.float32)
    for index, weight in (weights or {}).items():
        table[index] = weight
    return table


class Steps:
    """The compiled train and eval steps of ``model`` under ``strategy`` (built under its
    scope, compiled with :func:`imgclf.pipeline.model.compile_model`)."""

    def __init__(self, model: Any, strategy: Any, class_weights: np.ndarray) -> None:
        import keras
        import tensorflow as tf

        table = tf.constant(class_weights, tf.float32)
        optimizer = model.optimizer
        with strategy.scope():  # its variables before tracing, as fit does (mirrored ones)
            optimizer.build(model.trainable_variables)

        def counted(y: Any) -> tuple[Any, Any]:
            local = tf.cast(tf.shape(y)[0], tf.float32)
            total = tf.distribute.get_replica_context().all_reduce("SUM", local)
            return local, total

        def sums(probs: Any, y: Any, per_example: Any) -> Any:
            correct = tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), y), tf.float32)
            return tf.stack(
                [
                    tf.reduce_sum(per_example),
                    tf.reduce_sum(correct),
                    tf.cast(tf.size(y), tf.float32),
                ]
            )

        def train_replica(x: Any, y: Any) -> Any:
            y = tf.cast(y, tf.int32)
            local, total = counted(y)
            weight = tf.gather(table, y)
            with tf.GradientTape() as tape:
                probs = model(x, training=True)
                # Keras' own loss of fit (compiled loss, sample weights, the model's own
                # losses, divided by the replicas), rescaled from this replica's mean to
                # its share of the global batch's: exact 1.0 for a single replica
                loss = model.compute_loss(x, y, probs, weight, training=True)
                share = local * strategy.num_replicas_in_sync / tf.maximum(total, 1.0)
                objective = optimizer.scale_loss(loss * tf.cast(share, loss.dtype))
            variables = model.trainable_variables
            grads = tape.gradient(objective, variables)
            optimizer.apply_gradients(zip(grads, variables, strict=True))
            per_example = keras.losses.sparse_categorical_crossentropy(y, probs)
            return sums(tf.cast(probs, tf.float32), y, tf.cast(per_example, tf.float32) * weight)

        @tf.function
        def train_step(x: Any, y: Any) -> Any:
            return strategy.reduce("SUM", strategy.run(train_replica, args=(x, y)), axis=None)

        @tf.function
        def eval_step(x: Any, y: Any) -> Any:  # local: every worker scores the whole set
            y = tf.cast(y, tf.int32)
            probs = tf.cast(model(x, training=False), tf.float32)
            return sums(probs, y, keras.losses.sparse_categorical_crossentropy(y, probs))

        self.train_step, self.eval_step = train_step, eval_step

    def run_pass(self, data: Any, train: bool) -> tuple[float, float]:
        """One pass over ``data`` (training: :class:`Batches`, every replica's examples;
        validation: a plain ``tf.data`` dataset each worker scores whole): (mean loss,
        accuracy); the training loss is class-weighted, as ``fit`` reported it."""
        step = self.train_step if train else self.eval_step
        total = np.zeros(3)
        for x, y in data.dataset if train else data:
            total += step(x, y).numpy()
        if total[2] == 0:
            raise ValueError("an empty pass: no examples in the dataset")
        return float(total[0] / total[2]), float(total[1] / total[2])


def fit_epochs(
    model: Any,
    train: Batches,
    val: Any,
    class_weights: np.ndarray,
    first_epoch: int,
    last_epoch: int,
    callbacks: Sequence[Any] = (),
) -> dict[str, list[float]]:
    """Epochs ``first_epoch`` .. ``last_epoch - 1`` (counted from 0, as Keras does), each
    a training pass over ``train`` and a validation pass over ``val`` (a plain ``tf.data``
    dataset of :func:`imgclf.pipeline.dataset.make_dataset`), ``callbacks`` called as
    ``fit`` calls them (``model.stop_training`` ends the loop). Returns the history: each
    epoch's logs after the callbacks ran (so what they added, such as the learning rate,
    is in it)."""
    import keras

    steps = Steps(model, train.strategy, class_weights)
    history = keras.callbacks.History()  # last: it records the logs the others changed
    hooks = keras.callbacks.CallbackList([*callbacks, history], model=model)
    model.stop_training = False
    hooks.on_train_begin()
    for epoch in range(first_epoch, last_epoch):
        hooks.on_epoch_begin(epoch)
        start = time.perf_counter()
        loss, accuracy = steps.run_pass(train, True)
        iter(train.dataset)  # unused, as fit's: see "Shuffle order" above
        val_loss, val_accuracy = steps.run_pass(val, False)
        logs = dict(zip(METRICS, (accuracy, loss, val_accuracy, val_loss), strict=True))
        hooks.on_epoch_end(epoch, logs)
        log.info(
            "epoch %d/%d - %.1f s - %s",
            epoch + 1, last_epoch, time.perf_counter() - start,
            " - ".join(f"{k}: {v[-1]:.4g}" for k, v in history.history.items()),
        )  # fmt: skip
        if model.stop_training:
            break
    hooks.on_train_end()
    return {key: [float(v) for v in values] for key, values in history.history.items()}
