"""``train.distribute: multi_worker`` for real: two worker processes on loopback train the
bundled sample together (MultiWorkerMirroredStrategy over gRPC) against one worker with the
same seed; a worker killed mid-training fails the stage in one line, writing nothing."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from imgclf.files import file_md5
from imgclf.testing.project import dvc, env, make_repo, python, set_params

EPOCHS = 8
MODEL = Path("models/candidate/model.keras")
WORKER_LOG = Path(".cache/train-workers/worker-1.log")
TWO = {"train.distribute": "multi_worker", "train.workers": 2}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The whole bundled sample (1,797 digits), preprocessed and split."""
    repo = make_repo(tmp_path_factory.mktemp("dist") / "repo", per_digit=None)
    set_params(repo, {"train.epochs": EPOCHS, "train.patience": EPOCHS})
    dvc(repo, "repro", "split")
    return repo


def accuracy_on_test(repo: Path, model: Path) -> float:
    """A model's accuracy on the repository's test split, computed here."""
    import keras

    from imgclf.pipeline.dataset import encode_labels, make_dataset, read_list

    listed = read_list(repo / "data/split/test.csv")
    names = sorted(set(read_list(repo / "data/split/train.csv").labels))
    y = encode_labels(listed.labels, names)
    batches = make_dataset(listed.files(repo), y, 32, 128, cache=False)
    probs = keras.models.load_model(model).predict(batches, verbose=0)
    return float(np.mean(probs.argmax(axis=1) == y))


def distribute_params(repo: Path) -> list[str]:
    """``train.distribute`` of every MLflow run of the repository."""
    import mlflow  # here: imported at collection, it would fix MLflow's log level early

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return sorted(r.data.params["train.distribute"] for r in client.search_runs(ids))


def last_epoch(text: str) -> list[str]:
    return re.findall(rf"epoch {EPOCHS}/{EPOCHS} - [\d.]+ s - (.*)", text)


def test_two_workers_train_like_one_and_only_the_chief_writes(repo: Path, tmp_path: Path):
    python(repo, "-m", "imgclf.pipeline.train")
    single = Path(shutil.copy(repo / MODEL, tmp_path / "single.keras"))
    set_params(repo, TWO)
    chief = python(repo, "-m", "imgclf.pipeline.train").stderr
    worker = (repo / WORKER_LOG).read_text()
    assert re.search(r"started worker 1 \(pid \d+\) on 127\.0\.0\.1:\d+", chief), chief[-3000:]
    assert "multi_worker: chief of 2 workers, 2 replicas in sync" in chief
    assert "multi_worker: worker 1 of 2 workers, 2 replicas in sync" in worker
    # both trained every epoch and saw the same figures (sums reduced across the workers)
    assert len(last_epoch(chief)) == 1 and last_epoch(chief) == last_epoch(worker)
    # the chief alone wrote: one MLflow run per training, one history row per epoch
    assert distribute_params(repo) == ["multi_worker", "none"]
    history = (repo / "metrics/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(history) == 1 + EPOCHS
    assert "wrote the candidate" in chief and "wrote the candidate" not in worker
    one, two = accuracy_on_test(repo, single), accuracy_on_test(repo, repo / MODEL)
    print(f"test accuracy: 1 worker {one:.4f}, 2 workers {two:.4f}")
    assert abs(one - two) <= 0.01, (one, two)


def test_a_killed_worker_fails_the_stage_in_one_line(repo: Path):
    set_params(repo, TWO | {"train.epochs": 500, "train.patience": 500})
    before = file_md5(repo / MODEL) if (repo / MODEL).exists() else None
    chief = subprocess.Popen(
        [sys.executable, "-m", "imgclf.pipeline.train"], cwd=repo, env=env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        log, deadline = repo / WORKER_LOG, time.monotonic() + 180
        while "epoch 1/500" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline and chief.poll() is None, "training never started"
            time.sleep(0.5)
        (worker,) = psutil.Process(chief.pid).children()
        worker.kill()
        started = time.monotonic()
        _, err = chief.communicate(timeout=150)
        took = time.monotonic() - started
    finally:
        if chief.poll() is None:
            chief.kill()
    assert chief.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"error: multi_worker training stopped: worker 1 (pid {worker.pid}) was killed by "
        f"SIGKILL; its log: {log} ("
    ), last
    assert last.endswith("); nothing written")
    print(f"the chief failed {took:.1f} s after the worker was killed")
    after = file_md5(repo / MODEL) if (repo / MODEL).exists() else None
    assert after == before  # the candidate of the earlier run is untouched
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
