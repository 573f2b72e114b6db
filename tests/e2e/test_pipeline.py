"""The whole pipeline in a temporary git + DVC repository, tracked in a real MLflow store,
and served by a real server process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from imgclf import tracking
from imgclf.files import file_md5
from imgclf.testing.project import (
    commit,
    dvc,
    env,
    make_repo,
    python,
    ran,
    run,
    run_queue,
    set_params,
)

# -- the whole pipeline in a temporary git + DVC repo ----------------------------------------
# The classes are renamed (no `sensitive`): the operating point must find its class itself.

FAST = {"epochs": 3, "patience": 2, "cnn_filters": [8, 16], "cnn_dense": 16, "batch_size": 16}
STAGES = {"preprocess", "split", "audit", "train", "report", "promote", "export"}


def mlflow_runs(repo: Path, stage: str = "train"):
    """The runs ``train`` started (``stage="audit"``: those of the audit stage)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("imgclf")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return client, [r for r in runs if r.data.tags.get("stage", "train") == stage]


def bundle_md5(repo: Path) -> str:
    return file_md5(repo / "models" / "bundle.zip")


def bundle_info(repo: Path) -> dict:
    with zipfile.ZipFile(repo / "models" / "bundle.zip") as zf:
        return json.loads(zf.read("bundle.json"))


def run_facts(repo: Path) -> dict:
    """What promote wrote beside the bundle: run id, run name, git commit, registry."""
    facts = json.loads((repo / "models" / "bundle.run.json").read_text())
    assert facts["bundle_md5"] == bundle_md5(repo)
    return facts


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the default store: <workspace>/mlflow.db
    repo = make_repo(tmp_path_factory.mktemp("pipe") / "repo", per_digit=8)
    raw = repo / "data" / "raw"
    (raw / "safe").rename(raw / "dogs")  # digits 0-6: the common class
    (raw / "sensitive").rename(raw / "cats")  # digits 7-9: the rarer one
    dvc(repo, "add", "-q", "data/raw")
    set_params(repo, {f"train.{key}": value for key, value in FAST.items()})
    set_params(repo, {"promote.min_value": 0.0})
    commit(repo, "fast params, own class names")
    proc = dvc(repo, "repro")
    assert ran(proc.stdout) == STAGES, proc.stdout
    commit(repo, "first run")
    return repo


def test_repro_promotes_a_bundle_for_any_class_names(repo: Path):
    info = bundle_info(repo)
    assert info["class_names"] == ["cats", "dogs"] and info["image_size"] == 32
    op = json.loads((repo / "metrics" / "operating_point.json").read_text())
    assert op["positive_class"] == "cats"  # the rarer class, chosen without configuration
    assert info["operating_point"] == {
        k: op[k] for k in ("positive_class", "threshold", "target_recall")
    }
    test = json.loads((repo / "metrics" / "test.json").read_text())
    assert info["gate"] == {
        "metric": "accuracy",
        "min_value": 0.0,
        "value": test["accuracy"],
        "passed": True,
    }
    # the headline dvc exp show lists; the details sit in a report file
    assert set(test) == {"accuracy", "macro_f1", "roc_auc", "pr_auc", "recall", "precision"}
    assert test["recall"] == op["test"]["recall"]
    detail = json.loads((repo / "metrics" / "report" / "test_detail.json").read_text())
    assert detail["positive_class"] == "cats" and set(detail["argmax"]) == {
        "accuracy", "macro_f1", "per_class",
    }  # fmt: skip
    train = json.loads((repo / "metrics" / "train.json").read_text())
    assert set(train) == {"epochs_run", "best_epoch"}  # the headline; the rest is in MLflow
    text = (repo / "metrics" / "report" / "classification_report.txt").read_text()
    assert text.startswith(f"== at the operating threshold (cats >= {op['threshold']:.4f}) ==")
    assert "== argmax (top class) ==" in text
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["promote"]["outs"][0]["md5"] == bundle_md5(repo)
    assert "up to date" in dvc(repo, "status").stdout.lower()

    client, runs = mlflow_runs(repo)
    facts = run_facts(repo)
    assert [r.info.run_id for r in runs] == [facts["mlflow_run_id"]]
    run_ = runs[0]
    assert run_.info.status == "FINISHED"
    assert run_.info.run_name == facts["run_name"] and run_.info.run_name.startswith("repro-")
    assert facts["registered"] == {
        "name": "imgclf", "version": "1", "alias": "champion", "champion_value": test["accuracy"],
        "champion_version": "1",
    }  # fmt: skip
    assert run_.data.params["train.epochs"] == "3" and "report.target_recall" in run_.data.params
    assert run_.data.tags["quality_gate"] == "passed" and run_.data.tags["positive_class"] == "cats"
    assert {"test_accuracy", "test_argmax_accuracy", "epochs_run", "best_val_loss"} <= set(
        run_.data.metrics
    )
    assert len(client.get_metric_history(run_.info.run_id, "loss")) == train["epochs_run"]
    versions = client.search_model_versions("name='imgclf'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", run_.info.run_id)]
    assert str(client.get_model_version_by_alias("imgclf", "champion").version) == "1"
    _, audits = mlflow_runs(repo, "audit")
    assert len(audits) == 1 and audits[0].info.run_name.startswith("audit-repro-")
    assert audits[0].data.tags["data_hash"] == run_.data.tags["data_hash"]
    assert audits[0].info.status == "FINISHED" and audits[0].data.params["audit.model"] == "knn"
    logged = {a.path for a in client.list_artifacts(audits[0].info.run_id, "audit")}
    assert logged == {f"audit/{n}" for n in ("index.html", "label_issues.csv", "summary.json")}
    plots = json.loads(dvc(repo, "plots", "show", "--json").stdout)
    assert not plots.get("errors"), plots.get("errors")


