"""Each runtime behind a real ``serve/server.py``: over HTTP and the TCP protocol, the same
file gets Keras' answer (probabilities within 1e-4, the same decision), and ``/version``
says which runtime answered and why."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from imgclf.runtimes import pick
from imgclf.serving.predictor import Predictor
from imgclf.testing import images as f
from imgclf.testing.bundles import export_beside, make_bundle
from imgclf.testing.server import ServerProcess

PROMPT = b"# Path: "
RUNTIMES = ("keras", "tflite", "onnx")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A three-class bundle with its exports beside it, and images to classify."""
    tmp = tmp_path_factory.mktemp("runtimes")
    bundle = make_bundle(tmp / "models", class_names=("a", "b", "c"), threshold=0.3)
    export_beside(bundle)
    for i in range(4):
        f.write(tmp / "root" / f"{i}.jpg", f.jpeg(i, (60 + 7 * i, 45)))
    return tmp


@pytest.fixture(scope="module")
def expected(tree):
    """Keras' answers, in process."""
    predictor = Predictor.load(tree / "models", runtime="keras")
    files = sorted((tree / "root").glob("*.jpg"))
    return {str(p): answer for p, answer in predictor.predict_paths(files)}


@pytest.fixture(scope="module", params=RUNTIMES)
def server(request, tree, tmp_path_factory):
    own = tmp_path_factory.mktemp(request.param)  # its own ports file and log
    flags = ("--runtime", request.param, "--scan-root", str(tree / "root"))
    srv = ServerProcess(own, tree / "models", *flags)
    yield request.param, srv
    assert srv.stop() == 0, srv.log()


def tcp_answer(port: int, path: str) -> dict:
    """The TCP protocol's JSON reply for one path."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        buf = b""
        while not buf.endswith(PROMPT):
            buf += sock.recv(65536)
        sock.sendall(path.encode() + b"\r\n")
        buf = b""
        while not buf.endswith(PROMPT):
            chunk = sock.recv(65536)
            assert chunk, buf
            buf += chunk
    head = f"> Scanning: {path}\n> Result for : {path}\n\n".encode()
    assert buf.startswith(head), buf
    return json.loads(buf[len(head) : -len(PROMPT)])


def assert_same(probabilities: dict, decision: dict, want: dict) -> None:
    assert decision == want["decision"]
    assert set(probabilities) == set(want["probabilities"])
    for name, p in probabilities.items():
        assert abs(p - want["probabilities"][name]) <= 1e-4, (name, p, want)


def test_http_and_tcp_answer_as_keras_and_version_names_the_runtime(server, expected):
    runtime, srv = server
    version = httpx.get(f"{srv.url}/version", timeout=10).json()
    assert version["runtime"]["name"] == runtime
    assert version["runtime"]["why"] == "requested"
    if runtime != "keras":
        assert version["runtime"]["parity"]["passed"] is True
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        for path, want in expected.items():
            data = Path(path).read_bytes()
            r = client.post("/predict", content=data, headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200, r.text
            result = r.json()["results"][0]
            assert_same(result["probabilities"], result["decision"], want)
            doc = tcp_answer(srv.tcp_port, path)
            assert_same(doc[path], doc["__decision__"][path], want)


def test_auto_serves_the_fastest_and_logs_why(tree, tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("auto"), tree / "models")
    try:
        account = httpx.get(f"{srv.url}/version", timeout=10).json()["runtime"]
    finally:
        assert srv.stop() == 0, srv.log()
    timings = account["timings_ms"]
    assert set(timings) == set(RUNTIMES)
    assert account["name"] == pick(timings)
    assert f"on {account['name']} (fastest batch-1 call: " in srv.log()
