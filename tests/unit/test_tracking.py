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
COMMIT = "0123456789abcdef0123456789abcdef01234567"


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
    assert r.register_bundle(bundle, "model", "accuracy", 0.75, "champion", COMMIT) is None
    r.end()
    assert not r.ok and r.run_id == trained.run_id
    (record,) = pending.glob("*.json")
    data = json.loads(record.read_text())
    assert data["run_id"] == trained.run_id
    assert data["register"] == {
        "name": "model", "bundle": str(bundle), "metric": "accuracy", "value": 0.75,
        "alias": "champion", "bundle_md5": file_md5(bundle), "git_commit": COMMIT,
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
    assert version.tags == {
        "test_accuracy": "0.75", "bundle_md5": file_md5(bundle), "git_commit": COMMIT,
    }  # fmt: skip
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


# -- the registry: the alias follows promotions, versions are found by content ---------------


def _registered(tmp_path, name: str, data: bytes, value: float, commit: str | None = None):
    """A run started as ``train`` starts one (its ``git_commit`` tag), registering a
    bundle of ``data`` as promote does; returns the run, the bundle and what it returned."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tags = {"git_commit": name.ljust(40, "0")}
    r = tracking.Run.start(uri, "exp", name, tmp_path / "pending", run_name=name, tags=tags)
    bundle = tmp_path / name / "bundle.zip"
    bundle.parent.mkdir()
    bundle.write_bytes(data)
    got = r.register_bundle(bundle, "model", "accuracy", value, "champion", commit)
    r.end()
    assert r.ok, r.error
    return r, bundle, got


def test_every_registered_version_takes_the_alias_and_is_tagged_by_content(tmp_path):
    from mlflow import MlflowClient

    from imgclf.files import file_md5

    first, b1, got1 = _registered(tmp_path, "repro-1", b"first bundle", 0.9)
    assert got1 == {
        "version": "1", "alias": "champion", "champion_value": 0.9, "champion_version": "1",
    }  # fmt: skip
    # a lower test metric than the holder's: promote served it, so it is the champion
    second, b2, got2 = _registered(tmp_path, "repro-2", b"second bundle", 0.5, COMMIT)
    assert got2 == {
        "version": "2", "alias": "champion", "champion_value": 0.5, "champion_version": "2",
    }  # fmt: skip
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("model", "champion").version) == "2"
    v1, v2 = client.get_model_version("model", "1"), client.get_model_version("model", "2")
    assert (v1.run_id, v2.run_id) == (first.run_id, second.run_id)
    assert v1.tags == {  # no commit given: the run's
        "test_accuracy": "0.9",
        "bundle_md5": file_md5(b1),
        "git_commit": "repro-1".ljust(40, "0"),
    }
    assert v2.tags == {"test_accuracy": "0.5", "bundle_md5": file_md5(b2), "git_commit": COMMIT}


def test_a_bundle_is_traced_to_its_version_run_and_commit_by_its_md5(tmp_path, caplog):
    from imgclf.files import file_md5

    first, b1, _ = _registered(tmp_path, "repro-1", b"first bundle", 0.9)
    second, b2, _ = _registered(tmp_path, "repro-2", b"second bundle", 0.8, COMMIT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.find_origin(uri, "model", file_md5(b1), "champion") == {
        "registry": {"name": "model", "version": "1", "alias": None},
        "mlflow_run_id": first.run_id,
        "run_name": "repro-1",
        "git_commit": "repro-1".ljust(40, "0"),
    }
    assert tracking.find_origin(uri, "model", file_md5(b2), "champion") == {
        "registry": {"name": "model", "version": "2", "alias": "champion"},
        "mlflow_run_id": second.run_id,
        "run_name": "repro-2",
        "git_commit": COMMIT,
    }
    # the same bytes registered again (``dvc repro -f``): the newest version
    again, _, _ = _registered(tmp_path, "repro-3", b"first bundle", 0.9)
    found = tracking.find_origin(uri, "model", file_md5(b1), "champion")
    assert found["registry"]["version"] == "3" and found["mlflow_run_id"] == again.run_id
    assert tracking.find_origin(uri, "model", "0" * 32) is None  # not registered
    assert tracking.find_origin(uri, "other-model", file_md5(b1)) is None
    assert caplog.records == []


def test_looking_up_a_store_that_does_not_exist_creates_none(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    assert tracking.find_origin(uri, "model", "0" * 32) is None
    assert not (tmp_path / "none.db").exists() and caplog.records == []


def test_an_unreachable_store_is_a_warning_and_no_origin(caplog, fail_fast_http):
    assert tracking.find_origin(UNREACHABLE, "model", "ab" * 16) is None
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        f"registry look-up of bundle md5 {'ab' * 16} in {UNREACHABLE} failed (API request to "
    )
    assert record.getMessage().endswith("its MLflow version, run and git commit are left empty")


def test_a_store_that_never_answers_is_given_up_after_the_timeout(caplog, fail_fast_http):
    import socket
    import time

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        assert tracking.find_origin(uri, "model", "ab" * 16, timeout=0.5) is None
        assert time.monotonic() - start < 1.5
    (record,) = caplog.records
    assert f"in {uri} failed (no answer within 0.5 s)" in record.getMessage()


def test_audit_runs_have_an_experiment_of_their_own():
    assert tracking.audit_experiment("imgclf") == "imgclf-audit"
