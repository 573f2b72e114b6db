"""Several processes writing to one fresh SQLite MLflow store at once (as queued
experiments do): the store lock and the "database is locked" retries under real contention."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from imgclf import tracking

WORKERS = 3
STEPS = 25


def _worker(uri: str, name: str, pending: str, queue) -> None:
    """One process: a run with many small writes (what a training epoch loop does)."""
    try:
        r = tracking.Run.start(uri, "concurrency", name, Path(pending), run_name=name)
        r.log_params({"worker": name})
        for step in range(STEPS):
            r.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        r.end()
        queue.put((name, r.ok, r.error))
    except Exception as exc:  # report, do not hang the parent
        queue.put((name, False, repr(exc)))


def test_concurrent_processes_share_one_fresh_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pending = tmp_path / "pending"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    names = [f"w{i}" for i in range(WORKERS)]
    procs = [ctx.Process(target=_worker, args=(uri, n, str(pending), queue)) for n in names]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == [(n, True, None) for n in names]
    assert not pending.exists()  # nothing went offline
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("concurrency")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == names
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.params == {"worker": r.info.run_name}
        history = client.get_metric_history(r.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(STEPS))
