"""The HTTP side of a real ``serve/server.py`` process: what needs a socket and a process.

The API's contract (bodies, status codes, OpenAPI) is tested in process, in
``tests/unit/test_http_api.py``; here: one smoke test over a real socket, the connection
deadlines (headers, keep-alive idle, between body chunks, whole body) on raw sockets, health
and predictions while many idle and slow connections are open, the bound address and a clean
exit on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from imgclf.files import file_md5
from imgclf.testing import images as f
from imgclf.testing.bundles import make_bundle
from imgclf.testing.server import ServerProcess, read_to_close

IDLE_TIMEOUT = 1.0  # to send a request's headers, and keep-alive idle time
READ_TIMEOUT = 1.0  # between two body chunks
BODY_TIMEOUT = 2.0  # for a whole body
MARGIN = 1.0  # scheduling slack on a busy 2-core machine
TRICKLE = 0.3  # seconds between two bytes of a slow client: under every per-read deadline


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    srv = ServerProcess(
        tmp,
        make_bundle(tmp / "models"),
        *("--http-idle-timeout", str(IDLE_TIMEOUT), "--read-timeout", str(READ_TIMEOUT)),
        *("--http-body-timeout", str(BODY_TIMEOUT), "--reload-poll-seconds", "0"),
    )
    yield srv
    assert srv.stop() == 0, srv.log()  # SIGTERM: a clean shutdown, not death by signal


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.http_port), timeout=10)


def _response(sock: socket.socket) -> bytes:
    """One whole response (headers and a ``Content-Length`` body) read from ``sock``."""
    got = b""
    while (chunk := sock.recv(4096)) and b"\r\n\r\n" not in (got := got + chunk):
        pass
    head, body = got.split(b"\r\n\r\n", 1)
    fields = dict(line.split(b":", 1) for line in head.lower().split(b"\r\n")[1:])
    while len(body) < int(fields[b"content-length"]) and (chunk := sock.recv(4096)):
        body += chunk
    return head + b"\r\n\r\n" + body


def _trickle(sock: socket.socket, data: bytes, within: float) -> tuple[bytes | None, float]:
    """Send ``data`` one byte every ``TRICKLE`` seconds, up to the server's first answer or
    close; what it sent back up to its close (None: still open after ``within`` seconds)
    and the seconds that took."""
    start = time.monotonic()
    for byte in data:
        if time.monotonic() - start > within:
            break
        if select.select([sock], [], [], TRICKLE)[0]:  # an answer, or the close
            break
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
    got = read_to_close(sock, max(0.5, within - (time.monotonic() - start)))
    return got, time.monotonic() - start


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
    with _connect(server) as s:
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


def test_connection_that_never_sends_is_closed_after_the_idle_deadline(server):
    with _connect(server) as s:
        start = time.monotonic()
        got = read_to_close(s, IDLE_TIMEOUT + MARGIN + 2)
        waited = time.monotonic() - start
    assert got == b"", f"still open after {waited:.1f} s"
    assert IDLE_TIMEOUT - 0.1 <= waited < IDLE_TIMEOUT + MARGIN


def test_headers_trickled_byte_by_byte_are_cut_at_the_idle_deadline(server):
    """Every byte arrives well within any per-read timeout, but the headers never end in
    time: the deadline runs from the connection's start and bytes do not extend it."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"
    with _connect(server) as s:
        got, waited = _trickle(s, request, within=IDLE_TIMEOUT + MARGIN + 2)
    assert got is not None, f"still open after {waited:.1f} s"
    assert not got.startswith(b"HTTP/1.1 200"), got
    assert IDLE_TIMEOUT - 0.1 <= waited < IDLE_TIMEOUT + MARGIN


def test_body_trickled_past_the_whole_body_deadline_gets_408(server):
    """Each byte comes within ``read_timeout`` of the last; the body as a whole does not
    come within ``http_body_timeout``."""
    with _connect(server) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        got, waited = _trickle(s, b"x" * 1000, within=BODY_TIMEOUT + MARGIN + 2)
    assert got is not None, f"still open after {waited:.1f} s"
    assert got.startswith(b"HTTP/1.1 408"), got
    assert b"connection: close" in got.lower()
    assert json.loads(got.split(b"\r\n\r\n", 1)[1]) == {
        "detail": f"body not complete within {BODY_TIMEOUT:g} s"
    }
    assert BODY_TIMEOUT <= waited < BODY_TIMEOUT + MARGIN


def test_idle_keep_alive_connection_is_closed_after_the_idle_deadline(server):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with _connect(server) as s:
        s.sendall(request)
        first = _response(s)
        time.sleep(IDLE_TIMEOUT / 2)  # within the deadline: the connection is reused
        s.sendall(request)
        second = _response(s)
        start = time.monotonic()  # after the reply: the idle clock runs from here
        got = read_to_close(s, IDLE_TIMEOUT + MARGIN + 2)
        waited = time.monotonic() - start
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200"), second
    assert got == b"", f"still open after {waited:.1f} s"
    assert IDLE_TIMEOUT - 0.1 <= waited < IDLE_TIMEOUT + MARGIN


@contextlib.contextmanager
def _slow_clients(server, idle: int, tricklers: int) -> Iterator[list[socket.socket]]:
    """``idle`` connections that send nothing and ``tricklers`` that send a request's
    headers one byte every ``TRICKLE`` seconds (from a thread), closed on exit."""
    socks = [_connect(server) for _ in range(idle + tricklers)]
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(TRICKLE):
            for s in socks[idle:]:
                with contextlib.suppress(OSError):
                    s.send(b"X")  # a header name that never ends

    for s in socks[idle:]:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield socks
    finally:
        stop.set()
        thread.join()
        for s in socks:
            s.close()


def test_health_and_predictions_answer_while_slow_clients_hold_connections(server):
    """150 silent and 20 trickling connections (more than a connection cap such as
    uvicorn's ``limit_concurrency`` of 128) take no slot from a normal client; the server
    then closes them all by the idle deadline."""
    with _slow_clients(server, idle=150, tricklers=20) as socks:
        opened = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            health = client.get("/healthz")
            ready = client.get("/readyz")
            raw = client.post("/predict", content=f.jpeg(1), headers={"Content-Type": "image/jpeg"})
        answered = time.monotonic() - opened
        assert (health.status_code, ready.status_code) == (200, 200), health.text
        assert raw.status_code == 200, raw.text
        assert answered < IDLE_TIMEOUT  # while every slow connection was still open
        # ... and none of them outlives the deadline
        deadline = opened + IDLE_TIMEOUT + MARGIN
        still_open = [s for s in socks if read_to_close(s, deadline - time.monotonic()) is None]
    assert not still_open, f"{len(still_open)} of {len(socks)} connections still open"


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
