"""MLflow tracking (real MLflow, SQLite) and the whole pipeline in a temporary git+DVC repo."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from dvcrepo import commit, dvc, make_repo, ran, run
from stages import tracking
from stages.config import Paths

# -- unit ----------------------------------------------------------------------------------


def test_tracking_uri_env_overrides_and_default_is_the_workspace(tmp_path):
    assert tracking.tracking_uri({"MLFLOW_TRACKING_URI": "http://x:5000"}) == "http://x:5000"
    queued = Paths(tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12").workspace
    assert queued == tmp_path / "repo"
    uri = tracking.tracking_uri({}, workspace=queued)
    assert uri == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    assert tracking.sqlite_path(uri) == tmp_path / "repo" / "mlflow.db"
    assert tracking.sqlite_path("http://x:5000") is None
    assert tracking.artifact_location(uri) == (tmp_path / "repo" / "mlartifacts").as_uri()


def test_flatten_params():
    flat = tracking.flatten({"train": {"epochs": 3, "augment": {"zoom": 0.1}}, "x": {"l": [1]}})
    assert flat == {"train.epochs": "3", "train.augment.zoom": "0.1", "x.l": "[1]"}


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


def test_unreachable_store_records_pending_and_replays(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    pending = tmp_path / "pending"
    art = tmp_path / "history.csv"
    art.write_text("epoch,loss\n1,0.5\n")
    r = tracking.Run.start("http://127.0.0.1:9", "exp", "2026-01-01T00:00:00+00:00-abc", pending)
    r.log_params({"train.epochs": "3"})
    r.log_metrics({"loss": 0.5}, step=1)
    r.log_artifact(art, "train")
    r.end()
    assert not r.ok and r.run_id is None
    assert "MLFLOW TRACKING FAILED" in caplog.text
    files = list(pending.glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["params"] == {"train.epochs": "3"}
    assert data["metrics"] == [{"key": "loss", "value": 0.5, "step": 1}]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.replay(files[0], uri)
    from mlflow import MlflowClient

    got = MlflowClient(uri).get_run(run_id)
    assert got.data.params == {"train.epochs": "3"} and got.data.metrics == {"loss": 0.5}
    assert not list(pending.glob("*.json"))


# -- integration: the whole pipeline in a temporary git + DVC repo ---------------------------

FAST = {"epochs": 3, "patience": 2, "cnn_filters": [8, 16], "cnn_dense": 16, "batch_size": 16}


def set_params(repo: Path, section: str, values: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def mlflow_runs(repo: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("imgclf")
    return client, client.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the default store: <workspace>/mlflow.db
    repo = make_repo(tmp_path_factory.mktemp("pipe") / "repo", per_digit=8)
    set_params(repo, "train", FAST)
    commit(repo, "fast params")
    proc = dvc(repo, "repro")
    assert ran(proc.stdout) == {"preprocess", "split", "train", "report"}, proc.stdout
    commit(repo, "first run")
    return repo


@pytest.mark.integration
def test_repro_outputs_and_one_mlflow_run(repo: Path):
    meta = json.loads((repo / "models" / "metadata.json").read_text())
    assert meta["class_names"] == ["safe", "sensitive"] and meta["image_size"] == 32
    assert meta["decode"]["size"] == 32 and meta["backbone"] == "small_cnn"
    op = json.loads((repo / "metrics" / "operating_point.json").read_text())
    assert op["positive_class"] == "sensitive" and 0.0 <= op["threshold"] <= 1.0
    test = json.loads((repo / "metrics" / "test.json").read_text())
    assert {"accuracy", "macro_f1", "roc_auc", "pr_auc", "per_class"} <= set(test)
    for name in ("confusion_matrix.png", "classification_report.txt"):
        assert (repo / "metrics" / "report" / name).is_file()
    assert "up to date" in dvc(repo, "status").stdout.lower()

    client, runs = mlflow_runs(repo)
    assert [r.info.run_id for r in runs] == [meta["mlflow_run_id"]]
    run_ = runs[0]
    assert run_.info.status == "FINISHED"
    assert run_.data.params["train.epochs"] == "3" and "report.target_recall" in run_.data.params
    assert run_.data.tags["data_hash"] == meta["data_hash"] and "git_commit" in run_.data.tags
    assert run_.data.tags["quality_gate"] == "passed"
    assert "test_accuracy" in run_.data.metrics and "val_loss" in run_.data.metrics
    assert len(client.get_metric_history(run_.info.run_id, "loss")) >= 1
    versions = client.search_model_versions("name='imgclf'")
    assert [v.run_id for v in versions] == [run_.info.run_id]
    plots = json.loads(dvc(repo, "plots", "show", "--json").stdout)
    assert not plots.get("errors"), plots.get("errors")
    assert {"Confusion matrix (test)", "Training curves (loss)", "ROC (test)"} <= set(plots["data"])


@pytest.mark.integration
def test_exp_run_changes_metrics_and_logs_a_second_run(repo: Path):
    proc = dvc(repo, "exp", "run", "-S", "train.epochs=1")
    assert ran(proc.stdout) == {"train", "report"}, proc.stdout
    diff = dvc(repo, "metrics", "diff", "--json").stdout
    changed = json.loads(diff)
    assert changed["metrics/train.json"]["epochs"] == {"old": 3, "new": 1, "diff": -2}
    pdiff = dvc(repo, "params", "diff").stdout
    assert "train.epochs" in pdiff
    _, runs = mlflow_runs(repo)
    assert len(runs) == 2
    newest = max(runs, key=lambda r: r.info.start_time)
    assert newest.data.params["train.epochs"] == "1"
    assert newest.data.tags.get("dvc_exp_name")
    assert "test_accuracy" in newest.data.metrics
    run(repo, "git", "checkout", "--", "params.yaml", "dvc.lock")
    dvc(repo, "checkout", "-f")


@pytest.mark.integration
def test_queued_experiments_log_into_the_workspace_store(repo: Path):
    _, before = mlflow_runs(repo)
    for epochs in (1, 2):
        dvc(repo, "exp", "run", "--queue", "-S", f"train.epochs={epochs}")
    dvc(repo, "queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = dvc(repo, "queue", "status").stdout
        if "Running" not in status and "Queued" not in status:
            break
        time.sleep(5)
    dvc(repo, "queue", "stop", check=False)
    failed = [line.split()[0] for line in status.splitlines() if "Failed" in line]
    logs = [dvc(repo, "queue", "logs", task, check=False).stdout[-3000:] for task in failed]
    assert not failed, status + "\n".join(logs)
    assert status.count("Success") >= 2, status
    _, after = mlflow_runs(repo)
    new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    assert len(new) == 2, [r.data.params.get("train.epochs") for r in after]
    assert {r.data.params["train.epochs"] for r in new} == {"1", "2"}
    assert all(r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics for r in new)
    assert all(r.info.artifact_uri.startswith((repo / "mlartifacts").as_uri()) for r in new)
    assert not (repo / ".dvc" / "tmp" / "exps" / "mlflow.db").exists()
    assert sys.executable  # the queue ran with the test's interpreter (dvcrepo.env)
