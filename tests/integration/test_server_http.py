"""The HTTP side of a real ``serve/server.py`` process: what needs a socket and a process.

The API's contract (bodies, status codes, OpenAPI) is tested in process, in
``tests/unit/test_http_api.py``; here: one smoke test over a real socket, the read
deadline, the bound address and a clean exit on SIGTERM.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from imgclf.files import file_md5
from imgclf.testing import images as f
from imgclf.testing.bundles import make_bundle
from imgclf.testing.server import ServerProcess

READ_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    srv = ServerProcess(
        tmp,
        make_bundle(tmp / "models"),
        *("--read-timeout", str(READ_TIMEOUT), "--reload-poll-seconds", "0"),
    )
    yield srv
    assert srv.stop() == 0, srv.log()  # SIGTERM: a clean shutdown, not death by signal


def test_smoke_raw_and_multipart_over_a_real_socket(server):
    md5 = file_md5(server.bundle)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        ready = client.get("/readyz").json()
        raw = client.post("/predict", content=f.jpeg(1), headers={"Content-Type": "image/jpeg"})
        files = [("files", (f"{i}.png", f.png(i), "image/png")) for i in range(2)]
        multi = client.post("/predict", files=files)
        page = client.get("/")
    assert (ready["status"], ready["bundle_md5"]) == ("ready", md5)
    assert raw.status_code == 200, raw.text
    assert raw.json()["model"]["bundle_md5"] == md5
    assert set(raw.json()["results"][0]["probabilities"]) == {"safe", "sensitive"}
    assert multi.status_code == 200, multi.text
    assert [a["name"] for a in multi.json()["results"]] == ["0.png", "1.png"]
    assert page.status_code == 200 and "<input" in page.text


def test_slow_body_times_out_with_408(server):
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        start = time.monotonic()  # before the server can start its clock
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 1000\r\n\r\n0123456789"
        )
        reply = s.recv(4096)  # the status line: the clock stops here
        waited = time.monotonic() - start
        while chunk := s.recv(4096):  # then the rest, up to the close (Connection: close)
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1]) == {"detail": "no body data for 1 s"}
    assert READ_TIMEOUT <= waited < READ_TIMEOUT + 3


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


def test_listens_on_loopback_only_by_default(server):
    """127.0.0.2 is this machine too, but not the address bound: a socket bound to every
    address (0.0.0.0) would answer there."""
    with socket.create_server(("0.0.0.0", 0)) as everywhere:  # the check can tell
        assert _connects("127.0.0.2", everywhere.getsockname()[1])
    for port in (server.http_port, server.tcp_port):
        assert _connects("127.0.0.1", port)
        assert not _connects("127.0.0.2", port)
