"""MLflow tracking: URIs, params, the store lock and retry policy, the pending/replay path
(against real SQLite stores and a real closed port, no mocked MLflow)."""

from __future__ import annotations

import json
import logging
import sqlite3

import filelock
import pytest

from imgclf import tracking
from imgclf.config import PATHS, Paths
from imgclf.tracking import store

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once


@pytest.fixture(autouse=True)
def own_store(tmp_path, monkeypatch):
    """Every test here has its own fresh store, never the workspace's ``mlflow.db``."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'own-store.db'}")


@pytest.fixture
def fail_fast_http(monkeypatch):
    """No HTTP retries against the unreachable store."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The backoff waits the retry policy asks for, recorded instead of slept."""
    asked: list[float] = []
    monkeypatch.setattr(store, "BUSY_RETRY", store.BUSY_RETRY.copy(sleep=asked.append))
    return asked


def test_tracking_uri_env_overrides_and_default_is_the_workspace(tmp_path):
    assert tracking.tracking_uri({"MLFLOW_TRACKING_URI": "http://x:5000"}) == "http://x:5000"
    queued = Paths(tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12").workspace
    assert queued == tmp_path / "repo"
    uri = tracking.tracking_uri({}, workspace=queued)
    assert uri == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    assert tracking.sqlite_path(uri) == tmp_path / "repo" / "mlflow.db"
    assert tracking.sqlite_path("http://x:5000") is None
    assert tracking.artifact_location(uri) == (tmp_path / "repo" / "mlartifacts").as_uri()


def test_pending_dir_is_in_the_cache():
    assert tracking.pending_dir() == PATHS.cache / "mlflow-pending"


def test_flatten_params():
    flattened = tracking.flatten(
        {"train": {"epochs": 3, "augment": {"zoom": 0.1}}, "x": {"l": [1]}}
    )
    assert flattened == {"train.epochs": "3", "train.augment.zoom": "0.1", "x.l": "[1]"}


# -- store lock and retries --------------------------------------------------------------


def test_store_lock_timeout_names_the_lock_file(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lock_file = tmp_path / "mlflow.db.lock"
    monkeypatch.setattr(store, "LOCK_TIMEOUT_S", 0.1)
    calls = []
    # another holder (flock locks belong to an open file, so this process can contend)
    with filelock.FileLock(lock_file), pytest.raises(TimeoutError) as info:
        tracking.locked_call(uri, lambda: calls.append(1))
    assert str(info.value) == (
        f"MLflow store busy: could not lock {lock_file} within 0.1 s (another process holds it)"
    )
    assert calls == []  # not run, and a lock timeout is not retried


def test_locked_call_holds_the_lock_only_during_the_call(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lock_file = tmp_path / "mlflow.db.lock"

    def lock_is_held() -> bool:
        probe = filelock.FileLock(lock_file, timeout=0)
        try:
            probe.acquire()
        except filelock.Timeout:
            return True
        probe.release()
        return False

    assert tracking.locked_call(uri, lock_is_held) is True
    assert lock_is_held() is False
    assert tracking.locked_call("http://x:5000", lambda: 7) == 7  # no lock for a server


def _failing(times: int, error: Exception):
    """A function that raises ``error`` on its first ``times`` calls, then returns "done"."""
    calls = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "done"

    return fn, calls


def test_database_locked_is_retried_with_backoff_then_succeeds(tmp_path, waits, caplog):
    fn, calls = _failing(2, sqlite3.OperationalError("database is locked"))
    with caplog.at_level(logging.INFO, logger="imgclf.tracking.store"):
        assert tracking.locked_call(f"sqlite:///{tmp_path / 'mlflow.db'}", fn) == "done"
    assert len(calls) == 3
    assert len(waits) == 2
    assert 0.2 <= waits[0] <= 0.4 and 0.4 <= waits[1] <= 0.6  # 0.2 * 2**n + jitter < 0.2
    retries = [r for r in caplog.records if r.name == "imgclf.tracking.store"]
    assert [r.levelno for r in retries] == [logging.INFO, logging.INFO]
    assert "raised OperationalError: database is locked" in retries[0].getMessage()


def test_database_locked_gives_up_after_the_last_attempt(tmp_path, waits):
    error = sqlite3.OperationalError("database is locked")
    fn, calls = _failing(99, error)
    with pytest.raises(sqlite3.OperationalError) as info:
        tracking.locked_call(f"sqlite:///{tmp_path / 'mlflow.db'}", fn)
    assert info.value is error
    assert len(calls) == tracking.ATTEMPTS == 7
    assert len(waits) == 6
    assert waits[-1] >= 6.4


def test_other_errors_are_not_retried(tmp_path, waits):
    fn, calls = _failing(1, sqlite3.OperationalError("no such table: runs"))
    with pytest.raises(sqlite3.OperationalError, match=r"^no such table: runs$"):
        tracking.locked_call(f"sqlite:///{tmp_path / 'mlflow.db'}", fn)
    assert len(calls) == 1
    assert waits == []


# -- pending records and replay ----------------------------------------------------------


def test_unreachable_store_records_pending_and_replays(
    tmp_path, monkeypatch, caplog, capsys, fail_fast_http
):
    pending = tmp_path / "pending"
    art = tmp_path / "history.csv"
    art.write_text("epoch,loss\n1,0.5\n")
    r = tracking.Run.start(UNREACHABLE, "exp", "2026-01-01T00:00:00+00:00-abc", pending)
    r.set_tags({"data_hash": "d1"})
    r.log_params({"train.epochs": "3"})
    r.log_metrics({"loss": 0.5, "acc": 0.75}, step=1)
    r.log_metrics({"loss": 0.25}, step=2)
    r.log_artifact(art, "train")
    r.end()
    assert not r.ok and r.run_id is None
    assert "MLFLOW TRACKING FAILED" in caplog.text
    files = list(pending.glob("*.json"))
    assert [f.name for f in files] == ["2026-01-01T00_00_00_00_00-abc.json"]
    data = json.loads(files[0].read_text())
    assert data["params"] == {"train.epochs": "3"}
    assert data["tags"] == {"data_hash": "d1"}
    assert data["metrics"] == [
        {"key": "loss", "value": 0.5, "step": 1},
        {"key": "acc", "value": 0.75, "step": 1},
        {"key": "loss", "value": 0.25, "step": 2},
    ]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.main(["replay", "--dir", str(pending)]) == 0
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (got,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    out = capsys.readouterr().out
    assert out == f"{files[0].name}: logged as run {got.info.run_id} in {uri}\n"
    assert got.info.status == "FINISHED"
    assert got.data.params == {"train.epochs": "3"}
    assert got.data.metrics == {"loss": 0.25, "acc": 0.75}
    history = client.get_metric_history(got.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]
    assert got.data.tags["data_hash"] == "d1"
    assert got.data.tags["replayed_from"] == files[0].name
    artifacts = client.list_artifacts(got.info.run_id, "train")
    assert [a.path for a in artifacts] == ["train/history.csv"]
    assert [f.name for f in pending.iterdir()] == ["2026-01-01T00_00_00_00_00-abc.replayed"]


def test_a_resumed_run_replays_into_itself_and_registers_the_unchanged_bundle(
    tmp_path, monkeypatch, capsys, fail_fast_http
):
    """train reached the store, then it went down: report/promote record offline under the
    run's id, and replay logs into that run and makes promote's registration."""
    from mlflow import MlflowClient

    from imgclf.files import file_md5

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pending = tmp_path / "pending"
    trained = tracking.Run.start(uri, "exp", "repro-1", pending, run_name="repro-1")
    trained.log_metrics({"loss": 0.5})
    trained.end()
    bundle = tmp_path / "bundle.zip"
    bundle.write_bytes(b"the promoted bundle")
    r = tracking.Run.start(UNREACHABLE, "exp", "repro-1", pending, run_id=trained.run_id)
    r.log_metrics({"test_accuracy": 0.75})
    assert r.register_bundle(bundle, "model", "accuracy", 0.75, "champion") is None
    r.end()
    assert not r.ok and r.run_id == trained.run_id
    (record,) = pending.glob("*.json")
    data = json.loads(record.read_text())
    assert data["run_id"] == trained.run_id
    assert data["register"] == {
        "name": "model", "bundle": str(bundle), "metric": "accuracy", "value": 0.75,
        "alias": "champion", "bundle_md5": file_md5(bundle),
    }  # fmt: skip

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.main(["replay", "--dir", str(pending)]) == 0
    assert capsys.readouterr().out == (
        f"{record.name}: logged as run {trained.run_id} in {uri} "
        "(registered model version 1, @champion)\n"
    )
    client = MlflowClient(uri)
    got = client.get_run(trained.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.metrics == {"loss": 0.5, "test_accuracy": 0.75}
    assert got.data.tags["registered_model"] == "model" and got.data.tags["version"] == "1"
    (version,) = client.search_model_versions("name='model'")
    assert (str(version.version), version.run_id) == ("1", trained.run_id)
    assert str(client.get_model_version_by_alias("model", "champion").version) == "1"
    logged = client.list_artifacts(trained.run_id, "bundle")
    assert [a.path for a in logged] == ["bundle/bundle.zip"]


def test_replay_does_not_register_a_bundle_changed_since(
    tmp_path, monkeypatch, capsys, caplog, fail_fast_http
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pending = tmp_path / "pending"
    bundle = tmp_path / "bundle.zip"
    bundle.write_bytes(b"the promoted bundle")
    r = tracking.Run.start(UNREACHABLE, "exp", "repro-2", pending)
    r.register_bundle(bundle, "model", "accuracy", 0.75, "champion")
    r.end()
    bundle.write_bytes(b"a later bundle")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.main(["replay", "--dir", str(pending)]) == 0
    assert "(registered" not in capsys.readouterr().out
    assert f"{bundle} is no longer the bundle this run promoted" in caplog.text
    from mlflow import MlflowClient

    assert MlflowClient(uri).search_registered_models() == []


def test_replay_help_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as info:
        tracking.main(["--help"])
    assert info.value.code == 0
    paragraphs = capsys.readouterr().out.split("\n\n")
    assert paragraphs[1] == (
        "Log the pending records of offline MLflow runs into the tracking store."
    )


def test_replay_without_a_pending_folder_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "mlflow-pending"
    assert tracking.main(["replay", "--dir", str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: {missing} not found: no run has recorded anything offline\n"


def test_replay_of_an_empty_pending_folder_says_so(tmp_path, capsys):
    (tmp_path / "done.replayed").write_text("{}")
    assert tracking.main(["replay", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr() == (f"nothing to replay in {tmp_path}\n", "")


def test_replay_of_a_corrupt_record_is_one_error_line(tmp_path, capsys):
    # a fresh store (own_store): MLflow's "Creating initial MLflow database tables" must not show
    bad = tmp_path / "run.json"
    bad.write_text("{not json")
    assert tracking.main(["replay", "--dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"error: {bad} is not a readable pending record (JSONDecodeError: Expecting property "
        "name enclosed in double quotes: line 1 column 2 (char 1))\n"
    )
    bad.write_text('{"params": {}}')
    assert tracking.main(["replay", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {bad} is not a readable pending record (KeyError: 'experiment')\n"
    assert bad.exists()


def test_replay_while_the_store_is_down_is_one_error_line(
    tmp_path, monkeypatch, capsys, fail_fast_http
):
    record = tmp_path / "run.json"
    text = json.dumps({"experiment": "exp", "params": {"a": "1"}})
    record.write_text(text)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE)
    assert tracking.main(["replay", "--dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith(
        f"error: MLflow store {UNREACHABLE} still unreachable: MlflowException: API request to "
    )
    assert "Connection refused" in line
    assert [f.name for f in tmp_path.iterdir()] == ["run.json"]
    assert record.read_text() == text  # the record is kept as it was
