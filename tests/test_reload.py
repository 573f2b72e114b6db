"""Hot reload under load: new model files on disk and SIGHUP, zero failed requests."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import httpx
import pytest

import imagefactory as f
from serve_fixtures import ServerProcess, make_model

pytestmark = pytest.mark.integration

OLD = ("safe", "sensitive")
NEW = ("cat", "dog", "fox")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reload")
    live = make_model(tmp / "models", OLD, size=32)
    staged = make_model(tmp / "staged", NEW, size=24, seed=1, threshold=0.5, positive_class="dog")
    srv = ServerProcess(tmp, live, "--reload-poll-seconds", "0.3", "--batch-wait-ms", "5")
    yield srv, live, staged
    srv.stop()


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


def _wait_version(url: str, changed_from: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = httpx.get(f"{url}/version").json()
        if v["model_md5"] != changed_from:
            return v
        time.sleep(0.1)
    raise TimeoutError("the server never swapped the model")


def test_file_change_and_sighup_reload_without_failures(setup):
    srv, live, staged = setup
    before = httpx.get(f"{srv.url}/version").json()
    assert before["class_names"] == list(OLD)
    with Load(srv.url) as load:
        time.sleep(1.0)
        # as `dvc checkout` would: the files replaced on disk, while requests keep coming
        for name in ("model.keras", "metadata.json", "operating_point.json"):
            shutil.copy2(staged / name, live / f".{name}.tmp")
            os.replace(live / f".{name}.tmp", live / name)
        after = _wait_version(srv.url, before["model_md5"])
        time.sleep(1.0)
        reloads = httpx.get(f"{srv.url}/readyz").json()["reloads"]
        srv.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while httpx.get(f"{srv.url}/readyz").json()["reloads"] == reloads:
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.1)
        time.sleep(1.0)

    assert after["class_names"] == list(NEW)
    assert after["image_size"] == 24
    assert after["operating_point"] == {"positive_class": "dog", "threshold": 0.5}
    failures = [o for o in load.outcomes if o[0] != 200]
    assert not failures, failures[:5]
    seen = [o[1] for o in load.outcomes]
    assert set(seen) == {OLD, NEW}
    first_new = seen.index(NEW)
    assert NEW in seen[first_new:] and len(seen) > 50
    assert "model swapped" in srv.log() and "SIGHUP" in srv.log()


def test_broken_new_files_keep_the_old_model(setup):
    srv, live, _ = setup
    before = httpx.get(f"{srv.url}/version").json()
    (live / "model.keras").write_bytes(b"half-written junk")
    time.sleep(2.0)
    assert httpx.get(f"{srv.url}/readyz").status_code == 200
    now = httpx.get(f"{srv.url}/version").json()
    assert now["model_md5"] == before["model_md5"]
    r = httpx.post(f"{srv.url}/predict", content=f.png(1), headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    assert "reload failed" in srv.log()