def test_a_typo_or_bad_value_fails_fast_naming_the_key_and_creates_no_run(repo: Path):
    _, before = mlflow_runs(repo)
    start = time.monotonic()
    proc = dvc(repo, "exp", "run", "-S", "train.epochs=abc", check=False)
    seconds = time.monotonic() - start
    assert proc.returncode != 0
    line = "error: params.yaml: train.epochs: input should be a valid integer, got 'abc'"
    assert line in proc.stderr.splitlines(), proc.stderr
    assert "Traceback" not in proc.stderr
    set_params(repo, {"train.epochs": 3})
    (repo / "params.yaml").write_text(
        (repo / "params.yaml").read_text().replace("  epochs: 3\n", "  epocs: 3\n")
    )
    proc = dvc(repo, "repro", check=False)
    assert "error: params.yaml: train.epocs: unknown key (did you mean 'epochs'?)" in proc.stderr
    _, after = mlflow_runs(repo)
    assert len(after) == len(before)
    run(repo, "git", "checkout", "--", "params.yaml")
    print(f"dvc exp run -S train.epochs=abc failed after {seconds:.1f} s")


FLOAT_EXPORTS = ("tflite", "saved_model", "onnx")


def test_export_proves_parity_on_the_whole_test_split_and_travels_with_the_registry(repo: Path):
    metrics = json.loads((repo / "metrics" / "export.json").read_text())
    test_lines = (repo / "data" / "split" / "test.csv").read_text().splitlines()
    assert metrics["test_images"] == len(test_lines) - 1  # the header
    for name in FLOAT_EXPORTS:
        assert metrics[name]["passed"] is True, name
        assert metrics[name]["decision_agreement"] == 1.0, name
        assert metrics[name]["max_abs_diff"] <= 1e-4, name
        assert metrics[name]["accuracy"] == metrics["keras_accuracy"], name
    assert "passed" not in metrics["tflite_dynamic"]  # quantised: reported, not required
    manifest = json.loads((repo / "models" / "export" / "bundle.json").read_text())
    assert manifest["bundle_md5"] == bundle_md5(repo)
    assert manifest["operating_point"] == bundle_info(repo)["operating_point"]
    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    assert any("metrics/export.json" in d.get("data", {}) for d in shown.values())

    client, _ = mlflow_runs(repo)
    run_id = run_facts(repo)["mlflow_run_id"]
    logged = {a.path for a in client.list_artifacts(run_id, "bundle/export")}
    assert {"bundle/export/model.tflite", "bundle/export/model.onnx"} <= logged
    assert client.get_run(run_id).data.metrics["export_tflite_passed"] == 1.0
    code = (
        "import json; from imgclf.serving.predictor import Predictor; "
        "p = Predictor.load('models:/imgclf@champion', runtime='onnx'); "
        "print(json.dumps([p.version['runtime']['name'], p.version['bundle_md5']]))"
    )
    uri = {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    out = python(repo, "-c", code, extra_env=uri).stdout.strip().splitlines()[-1]
    assert json.loads(out) == ["onnx", bundle_md5(repo)]


def test_a_parity_miss_fails_export_in_one_line_and_writes_no_export(repo: Path):
    dvc(repo, "repro")  # up to date first: what earlier tests left behind is not this test's
    old_md5 = bundle_md5(repo)
    set_params(repo, {"export.max_abs_diff": 1.0e-12})
    proc = dvc(repo, "repro", check=False)
    assert proc.returncode != 0
    assert ran(proc.stdout) == {"export"}, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error: export parity failed")]
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(
        r"error: export parity failed on \d+ test images \(tflite: max \|p - p_keras\| \S+ > "
        r"1e-12( \| onnx: .*)?\); models/export/ is not written \(figures in metrics/export.json\)",
        lines[0],
    ), lines[0]
    metrics = json.loads((repo / "metrics" / "export.json").read_text())
    assert metrics["tflite"]["passed"] is False and metrics["saved_model"]["passed"] is True
    assert not (repo / "models" / "export").exists()
    assert bundle_md5(repo) == old_md5  # the served bundle is untouched
    run(repo, "git", "checkout", "--", "params.yaml", "metrics/export.json")
    dvc(repo, "checkout", "-f")
    assert (repo / "models" / "export" / "model.tflite").is_file()


def watch_server(srv, stop: threading.Event, seen: list) -> None:
    """Record (bundle md5, threshold) of every /predict answer until ``stop``."""
    from imgclf.testing import images as f

    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            r = client.post(
                f"{srv.url}/predict", content=f.png(1), headers={"Content-Type": "image/png"}
            )
            body = r.json()
            if r.status_code == 200:
                seen.append(
                    (body["model"]["bundle_md5"], body["results"][0]["decision"]["threshold"])
                )
            else:
                seen.append(("error", r.status_code))
            time.sleep(0.05)


@pytest.fixture
def server(repo: Path, tmp_path):
    from imgclf.testing.server import ServerProcess

    srv = ServerProcess(tmp_path, repo / "models" / "bundle.zip", "--reload-poll-seconds", "0.3")
    yield srv
    srv.stop()


def test_a_gated_out_model_is_never_served_nor_registered(repo: Path, server):
    old_md5 = bundle_md5(repo)
    set_params(repo, {"train.epochs": 1, "promote.min_value": 1.0})
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_server, args=(server, stop, seen))
    watcher.start()
    try:
        proc = dvc(repo, "repro", check=False)
    finally:
        stop.set()
        watcher.join()
    test = json.loads((repo / "metrics" / "test.json").read_text())
    assert test["accuracy"] < 1.0  # the precondition of a failing gate
    assert proc.returncode != 0
    assert ran(proc.stdout) == {"train", "report", "promote"}
    gate_line = [x for x in proc.stderr.splitlines() if x.startswith("error: QUALITY GATE FAILED")]
    assert gate_line == [
        f"error: QUALITY GATE FAILED: test accuracy {test['accuracy']} < promote.min_value 1.0; "
        "the candidate is neither promoted nor registered, and models/bundle.zip keeps the "
        f"bundle promoted by {run_facts(repo)['run_name']} (accuracy "
        f"{bundle_info(repo)['gate']['value']})"
    ]
    assert bundle_md5(repo) == old_md5
    old_threshold = bundle_info(repo)["operating_point"]["threshold"]
    assert len(seen) > 20 and set(seen) == {(old_md5, old_threshold)}
    version = httpx.get(f"{server.url}/version").json()
    assert version["bundle_md5"] == old_md5 and version["dvc_lock"]["matches"] is True

    client, runs = mlflow_runs(repo)
    newest = max(runs, key=lambda r: r.info.start_time)
    assert newest.info.status == "FAILED" and newest.data.tags["quality_gate"] == "failed"
    assert len(client.search_model_versions("name='imgclf'")) == 1
    run(repo, "git", "checkout", "--", "params.yaml")


