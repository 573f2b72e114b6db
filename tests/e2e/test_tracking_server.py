"""The pipeline against a real tracking server: ``mlflow server`` on Debian's PostgreSQL with
proxied artifacts (``imgclf/tracking/server.py``, on loopback), reached only through
``MLFLOW_TRACKING_URI``: runs, registry and alias, serving from the registry, queued
experiments in parallel, and a server that goes away between stages (pending, replay)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from imgclf.files import file_md5
from imgclf.testing import images
from imgclf.testing.project import commit, dvc, make_repo, python, ran, run_queue, set_params
from imgclf.testing.server import ServerProcess
from imgclf.tracking.server import PostgresMissing, TrackingServer

FAST = {"epochs": 2, "patience": 2, "cnn_filters": [8, 16], "cnn_dense": 16, "batch_size": 16}
STAGES = {"preprocess", "split", "audit", "train", "report", "promote", "export"}
QUEUE_SECONDS = 420


@pytest.fixture(scope="module")
def server():
    # Not under pytest's tmp_path: as root, PostgreSQL runs as an unprivileged user, who
    # cannot traverse /tmp/pytest-of-root (mode 0700).
    folder = Path(tempfile.mkdtemp(prefix="imgclf-tracking-"))
    folder.chmod(0o755)
    try:
        srv = TrackingServer(folder).start()
    except PostgresMissing as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(str(exc))  # only where the Debian package cannot be installed
    yield srv
    srv.stop()
    shutil.rmtree(folder, ignore_errors=True)


def uri_env(server: TrackingServer) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": server.uri}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, server) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("tracked") / "repo", per_digit=5)
    set_params(repo, {f"train.{key}": value for key, value in FAST.items()})
    set_params(repo, {"promote.min_value": 0.0})
    commit(repo, "fast params")
    proc = dvc(repo, "repro", extra_env=uri_env(server))
    assert ran(proc.stdout) == {"params", *STAGES}, proc.stdout
    commit(repo, "first run")
    return repo


def client(server: TrackingServer):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.uri)


def train_runs(server: TrackingServer) -> list:
    """The runs of the pipeline's experiment, oldest first (the audit stage's runs are in
    ``imgclf-audit``)."""
    c = client(server)
    exp = c.get_experiment_by_name("imgclf")
    return c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def versions(server: TrackingServer) -> dict[str, str]:
    """Registered versions of ``imgclf``: version -> run id."""
    found = client(server).search_model_versions("name='imgclf'")
    return {str(v.version): v.run_id for v in found}


def champion(server: TrackingServer) -> str:
    return str(client(server).get_model_version_by_alias("imgclf", "champion").version)


def stored_file(server: TrackingServer, run, path: str) -> Path:
    """Where the server's artifact proxy keeps ``path`` of ``run``."""
    # mlflow-artifacts:/<experiment id>/<run id>/artifacts -> <artifacts folder>/<same>
    relative = run.info.artifact_uri.removeprefix("mlflow-artifacts:/")
    return server.artifacts / relative / path


def db_status(server: TrackingServer, run_id: str) -> str:
    """A run's status as PostgreSQL holds it (proof the runs are in that database)."""
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", port=server.postgres.port, user="mlflow", dbname="mlflow"
    ) as conn:
        row = conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
    return row[0] if row else "absent"


def test_the_pipeline_logs_its_run_registers_and_uploads_through_the_server(repo, server):
    facts = json.loads((repo / "models" / "bundle.run.json").read_text())
    test = json.loads((repo / "metrics" / "test.json").read_text())
    (run,) = train_runs(server)
    assert run.info.run_id == facts["mlflow_run_id"]
    assert run.info.run_name == facts["run_name"] and run.info.status == "FINISHED"
    assert db_status(server, run.info.run_id) == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["promote.min_value"] == "0.0"
    assert run.data.metrics["test_accuracy"] == test["accuracy"]
    assert run.data.tags["quality_gate"] == "passed"
    assert len(client(server).get_metric_history(run.info.run_id, "train_loss")) == 2
    assert versions(server) == {"1": run.info.run_id} and champion(server) == "1"
    tags = client(server).get_model_version("imgclf", "1").tags
    assert tags["bundle_md5"] == file_md5(repo / "models" / "bundle.zip")
    assert tags["git_commit"] == run.data.tags["git_commit"]
    assert facts["registered"]["version"] == "1" and facts["registered"]["alias"] == "champion"
    # artifacts went through the proxy into the server's own folder
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    bundle = stored_file(server, run, "bundle/bundle.zip")
    assert file_md5(bundle) == file_md5(repo / "models" / "bundle.zip")
    assert stored_file(server, run, "bundle/export/model.tflite").is_file()
    test_file = stored_file(server, run, "report/test.json")
    assert test_file.read_bytes() == (repo / "metrics" / "test.json").read_bytes()
    assert not (repo / ".cache" / "mlflow-pending").exists()  # nothing went offline
    assert not (repo / "mlflow.db").exists()  # no SQLite fallback


