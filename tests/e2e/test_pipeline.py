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
STAGES = {"params", "preprocess", "split", "audit", "train", "report", "promote", "export"}


def mlflow_runs(repo: Path, stage: str = "train"):
    """The runs ``train`` started, in ``imgclf`` (``stage="audit"``: those of the audit
    stage, in ``imgclf-audit``)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("imgclf-audit" if stage == "audit" else "imgclf")
    return client, client.search_runs([exp.experiment_id]) if exp else []


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
    assert list(test) == [
        "accuracy", "argmax_accuracy", "recall", "precision", "macro_f1", "roc_auc", "pr_auc",
    ]  # fmt: skip
    assert op["cost"]["accuracy"] == test["accuracy"]
    assert op["cost"]["argmax_accuracy"] == test["argmax_accuracy"]
    assert test["recall"] == op["test"]["recall"]
    detail = json.loads((repo / "metrics" / "report" / "test_detail.json").read_text())
    assert detail["positive_class"] == "cats" and set(detail["argmax"]) == {
        "accuracy", "macro_f1", "per_class",
    }  # fmt: skip
    train = json.loads((repo / "metrics" / "train.json").read_text())
    assert set(train) == {"epochs_run", "best_epoch"}  # the headline; the rest is in MLflow
    text = (repo / "metrics" / "report" / "classification_report.txt").read_text()
    assert text.startswith(f"operating point: cats >= {op['threshold']:.6g}: ")
    assert f"\n\n== at the operating threshold (cats >= {op['threshold']:.4f}) ==" in text
    assert f"test accuracy at the threshold {test['accuracy']} vs argmax" in text
    assert "== argmax (top class) ==" in text
    promoted = json.loads((repo / "metrics" / "promote.json").read_text())
    assert promoted == {"promoted": True, "verdict": "promoted", "champion": None}
    # dvc exp show leads with the headline: in a 160-column terminal (the pager shows the
    # table's first 160 characters) every headline figure and the verdict are visible
    header = dvc(repo, "exp", "show", "--md").stdout.splitlines()[0][:160]
    headline = ["Experiment", "Created", *test, "promoted", "verdict"]
    assert re.findall(r"\| (\w+)", header)[: len(headline)] == headline, header
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o for o in lock["stages"]["promote"]["outs"]}
    assert outs["models/bundle.zip"]["md5"] == bundle_md5(repo)
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
    assert len(client.get_metric_history(run_.info.run_id, "train_loss")) == train["epochs_run"]
    versions = client.search_model_versions("name='imgclf'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", run_.info.run_id)]
    assert str(client.get_model_version_by_alias("imgclf", "champion").version) == "1"
    _, audits = mlflow_runs(repo, "audit")
    assert len(audits) == 1 and audits[0].info.run_name.startswith("audit-repro-")
    assert audits[0].data.tags["stage"] == "audit"
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
    # the params stage failed first: DVC deleted no output of train (or any other stage)
    assert ran(proc.stdout) == {"params"}, proc.stdout
    status = ("git", "status", "--porcelain", "--untracked-files=no")
    assert run(repo, *status).stdout.splitlines() == [" M params.yaml"]
    _, after = mlflow_runs(repo)
    assert len(after) == len(before)
    run(repo, "git", "checkout", "--", "params.yaml")
    # the typo fixed: nothing that had run with these params runs again
    proc = dvc(repo, "repro")
    assert ran(proc.stdout) == set(), proc.stdout
    assert "Stage 'train' didn't change, skipping" in proc.stdout
    assert run(repo, *status).stdout == ""
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
    # not a dvc metric (about 30 columns in dvc exp show): a parity miss fails the stage
    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    [files] = [set(d["data"]) for d in shown.values()]
    assert files == {
        "metrics/test.json", "metrics/promote.json", "metrics/audit/summary.json",
    }  # fmt: skip

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
    assert ran(proc.stdout) == {"params", "export"}, proc.stdout
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
    # the stage succeeds (the served bundle stays), so an experiment keeps its own figures
    assert proc.returncode == 0, proc.stderr
    assert ran(proc.stdout) == {"params", "train", "report", "promote"}
    gate_line = [x for x in proc.stderr.splitlines() if "QUALITY GATE FAILED" in x]
    assert len(gate_line) == 1 and " WARNING " in gate_line[0], proc.stderr
    op = json.loads((repo / "metrics" / "operating_point.json").read_text())
    assert gate_line[0].split("__main__: ")[1] == (
        f"QUALITY GATE FAILED: test accuracy {test['accuracy']} at the operating threshold "
        f"(cats >= {op['threshold']:.6g}, chosen on {op['val']['n_positive']} val positives"
        f"{'' if op['bound_met'] else ', TARGET NOT VOUCHED FOR'}) < promote.min_value 1.0; "
        f"by argmax it is {test['argmax_accuracy']}: the model falls short: more or cleaner "
        "data (see the audit), more training (train.*), or promote.min_value below 1.0 if "
        f"{test['accuracy']} will do; the candidate is neither promoted nor registered, and "
        f"models/bundle.zip keeps the bundle promoted by {run_facts(repo)['run_name']} "
        f"(accuracy {bundle_info(repo)['gate']['value']})"
    )
    verdict = json.loads((repo / "metrics" / "promote.json").read_text())
    assert verdict == {"promoted": False, "verdict": "below_min_value", "champion": None}
    assert bundle_md5(repo) == old_md5
    old_threshold = bundle_info(repo)["operating_point"]["threshold"]
    assert len(seen) > 20 and set(seen) == {(old_md5, old_threshold)}
    version = httpx.get(f"{server.url}/version").json()
    assert version["bundle_md5"] == old_md5 and version["dvc_lock"]["matches"] is True

    client, runs = mlflow_runs(repo)
    newest = max(runs, key=lambda r: r.info.start_time)
    assert newest.info.status == "FINISHED" and newest.data.tags["quality_gate"] == "failed"
    assert newest.data.tags["promotion"] == "below_min_value"
    assert newest.data.metrics["promote_promoted"] == 0.0
    assert len(client.search_model_versions("name='imgclf'")) == 1
    run(repo, "git", "checkout", "--", "params.yaml")


def test_an_exp_run_is_served_only_once_promoted_with_its_own_threshold(repo: Path, server):
    old_md5 = bundle_md5(repo)
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_server, args=(server, stop, seen))
    watcher.start()
    try:
        # max_regression 1: replace the served bundle even if the new one is worse
        proc = dvc(
            repo, "exp", "run", "-S", "train.epochs=2", "-S", "train.patience=5",
            "-S", "promote.max_regression=1",
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while bundle_md5(repo) not in {md5 for md5, _ in seen[-3:]}:
            assert time.monotonic() < deadline, "the server never loaded the promoted bundle"
            time.sleep(0.2)
    finally:
        stop.set()
        watcher.join()
    assert ran(proc.stdout) == {"params", "train", "report", "promote", "export"}, proc.stdout
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
    champion = str(client.get_model_version_by_alias("imgclf", "champion").version)
    assert champion == "2"  # the bundle served holds the alias
    assert versions["2"].tags["bundle_md5"] == new_md5
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
        if new and mlflow_runs(repo)[0].get_metric_history(new[0].info.run_id, "train_loss"):
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
    save times, object ids or run ids in them), so `dvc repro -f` changes nothing: the
    forced rerun's dvc.lock is the one the fixture's first run committed (every test
    before this one put the workspace back), but for promote's verdict, which now names
    the served bundle it was compared with (the first run had none)."""
    first = run(repo, "git", "show", "HEAD:dvc.lock").stdout
    proc = dvc(repo, "repro", "-f")
    assert ran(proc.stdout) == STAGES
    verdict = json.loads((repo / "metrics" / "promote.json").read_text())
    accuracy = json.loads((repo / "metrics" / "test.json").read_text())["accuracy"]
    assert verdict == {"promoted": True, "verdict": "promoted", "champion": accuracy}
    verdicts = re.compile(
        r"(- path: metrics/promote(?:_detail)?\.json\n\s+hash: md5\n\s+md5: )\w+(\n\s+size: )\d+"
    )
    assert len(verdicts.findall(first)) == 2, first
    again = (repo / "dvc.lock").read_text()
    assert verdicts.sub(r"\1-\2-", again) == verdicts.sub(r"\1-\2-", first)
    run(repo, "git", "checkout", "--", "dvc.lock")
    dvc(repo, "checkout", "-f")


def test_queued_experiments_log_into_the_workspace_store(repo: Path):
    _, before = mlflow_runs(repo)
    # the second fails its gate: it must still show its own figures, not its baseline's
    dvc(repo, "exp", "run", "--queue", "-S", "train.epochs=1")
    dvc(repo, "exp", "run", "--queue", "-S", "train.epochs=2", "-S", "promote.min_value=1.0")
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

    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    exps = {
        e["name"]: e["data"]["metrics"]
        for c in shown
        for g in c.get("experiments") or []
        for e in g["revs"]
    }
    for r in new:
        metrics = exps[r.info.run_name]
        assert metrics["metrics/test.json"]["data"]["accuracy"] == r.data.metrics["test_accuracy"]
        verdict = metrics["metrics/promote.json"]["data"]["verdict"]
        assert verdict == r.data.tags["promotion"]
        if r.data.params["train.epochs"] == "2":
            assert verdict == "below_min_value"
    table = python(repo, "-m", "imgclf.experiments", check=False).stdout
    for r in new:
        assert re.search(
            rf"^{r.info.run_name} +{r.data.metrics['test_accuracy']:.4f} ", table, re.M
        )
