"""The HTTP API of a real ``serve/server.py`` process, with a real HTTP client."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from imgclf.testing import images as f
from imgclf.testing.bundles import RUN_FACTS, bundle_info, make_bundle, md5, string_values
from imgclf.testing.server import ServerProcess

MAX_BODY = 200_000
# A fuzzed 83-byte GIF on which Pillow's decoder raises IndexError (not a clean error).
QUEUE = 8
RUN_ID = "5f" * 16  # the MLflow run the bundle says it came from
VERSION_KEYS = {
    "source", "dvc_lock", "registry", "bundle_md5", "class_names", "image_size",
    "operating_point", "gate", "metrics", "data_hash", "git_commit", "mlflow_run_id",
    "run_name", "loaded_at", "last_reload_error",
}  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    srv = ServerProcess(
        tmp,
        make_bundle(tmp / "models", mlflow_run_id=RUN_ID),
        "--max-body-bytes",
        str(MAX_BODY),
        "--queue-size",
        str(QUEUE),
        "--read-timeout",
        "1",
        "--reload-poll-seconds",
        "0",
        "--batch-wait-ms",
        "20",
    )
    yield srv
    assert srv.stop() in (0, -15), srv.log()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def _check_answer(answer: dict) -> None:
    probs = answer["probabilities"]
    assert set(probs) == {"safe", "sensitive"}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert answer["top_class"] == max(probs, key=probs.get)
    decision = answer["decision"]
    assert decision["rule"] == "threshold" and decision["threshold"] == 0.4
    expected = "sensitive" if probs["sensitive"] >= 0.4 else "safe"
    assert decision["label"] == expected


def test_raw_body_image(client, server):
    r = client.post("/predict", content=f.jpeg(1), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    (answer,) = r.json()["results"]
    _check_answer(answer)
    assert r.json()["model"] == {"bundle_md5": md5(server.bundle), "mlflow_run_id": RUN_ID}


def test_multipart_several_images_one_bad(client):
    files = [
        ("files", ("a.jpg", f.jpeg(2), "image/jpeg")),
        ("files", ("b.png", f.png(3), "image/png")),
        ("files", ("c.gif", f.animated_gif(), "image/gif")),
        ("files", ("bad.jpg", b"not an image", "image/jpeg")),
    ]
    r = client.post("/predict", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [a["name"] for a in results] == ["a.jpg", "b.png", "c.gif", "bad.jpg"]
    for answer in results[:3]:
        _check_answer(answer)
    assert "not an image" in results[3]["error"]


def test_same_image_same_answer_raw_and_multipart(client):
    data = f.png(4)
    raw = client.post("/predict", content=data, headers={"Content-Type": "image/png"})
    multi = client.post("/predict", files={"file": ("x.png", data, "image/png")})
    assert raw.json()["results"][0]["probabilities"] == pytest.approx(
        multi.json()["results"][0]["probabilities"], abs=1e-6
    )


@pytest.mark.parametrize(
    ("body", "ctype", "status", "words"),
    [
        (b"\x00garbage bytes\xff" * 10, "application/octet-stream", 422, "not an image"),
        (f.truncated_jpeg(), "image/jpeg", 422, "truncated"),
        (f.bomb_png(), "image/png", 422, "too many pixels"),
        (f.CRASHING_GIF, "image/gif", 422, "corrupt"),
        (b"", "image/jpeg", 400, "empty body"),
        (b"x" * (MAX_BODY + 1), "image/jpeg", 413, "larger than"),
        (b'{"a": 1}', "application/json", 415, "multipart"),
        (b"--nope\r\n\r\n", "multipart/form-data; boundary=zzz", 400, "multipart"),
    ],
    ids=[
        "garbage",
        "truncated",
        "bomb",
        "decoder-bug",
        "empty",
        "oversized",
        "json",
        "bad-multipart",
    ],
)
def test_bad_input_is_4xx_with_message(client, body, ctype, status, words):
    r = client.post("/predict", content=body, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert client.get("/readyz").status_code == 200  # the worker survived


def test_oversized_streamed_body_without_length_is_413(client):
    def chunks():
        for _ in range(10):
            yield b"y" * 50_000

    r = client.post("/predict", content=chunks(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 413


def test_slow_body_times_out_with_408(server):
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 1000\r\n\r\n0123456789"
        )
        start = time.monotonic()
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert time.monotonic() - start < 5


def test_queue_full_is_503_not_a_pile_up(client):
    files = [("files", (f"{i}.png", f.png(i), "image/png")) for i in range(QUEUE + 1)]
    r = client.post("/predict", files=files)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert "busy" in r.json()["detail"]


def test_concurrent_requests_are_micro_batched(server, client):
    before = client.get("/readyz").json()
    images = [f.jpeg(i) for i in range(QUEUE)]

    def post(data):
        with httpx.Client(base_url=server.url, timeout=10) as c:
            return c.post("/predict", content=data, headers={"Content-Type": "image/jpeg"})

    with ThreadPoolExecutor(QUEUE) as pool:
        responses = list(pool.map(post, images))
    assert [r.status_code for r in responses] == [200] * QUEUE
    after = client.get("/readyz").json()
    assert after["images"] - before["images"] == QUEUE
    assert after["batches"] - before["batches"] < QUEUE  # some calls held several images


def test_health_version_and_docs(client, server):
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz").json()
    assert set(ready) == {
        "status", "bundle_md5", "reloads", "last_reload_error", "batches", "images",
    }  # fmt: skip
    assert ready["status"] == "ready" and ready["bundle_md5"] == md5(server.bundle)
    assert ready["reloads"] == 0 and ready["last_reload_error"] is None
    v = client.get("/version").json()
    assert set(v) == VERSION_KEYS
    info = bundle_info()
    assert v["source"] == "bundle.zip"  # outside the project: the name, never the full path
    assert v["dvc_lock"] is None
    assert v["bundle_md5"] == md5(server.bundle)
    assert v["class_names"] == ["safe", "sensitive"] and v["image_size"] == 32
    assert v["operating_point"] == {"positive_class": "sensitive", "threshold": 0.4}
    for key in ("gate", "metrics", "data_hash"):
        assert v[key] == info[key], key
    # run facts come from bundle.run.json beside the bundle, not from its bytes
    assert (v["mlflow_run_id"], v["run_name"]) == (RUN_ID, RUN_FACTS["run_name"])
    assert v["git_commit"] == RUN_FACTS["git_commit"]
    assert v["gate"]["passed"] is True
    assert v["last_reload_error"] is None
    assert 0 < time.time() - v["loaded_at"] < 3600
    spec = client.get("/openapi.json").json()
    assert "/predict" in spec["paths"]
    assert "multipart/form-data" in json.dumps(spec["paths"]["/predict"])
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<input" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN


def test_version_shows_no_absolute_path(client, server):
    v = client.get("/version").json()
    assert str(server.tmp) not in json.dumps(v)
    absolute = [s for s in string_values(v) if s.startswith("/")]
    assert absolute == [], absolute


def test_binds_loopback_by_default(server):
    assert "serving HTTP on http://127.0.0.1:" in server.log()