def test_the_champion_is_served_from_the_registry(repo, server, tmp_path):
    srv = ServerProcess(tmp_path, "models:/imgclf@champion", env=uri_env(server))
    try:
        version = httpx.get(f"{srv.url}/version", timeout=10).json()
        answer = httpx.post(
            f"{srv.url}/predict",
            content=images.png(3),
            headers={"Content-Type": "image/png"},
            timeout=30,
        )
    finally:
        assert srv.stop() == 0, srv.log()
    (run,) = train_runs(server)
    assert version["source"] == "models:/imgclf@champion"
    assert version["registry"] == {"name": "imgclf", "version": "1", "alias": "champion"}
    assert version["mlflow_run_id"] == run.info.run_id
    assert version["bundle_md5"] == file_md5(repo / "models" / "bundle.zip")
    assert version["runtime"]["unavailable"] == {}  # the exports came through the proxy too
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"]["bundle_md5"] == version["bundle_md5"]
    assert len(body["results"]) == 1 and "decision" in body["results"][0]


def test_a_server_gone_between_stages_loses_nothing_and_replay_recovers_the_run(repo, server):
    before = versions(server)
    # train alone reruns (a seed would rerun audit); promoted even if it is worse
    set_params(repo, {"train.epochs": 3, "promote.max_regression": 1.0})
    proc = dvc(repo, "repro", "train", extra_env=uri_env(server))
    assert ran(proc.stdout) == {"params", "train"}, proc.stdout
    link = json.loads((repo / ".mlflow-run.json").read_text())
    assert link["run_id"] is not None  # train reached the server

    server.stop_mlflow()  # PostgreSQL keeps running; the MLflow server is gone
    start = time.monotonic()
    # no HTTP retries: each of the three stages would wait out their backoff for nothing
    offline = uri_env(server) | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = dvc(repo, "repro", extra_env=offline, timeout=600)
    offline_seconds = time.monotonic() - start
    assert ran(proc.stdout) == {"report", "promote", "export"}, proc.stdout
    assert "MLFLOW TRACKING FAILED" in proc.stderr
    assert "up to date" in dvc(repo, "status").stdout.lower()  # every output written
    assert (repo / "models" / "export" / "model.tflite").is_file()
    facts = json.loads((repo / "models" / "bundle.run.json").read_text())
    assert facts["mlflow_run_id"] is None and "registered" not in facts
    record_file = repo / ".cache" / "mlflow-pending" / f"{link['run_name']}.json"
    record = json.loads(record_file.read_text())
    assert record["run_id"] == link["run_id"] and record["uri"] == server.uri
    assert record["register"]["bundle_md5"] == file_md5(repo / "models" / "bundle.zip")

    server.start_mlflow()  # same port, same database
    assert server.uri == record["uri"]
    run = client(server).get_run(link["run_id"])
    assert "test_accuracy" not in run.data.metrics  # report never reached it
    proc = python(repo, "-m", "imgclf.tracking", "replay", extra_env=uri_env(server))

    test = json.loads((repo / "metrics" / "test.json").read_text())
    new_version = str(len(before) + 1)  # the bundle served: it takes the alias
    assert proc.stdout.splitlines() == [
        f"{record_file.name}: logged as run {link['run_id']} in {server.uri} "
        f"(registered imgclf version {new_version}, @champion)"
    ]
    run = client(server).get_run(link["run_id"])
    assert run.info.status == "FINISHED" and db_status(server, link["run_id"]) == "FINISHED"
    assert run.data.metrics["test_accuracy"] == test["accuracy"]
    assert run.data.params["train.epochs"] == "3" and run.data.tags["quality_gate"] == "passed"
    assert run.data.tags["replayed_from"] == record_file.name
    assert versions(server) == {**before, new_version: link["run_id"]}
    assert champion(server) == new_version
    bundle = stored_file(server, run, "bundle/bundle.zip")
    assert file_md5(bundle) == file_md5(repo / "models" / "bundle.zip")
    assert stored_file(server, run, "bundle/export/model.onnx").is_file()
    test_file = stored_file(server, run, "report/test.json")
    assert test_file.read_bytes() == (repo / "metrics" / "test.json").read_bytes()
    assert not record_file.exists() and record_file.with_suffix(".replayed").is_file()
    print(f"report + promote + export with the server gone: {offline_seconds:.0f} s")


def test_queued_experiments_run_in_parallel_against_the_server(repo, server):
    known = {r.info.run_id for r in train_runs(server)}
    before = versions(server)
    for epochs in (1, 4):  # neither the workspace's 2 (or 3 after the outage test)
        dvc(repo, "exp", "run", "--queue", "-S", f"train.epochs={epochs}")
    status = run_queue(repo, 2, QUEUE_SECONDS, 3, uri_env(server))
    assert status.count("Success") == 2, status

    new = [r for r in train_runs(server) if r.info.run_id not in known]
    assert len({r.info.run_id for r in new}) == 2
    assert {r.data.params["train.epochs"] for r in new} == {"1", "4"}
    for r in new:
        assert r.info.status == "FINISHED" and db_status(server, r.info.run_id) == "FINISHED"
        assert r.info.run_name == r.data.tags["dvc_exp_name"]
        assert "test_accuracy" in r.data.metrics
        assert r.info.artifact_uri.startswith("mlflow-artifacts:/")
        assert stored_file(server, r, "bundle/bundle.zip").is_file()
    after = versions(server)
    assert sorted(set(after) - set(before), key=int) == [str(len(before) + i) for i in (1, 2)]
    assert {after[v] for v in set(after) - set(before)} == {r.info.run_id for r in new}
    assert not list((repo / ".cache" / "mlflow-pending").glob("*.json"))  # none went offline
