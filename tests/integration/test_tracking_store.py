"""Several processes writing to one fresh SQLite MLflow store at once (as queued
experiments do)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from imgclf import tracking


def _worker(uri: str, name: str, n: int, queue) -> None:
    """One process: a run with many small writes (what a training epoch loop does)."""
    try:
        r = tracking.Run.start(uri, "concurrency", name, Path("/nonexistent-pending"))
        r.log_params({"worker": name})
        for step in range(n):
            r.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        r.end()
        queue.put((name, r.ok, r.run_id, r.error))
    except Exception as exc:  # report, do not hang the parent
        queue.put((name, False, None, repr(exc)))


def test_concurrent_processes_share_one_fresh_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(uri, f"w{i}", 25, queue)) for i in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(ok for _, ok, _, _ in results), results
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("concurrency")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 25
