"""MLflow tracking against a real SQLite store: URIs, params, the pending/replay path."""

from __future__ import annotations

import json

from imgclf import tracking
from imgclf.config import Paths


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