def test_an_exp_run_is_served_only_once_promoted_with_its_own_threshold(repo: Path, server):
    old_md5 = bundle_md5(repo)
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_server, args=(server, stop, seen))
    watcher.start()
    try:
        proc = dvc(repo, "exp", "run", "-S", "train.epochs=2", "-S", "train.patience=5")
        deadline = time.monotonic() + 15
        while bundle_md5(repo) not in {md5 for md5, _ in seen[-3:]}:
            assert time.monotonic() < deadline, "the server never loaded the promoted bundle"
            time.sleep(0.2)
    finally:
        stop.set()
        watcher.join()
    assert ran(proc.stdout) == {"train", "report", "promote", "export"}, proc.stdout
    new_md5, new_info = bundle_md5(repo), bundle_info(repo)
    assert new_md5 != old_md5
    answers = dict.fromkeys(seen)  # in order of first appearance
    old_threshold = None
    assert [md5 for md5, _ in answers] == [old_md5, new_md5]
    for md5, threshold in answers:
        if md5 == new_md5:
            assert threshold == new_info["operating_point"]["threshold"]
        else:
            old_threshold = threshold
    assert old_threshold is not None and len(answers) == 2  # one threshold per bundle

    client, runs = mlflow_runs(repo)
    newest = max(runs, key=lambda r: r.info.start_time)
    assert newest.info.run_name == newest.data.tags["dvc_exp_name"] == run_facts(repo)["run_name"]
    assert newest.info.status == "FINISHED"
    versions = {str(v.version): v for v in client.search_model_versions("name='imgclf'")}
    assert sorted(versions) == ["1", "2"] and versions["2"].run_id == newest.info.run_id
    scores = {
        v: client.get_run(mv.run_id).data.metrics["test_accuracy"] for v, mv in versions.items()
    }
    champion = str(client.get_model_version_by_alias("imgclf", "champion").version)
    assert champion == ("2" if scores["2"] > scores["1"] else "1"), scores
    run(repo, "git", "checkout", "--", "params.yaml", "dvc.lock")
    dvc(repo, "checkout", "-f")


