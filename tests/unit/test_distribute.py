"""``train.distribute``: roles from TF_CONFIG, the local launcher's supervision, the
params' checks, and the one training step on a strategy of several replicas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from imgclf.config import PATHS, StageError, load_params
from imgclf.params import Params, ParamsError, validate
from imgclf.pipeline import distribute as dist
from imgclf.pipeline import model as mdl
from imgclf.pipeline import train as trn
from imgclf.pipeline.training_loop import batches

PARAMS = load_params(PATHS.params)


def config(kind: str, index: int, cluster: dict) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})


def test_roles_from_tf_config():
    assert dist.cluster_role(None) == dist.Role(0, 1, True)
    workers = {"worker": ["a:1", "b:2", "c:3"]}
    assert dist.cluster_role(config("worker", 0, workers)) == dist.Role(0, 3, True)
    assert dist.cluster_role(config("worker", 2, workers)) == dist.Role(2, 3, False)
    with_chief = {"chief": ["a:1"], "worker": ["b:2", "c:3"]}
    assert dist.cluster_role(config("chief", 0, with_chief)) == dist.Role(0, 3, True)
    assert dist.cluster_role(config("worker", 0, with_chief)) == dist.Role(1, 3, False)
    assert dist.cluster_role(dist.tf_config(["h:1", "h:2"], 1)) == dist.Role(1, 2, False)
    assert dist.Role(1, 2, False).name == "worker 1" and dist.Role(0, 2, True).name == "chief"


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("{not json", "TF_CONFIG is not a usable cluster spec (JSONDecodeError"),
        ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG is not a usable cluster spec (KeyError"),
        (config("worker", 2, {"worker": ["a:1", "b:2"]}), "task worker:2 is not in its cluster"),
        (config("ps", 0, {"worker": ["a:1"]}), "task ps:0 is not in its cluster"),
        (config("ps", 0, {"worker": ["a:1"], "ps": ["b:2"]}), "chief and worker tasks only"),
    ],
)
def test_a_bad_tf_config_is_one_line_naming_it(value, said):
    with pytest.raises(StageError, match="TF_CONFIG") as err:
        dist.cluster_role(value)
    assert said in str(err.value) and "\n" not in str(err.value)


def test_workers_need_multi_worker_in_params():
    raw = PARAMS.model_dump()
    raw["train"] |= {"workers": 2}
    with pytest.raises(ParamsError) as err:
        validate(raw, Params, "params.yaml")
    assert str(err.value) == (
        "params.yaml: train.workers: 2 local workers need distribute: multi_worker "
        "(distribute is none)"
    )
    raw["train"] |= {"distribute": "multi_worker"}
    assert validate(raw, Params, "params.yaml").train.workers == 2
    raw["train"] |= {"distribute": "horovod"}
    with pytest.raises(ParamsError, match=r"train\.distribute"):
        validate(raw, Params, "params.yaml")


def test_exit_descriptions():
    assert dist.exit_description(-9) == "was killed by SIGKILL"
    assert dist.exit_description(3) == "exited with status 3"


PRINT_CONFIG = "import os, sys; print(os.environ['TF_CONFIG']); sys.exit(int(sys.argv[1]))"


def test_local_cluster_gives_each_worker_its_tf_config(tmp_path):
    command = [sys.executable, "-c", PRINT_CONFIG, "0"]
    assert "TF_CONFIG" not in os.environ
    with dist.local_cluster(3, command, tmp_path) as cluster:
        mine = dist.cluster_role(os.environ["TF_CONFIG"])
        addresses = json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]
    assert "TF_CONFIG" not in os.environ
    assert mine == dist.Role(0, 3, True)
    assert len(set(addresses)) == 3 and all(a.startswith("127.0.0.1:") for a in addresses)
    assert [w.index for w in cluster.workers] == [1, 2]
    for index in (1, 2):
        said = (tmp_path / f"worker-{index}.log").read_text().strip()
        assert json.loads(said) == json.loads(dist.tf_config(addresses, index))
    with dist.local_cluster(1, command, tmp_path / "none") as nothing:
        assert nothing is None and "TF_CONFIG" not in os.environ


def test_a_worker_that_fails_fails_the_chief_with_its_log(tmp_path):
    with (
        pytest.raises(StageError) as err,
        dist.local_cluster(2, [sys.executable, "-c", PRINT_CONFIG, "3"], tmp_path) as cluster,
    ):
        pass
    pid = cluster.workers[0].process.pid
    assert str(err.value) == (
        f"training worker 1 (pid {pid}) exited with status 3; its log: {tmp_path}/worker-1.log"
    )


def test_the_chief_raising_stops_the_workers(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    with (
        pytest.raises(RuntimeError, match="chief failed"),
        dist.local_cluster(2, sleeper, tmp_path) as cluster,
    ):
        raise RuntimeError("chief failed")
    assert cluster.workers[0].process.returncode == -15  # SIGTERM, not left running


def test_the_watcher_names_a_killed_worker(tmp_path, caplog):
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    with (
        pytest.raises(StageError, match="was killed by SIGKILL"),
        dist.local_cluster(2, sleeper, tmp_path) as cluster,
    ):
        cluster.workers[0].process.kill()
        deadline = time.monotonic() + 10
        while cluster.failed is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cluster.failed is cluster.workers[0]
    assert "training worker 1" in caplog.text and "was killed by SIGKILL" in caplog.text


def test_a_worker_whose_launcher_is_gone_exits(tmp_path):
    code = (
        "import time; from imgclf.pipeline.distribute import watch_parent; "
        "watch_parent({'IMGCLF_TRAIN_PARENT': '1'}, 0.05); time.sleep(30)"
    )  # pid 1 is not its parent: as if the launcher had died
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: the training launcher is gone; worker stopping"


SIZE = 16


def test_batch_size_must_split_over_the_replicas():
    class Two:
        num_replicas_in_sync = 2

    with pytest.raises(ValueError, match=r"train\.batch_size 9 must be a multiple of the 2"):
        batches(Two(), ["x"], np.zeros(1), SIZE, 9)


def test_batch_norm_switches_to_global_statistics_and_back():
    model = mdl.build_model(SIZE, 2, cnn_filters=(8, 16), cnn_depth=2, dropout=0.0)
    assert mdl.synchronize_batch_norm(model, True) == 3  # stem + two convs of stage 1
    norms = [x for x in mdl.walk_layers(model) if isinstance(x, keras.layers.BatchNormalization)]
    assert [n.synchronized for n in norms] == [True, True, True]
    mdl.synchronize_batch_norm(model, False)
    assert not any(n.get_config()["synchronized"] for n in norms)


def test_mixed_precision_trains_and_the_saved_model_is_float32(tmp_path, monkeypatch):
    from tests.unit.test_train import write_images

    paths, labels = write_images(tmp_path / "img", per_class=12)
    rel = [os.path.relpath(p, PATHS.root) for p in paths]
    y = np.array([0 if x == "a" else 1 for x in labels], dtype=np.int32)
    data = trn.TrainingData(
        ["a", "b"], trn.SplitList(rel, labels), trn.SplitList(rel, labels), y, y
    )
    cfg = PARAMS.train.model_copy(
        update={
            "epochs": 2,
            "batch_size": 8,
            "cnn_filters": [8, 16],
            "mixed_precision": "mixed_float16",
        }
    )
    strategy = tf.distribute.get_strategy()
    model, rows, _ = trn.train_candidate(data, SIZE, cfg, 3, strategy)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows)
    policies = {layer.dtype_policy.name for layer in mdl.walk_layers(model)}
    assert policies == {"float32"}
    assert keras.config.dtype_policy().name == "float32"  # the global policy restored
