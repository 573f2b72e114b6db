"""Hot reload under load: a new bundle on disk and SIGHUP, zero failed requests; broken or
unpromoted bundles are refused, the old one kept and the failure shown."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from imgclf.files import file_md5
from imgclf.testing import images as f
from imgclf.testing.bundles import make_bundle, replace_atomically, string_values
from imgclf.testing.server import ServerProcess, poll, run_server_cli

OLD = ("safe", "sensitive")
NEW = ("cat", "dog", "fox")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reload")
    live = make_bundle(tmp / "models", OLD, size=32)
    staged = make_bundle(
        tmp / "staged" / "bundle.zip", NEW, size=24, seed=1, threshold=0.5, positive_class="dog"
    )
    srv = ServerProcess(tmp, live, "--reload-poll-seconds", "0.3", "--batch-wait-ms", "5")
    yield srv, live, staged
    assert srv.stop() == 0, srv.log()


class Load:
    """Threads posting images back to back, recording every outcome."""

    def __init__(self, url: str, workers: int = 6):
        self.url = url
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: list[tuple[int, tuple[str, ...] | str]] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(workers)]

    def _run(self, seed: int) -> None:
        data = f.jpeg(seed)
        with httpx.Client(timeout=20) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(
                        f"{self.url}/predict", content=data, headers={"Content-Type": "image/jpeg"}
                    )
                    body = r.json()
                    got = tuple(body["results"][0]["probabilities"]) if r.is_success else r.text
                    outcome = (r.status_code, got)
                except Exception as exc:
                    outcome = (0, repr(exc))
                with self.lock:
                    self.outcomes.append(outcome)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def _get(url: str, route: str) -> dict:
    return httpx.get(f"{url}{route}", timeout=10).json()


def _wait(url: str, route: str, done, what: str, timeout: float = 30) -> dict:
    """Poll ``route`` until ``done(json)``; that answer."""

    def answered() -> dict | None:
        answer = _get(url, route)
        return answer if done(answer) else None

    answer = poll(answered, timeout)
    if answer is None:
        raise TimeoutError(f"{what}; last {route}: {_get(url, route)}")
    return answer


def _predict_md5(url: str) -> str:
    r = httpx.post(f"{url}/predict", content=f.png(1), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()["model"]["bundle_md5"]


def _no_absolute_paths(doc: dict) -> None:
    absolute = [s for s in string_values(doc) if s.startswith("/")]
    assert absolute == [], absolute


def test_file_change_and_sighup_reload_without_failures(setup):
    srv, live, staged = setup
    before = _get(srv.url, "/version")
    assert before["class_names"] == list(OLD) and before["bundle_md5"] == file_md5(live)
    with Load(srv.url) as load:
        time.sleep(1.0)
        # as promote (or `dvc checkout`) does: a new bundle under a temporary name, renamed
        # over models/bundle.zip while requests keep coming
        replace_atomically(staged, live)
        after = _wait(
            srv.url,
            "/version",
            lambda v: v["bundle_md5"] != before["bundle_md5"],
            "the server never swapped the bundle",
        )
        time.sleep(1.0)
        reloads = _get(srv.url, "/readyz")["reloads"]
        srv.signal(signal.SIGHUP)
        _wait(srv.url, "/readyz", lambda r: r["reloads"] == reloads + 1, "SIGHUP did not reload")
        time.sleep(1.0)

    assert after["bundle_md5"] == file_md5(staged)
    assert after["class_names"] == list(NEW)
    assert after["image_size"] == 24
    assert after["operating_point"] == {"positive_class": "dog", "threshold": 0.5}
    assert after["last_reload_error"] is None
    ready = _get(srv.url, "/readyz")
    assert ready["bundle_md5"] == file_md5(staged) and ready["last_reload_error"] is None
    failures = [o for o in load.outcomes if o[0] != 200]
    assert not failures, failures[:5]
    seen = [o[1] for o in load.outcomes]
    assert set(seen) == {OLD, NEW}
    first_new = seen.index(NEW)
    assert OLD not in seen[first_new + 12 :]  # a handful in flight at the swap, then only NEW
    assert len(seen) > 50
    assert "model swapped" in srv.log() and "SIGHUP" in srv.log()


def test_broken_bundle_keeps_the_old_one_and_shows_the_error(setup, tmp_path):
    srv, live, _ = setup
    good = live.read_bytes()
    old_md5 = file_md5(live)
    assert _get(srv.url, "/readyz")["bundle_md5"] == old_md5
    live.write_bytes(good[: len(good) // 2])  # a half-written bundle, in place
    ready = _wait(
        srv.url, "/readyz", lambda r: r["last_reload_error"] is not None, "no reload error shown"
    )
    error = ready["last_reload_error"]
    assert set(error) == {"at", "reason", "error"}
    assert error["reason"] == "model files changed on disk"
    assert error["error"].startswith("bundle.zip: not a complete bundle (BadZipFile"), error
    assert ready["status"] == "ready" and ready["bundle_md5"] == old_md5
    version = _get(srv.url, "/version")
    assert version["last_reload_error"] == error
    assert version["bundle_md5"] == old_md5
    _no_absolute_paths(version)
    assert _predict_md5(srv.url) == old_md5
    assert "reload failed" in srv.log()

    fresh = make_bundle(tmp_path / "fresh.zip", OLD, size=32, seed=5)
    replace_atomically(fresh, live)
    ready = _wait(
        srv.url, "/readyz", lambda r: r["bundle_md5"] == file_md5(fresh), "good bundle not loaded"
    )
    assert ready["last_reload_error"] is None
    assert _get(srv.url, "/version")["last_reload_error"] is None
    assert _predict_md5(srv.url) == file_md5(fresh)


def test_bundle_that_failed_its_gate_is_refused_on_reload(setup, tmp_path):
    srv, live, _ = setup
    old_md5 = file_md5(live)
    reloads = _get(srv.url, "/readyz")["reloads"]
    failed = make_bundle(tmp_path / "failed.zip", NEW, size=24, seed=2, gate_passed=False)
    replace_atomically(failed, live)
    ready = _wait(
        srv.url, "/readyz", lambda r: r["last_reload_error"] is not None, "no reload error shown"
    )
    assert ready["last_reload_error"]["error"] == (
        "bundle.zip: the bundle did not pass its quality gate"
    )
    assert ready["bundle_md5"] == old_md5 and ready["reloads"] == reloads
    version = _get(srv.url, "/version")
    assert version["class_names"] == list(OLD) and version["bundle_md5"] == old_md5
    assert version["last_reload_error"] == ready["last_reload_error"]
    assert _predict_md5(srv.url) == old_md5
    # SIGHUP retries the same refused file: still refused, still the old bundle
    srv.signal(signal.SIGHUP)
    _wait(
        srv.url,
        "/readyz",
        lambda r: (r["last_reload_error"] or {}).get("reason") == "SIGHUP",
        "SIGHUP reload of the refused bundle not reported",
    )
    assert _predict_md5(srv.url) == old_md5


def test_bundle_that_failed_its_gate_is_refused_at_start(tmp_path):
    failed = make_bundle(tmp_path / "models", gate_passed=False)
    proc = run_server_cli(
        *("--model", str(failed), "--http-port", "0", "--tcp-port", "0"),
        *("--ports-file", str(tmp_path / "ports.json")),
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    reason = "ERROR imgclf.serving.server: bundle.zip: the bundle did not pass its quality gate"
    assert lines[0].endswith(f" {reason}"), lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "ports.json").exists()  # it never listened


def test_version_after_reloads_is_still_path_free(setup):
    srv, _, _ = setup
    version = _get(srv.url, "/version")
    _no_absolute_paths(version)
    assert json.dumps(version).count(str(srv.tmp)) == 0


LINEAGE = ("registry", "mlflow_run_id", "run_name", "git_commit")


def _register(uri: str, bundle, name: str, commit: str) -> dict:
    """Register ``bundle`` as promote does, from a run named ``name`` made at ``commit``;
    the lineage ``/version`` should then give for it."""
    from imgclf import tracking
    from imgclf.config import PATHS
    from imgclf.params import load_params

    ml = load_params(PATHS.params).mlflow  # what the server looks up
    run = tracking.Run.start(uri, "imgclf", name, bundle.parent / "pending", run_name=name)
    got = run.register_bundle(
        bundle, ml.registered_model, "accuracy", 0.9, ml.champion_alias, commit
    )
    run.end()
    assert run.ok, run.error
    alias = got["alias"]
    registry = {"name": ml.registered_model, "version": got["version"], "alias": alias}
    return {"registry": registry, "mlflow_run_id": run.run_id, "run_name": name,
            "git_commit": commit}  # fmt: skip


def test_an_older_registered_bundle_checked_out_shows_its_own_lineage(tmp_path):
    """As ``git checkout`` of an older commit or ``dvc exp apply``: ``bundle.zip`` goes back
    to an older registered bundle while ``bundle.run.json`` still describes the newer one;
    after the reload ``/version`` names the older one's version, run and commit."""
    from imgclf.bundle import write_run_facts

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    older = make_bundle(tmp_path / "older" / "bundle.zip", seed=1)
    live = make_bundle(tmp_path / "models", seed=2)
    old_lineage = _register(uri, older, "repro-older", "a" * 40)
    new_lineage = _register(uri, live, "repro-newer", "b" * 40)  # the alias moves to it
    old_lineage["registry"]["alias"] = None
    registered = {**new_lineage["registry"], "champion_version": "2"}
    facts = {k: new_lineage[k] for k in ("mlflow_run_id", "run_name", "git_commit")}
    write_run_facts(live, {"bundle_md5": file_md5(live), **facts, "registered": registered})
    env = {"MLFLOW_TRACKING_URI": uri}
    srv = ServerProcess(tmp_path, live, "--reload-poll-seconds", "0.3", env=env)
    try:
        version = _get(srv.url, "/version")
        assert {k: version[k] for k in LINEAGE} == new_lineage
        replace_atomically(older, live)
        version = _wait(
            srv.url, "/version", lambda v: v["bundle_md5"] == file_md5(older), "no reload"
        )
        assert {k: version[k] for k in LINEAGE} == old_lineage
        assert old_lineage["registry"]["version"] == "1"
    finally:
        assert srv.stop() == 0, srv.log()
    assert "registry look-up" not in srv.log()  # no failure to report