def start_train(repo: Path) -> tuple[subprocess.Popen, str]:
    """``python -m imgclf.pipeline.train`` with many epochs; returns it once its run is RUNNING."""
    set_params(repo, {"train.epochs": 200, "train.patience": 200})
    _, before = mlflow_runs(repo)
    known = {r.info.run_id for r in before}
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgclf.pipeline.train"],
        cwd=repo,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        _, runs = mlflow_runs(repo)
        new = [r for r in runs if r.info.run_id not in known and r.info.status == "RUNNING"]
        if new and len(mlflow_runs(repo)[0].get_metric_history(new[0].info.run_id, "loss")):
            return proc, new[0].info.run_id
        assert proc.poll() is None, "train exited before its run started"
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("train never started its run")


def test_stopped_and_killed_stages_end_their_runs_killed(repo: Path):
    client, _ = mlflow_runs(repo)
    proc, stopped = start_train(repo)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert client.get_run(stopped).info.status == "KILLED"

    proc, killed = start_train(repo)
    proc.kill()  # SIGKILL: no chance to close the run
    proc.wait(timeout=30)
    assert client.get_run(killed).info.status == "RUNNING"
    closed = tracking.close_abandoned(f"sqlite:///{repo / 'mlflow.db'}", "imgclf")
    assert closed == [killed]
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(killed).data.tags["imgclf.closed"] == "owner process gone"
    run(repo, "git", "checkout", "--", "params.yaml")
    dvc(repo, "checkout", "-f")


def test_forced_reruns_leave_dvc_lock_byte_identical(repo: Path):
    """Same machine, same params and data: every output DVC hashes comes out the same (no
    save times, object ids or run ids in them), so `dvc repro -f` changes nothing."""
    dvc(repo, "repro", "-f")
    first = (repo / "dvc.lock").read_bytes()
    proc = dvc(repo, "repro", "-f")
    assert ran(proc.stdout) == STAGES
    assert (repo / "dvc.lock").read_bytes() == first
    run(repo, "git", "checkout", "--", "dvc.lock")
    dvc(repo, "checkout", "-f")


def test_queued_experiments_log_into_the_workspace_store(repo: Path):
    _, before = mlflow_runs(repo)
    for epochs in (1, 2):
        dvc(repo, "exp", "run", "--queue", "-S", f"train.epochs={epochs}")
    status = run_queue(repo, 2, 600, 5)
    assert status.count("Success") >= 2, status
    _, after = mlflow_runs(repo)
    new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    assert len(new) == 2, [r.data.params.get("train.epochs") for r in after]
    assert {r.data.params["train.epochs"] for r in new} == {"1", "2"}
    assert all(r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics for r in new)
    assert all(r.info.run_name == r.data.tags["dvc_exp_name"] for r in new)
    assert len({r.info.run_name for r in after}) == len(after)  # every run name is unique
    assert all(r.info.artifact_uri.startswith((repo / "mlartifacts").as_uri()) for r in new)
    assert not (repo / ".dvc" / "tmp" / "exps" / "mlflow.db").exists()
