"""Two replicas in one process (two logical CPUs, ``MirroredStrategy``) train exactly as one
replica on the same global batches: the per-replica data split, the loss's share of the
global batch and BatchNorm's global statistics. One fresh interpreter runs every case
(logical devices must be set before TensorFlow starts)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from imgclf.config import PATHS

SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from imgclf.pipeline import model as mdl, train as trn
from imgclf.pipeline.dataset import make_dataset
from imgclf.pipeline.training_loop import batches, class_weight_table, fit_epochs
from tests.unit.test_train import write_images
from pathlib import Path

all_paths, all_labels = write_images(Path(sys.argv[1]), per_class=24)
two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

def history(strategy, n, sync):
    # n = 40: five global batches of 8; 41: one more image, which two replicas leave out
    paths, labels = all_paths[:n], all_labels[:n]
    y = np.array([0 if x == "a" else 1 for x in labels], dtype=np.int32)
    weights = class_weight_table(trn.class_weights(y, 2, "auto"), 2)
    trn.seed_everything(3)
    with strategy.scope():
        model = mdl.build_model(16, 2, cnn_filters=(8, 16), cnn_depth=1, dropout=0.0)
        mdl.compile_model(model, 3e-3, 0.02)
    if sync:
        mdl.synchronize_batch_norm(model, strategy.num_replicas_in_sync > 1)
    train = batches(strategy, paths, y, 16, 8, True, 5)
    val = make_dataset(paths, y, 16, 8)
    return fit_epochs(model, train, val, weights, 0, 3) | {"steps": [train.steps]}

one = tf.distribute.get_strategy()
print(json.dumps({
    "replicas": two.num_replicas_in_sync,
    "one": history(one, 40, True), "two": history(two, 40, True),
    "two_local": history(two, 40, False),
    "one_41": history(one, 41, True), "two_41": history(two, 41, True),
}))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path_factory.mktemp("replicas"))],
        cwd=PATHS.root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_replicas_train_as_one_on_the_same_global_batches(runs):
    assert runs["replicas"] == 2
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert runs["two"][key] == pytest.approx(runs["one"][key], rel=1e-4, abs=1e-6), key


def test_a_short_last_batch_is_left_out_with_several_replicas(runs):
    """41 images, batch 8: one replica alone trains on the 41st; two leave it out (each
    epoch another one, after the shuffle) rather than hand a replica an empty batch."""
    assert runs["one_41"]["steps"] == [6] and runs["two_41"]["steps"] == [5]
    assert all(np.isfinite(runs["two_41"]["loss"]))


def test_without_global_batchnorm_statistics_they_do_not(runs):
    """The control: per-replica BatchNorm statistics change the training."""
    assert runs["two_local"]["loss"] != pytest.approx(runs["one"]["loss"], rel=1e-3)
