"""The origin's TCP telnet protocol on a real ``serve/server.py``, with a raw socket, and
the server's start-up failures on bad flags.

A second server with short deadlines and few slots (``quick``) checks that idle, slow and
non-reading clients are closed and their slots freed, that a full server makes room by
closing its longest-idle session, and that a folder's reply is streamed as it is classified
and stops being classified when the client leaves.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import socket
import time
from pathlib import Path

import httpx
import pytest

from imgclf.serving.predictor import Predictor
from imgclf.serving.tcp import MAX_LINE
from imgclf.testing import images as f
from imgclf.testing.bundles import make_bundle
from imgclf.testing.server import ServerProcess, poll, read_to_close, run_server_cli

GREETING = b"\n\nWelcome! Enter image path to scan\n# Path: "
PROMPT = b"# Path: "
TOO_MANY = b"> Error: too many connections, try again later\n"
MADE_ROOM = b"\n> Error: closed after being idle the longest, to make room for another client\n"

# the quick server
IDLE = 3.0  # at the prompt: longer than a test takes to fill every slot
LINE = 1.0  # to finish a line
DRAIN = 1.0  # to take a reply
MAX_CLIENTS = 3
MARGIN = 1.5  # scheduling slack on a busy 2-core machine
TRICKLE = 0.25  # seconds between two bytes of a slow client: well within the idle deadline
MANY = 600  # tiny images in root/many: ~0.5 s to classify, 8 at a time
NOISE = 1000  # dangling links with ~2 KB targets in root/noise: a ~2 MB reply, no model call
REPEATS = 8  # root/noise asked that many times: more than any socket buffers hold
FAR = "/nonexistent/" + "/".join(["y" * 200] * 10)  # where root/noise's links lead


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """scan root with images, a sub-folder, a bad file and symlinks escaping to outside/."""
    tmp = tmp_path_factory.mktemp("tcp")
    root = tmp / "root"
    f.write(root / "imgs" / "a.jpg", f.jpeg(1))
    f.write(root / "imgs" / "b.png", f.png(2))
    f.write(root / "imgs" / "bad.jpg", b"definitely not a jpeg")
    f.write(root / "imgs" / ".hidden.jpg", f.jpeg(5))  # skipped, as predict.py skips it
    f.write(root / "imgs" / "sub" / "deep.jpg", f.jpeg(3))
    f.write(tmp / "outside" / "secret.jpg", f.jpeg(4))
    (root / "escape.jpg").symlink_to(tmp / "outside" / "secret.jpg")
    (root / "imgs" / "link.jpg").symlink_to(tmp / "outside" / "secret.jpg")
    (root / "linkdir").symlink_to(tmp / "outside", target_is_directory=True)
    (root / "inner.jpg").symlink_to(root / "imgs" / "a.jpg")  # stays inside: allowed
    # per-entry problems: each one an __errors__ entry, the rest of the folder answered
    odd = root / "odd"
    f.write(odd / "ok.jpg", f.jpeg(6))
    os.mkfifo(odd / "fifo.jpg")
    (odd / "dangling.jpg").symlink_to(odd / "gone.jpg")
    (odd / "loop.jpg").symlink_to(odd / "loop.jpg")
    tiny = f.jpeg(7)
    for i in range(MANY):
        f.write(root / "many" / f"img{i:04}.jpg", tiny)
    (root / "noise").mkdir()
    for i in range(NOISE):
        (root / "noise" / f"link{i:04}").symlink_to(FAR)
    return tmp


@pytest.fixture(scope="module")
def bundle(tree):
    return make_bundle(tree / "models")


@pytest.fixture(scope="module")
def server(tree, bundle):
    srv = ServerProcess(tree, bundle, "--scan-root", str(tree / "root"))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def quick(tree, bundle, tmp_path_factory):
    """A server with short TCP deadlines, 3 slots and batches of 8."""
    srv = ServerProcess(
        tmp_path_factory.mktemp("tcp-quick"),
        bundle,
        *("--scan-root", str(tree / "root"), "--max-batch", "8", "--reload-poll-seconds", "0"),
        *("--tcp-idle-timeout", str(IDLE), "--tcp-line-timeout", str(LINE)),
        *("--tcp-drain-timeout", str(DRAIN), "--tcp-max-clients", str(MAX_CLIENTS)),
    )
    yield srv
    assert srv.stop() == 0, srv.log()


class Session:
    """A telnet-like client: send bytes, read until the next prompt."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def read_until_prompt(self) -> bytes:
        while not self.buf.endswith(PROMPT):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        out, self.buf = self.buf, b""
        return out

    def read_until(self, marker: bytes) -> bytes:
        """What came until ``marker`` first appeared (the rest of that read included)."""
        while marker not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, self.buf
            self.buf += chunk
        out, self.buf = self.buf, b""
        return out

    def ask(self, line: str, end: bytes = b"\r\n") -> str:
        self.sock.sendall(line.encode() + end)
        return self.read_until_prompt().decode()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def session(server):
    s = Session(server.tcp_port)
    assert s.read_until_prompt() == GREETING
    yield s
    s.close()


def _json(reply: str, path: str) -> dict:
    head = f"> Scanning: {path}\n> Result for : {path}\n\n"
    assert reply.startswith(head), reply
    assert reply.endswith("}\n\n# Path: "), reply
    return json.loads(reply[len(head) : -len("# Path: ")])


def test_file(session, tree):
    path = str(tree / "root" / "imgs" / "a.jpg")
    start = time.monotonic()
    doc = _json(session.ask(path), path)
    waited = time.monotonic() - start
    assert set(doc) == {path, "__decision__", "__time__"}
    predictor = Predictor.load(tree / "models")
    want = predictor.describe(predictor.predict_arrays(predictor.decode_image(Path(path))[None])[0])
    assert doc[path] == pytest.approx(want["probabilities"], abs=1e-6)
    assert doc["__decision__"][path] == want["decision"]
    assert 0 < doc["__time__"] <= waited  # the server's own time, within the round trip


def test_folder_non_recursive_with_bad_file_and_escaping_link(session, tree):
    folder = str(tree / "root" / "imgs") + "/"
    doc = _json(session.ask(folder), folder)
    assert sorted(k for k in doc if not k.startswith("__")) == [folder + "a.jpg", folder + "b.png"]
    assert ".hidden" not in json.dumps(doc)
    assert set(doc["__errors__"]) == {folder + "bad.jpg", folder + "link.jpg"}
    assert "outside the scan roots" in doc["__errors__"][folder + "link.jpg"]
    assert "sub" not in json.dumps(doc)


def test_folder_entries_that_are_not_files_are_errors_and_the_rest_is_answered(session, tree):
    folder = str(tree / "root" / "odd") + "/"
    doc = _json(session.ask(folder), folder)
    assert list(doc["__decision__"]) == [folder + "ok.jpg"]
    assert doc["__errors__"] == {
        folder
        + "dangling.jpg": f"dangling symbolic link (to {tree / 'root' / 'odd' / 'gone.jpg'})",
        folder + "fifo.jpg": "not a regular file (FIFO)",
        folder + "loop.jpg": "symbolic link loop",
    }
    assert session.ask(str(tree / "root" / "imgs" / "a.jpg")).startswith("> Scanning")


def test_telnet_lf_only_and_partial_line_writes(session, tree):
    path = str(tree / "root" / "imgs" / "b.png")
    for piece in (path[:5], path[5:12], path[12:]):
        session.sock.sendall(piece.encode())
        time.sleep(0.05)
    session.sock.sendall(b"\r")
    time.sleep(0.05)
    session.sock.sendall(b"\n")
    assert path in _json(session.read_until_prompt().decode(), path)
    assert path in _json(session.ask(path, end=b"\n"), path)


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (lambda t: str(t / "root" / "nope.jpg"), "no such file or directory"),
        (lambda t: str(t / "root" / ".." / "outside" / "secret.jpg"), "'..' is not allowed"),
        (lambda t: "../../etc/passwd", "'..' is not allowed"),
        (lambda t: str(t / "outside" / "secret.jpg"), "outside the scan roots"),
        (lambda t: "/etc/passwd", "outside the scan roots"),
        (lambda t: str(t / "root" / "escape.jpg"), "outside the scan roots"),
        (lambda t: str(t / "root" / "linkdir") + "/", "outside the scan roots"),
        (lambda t: str(t / "root" / "linkdir" / "secret.jpg"), "outside the scan roots"),
        (lambda t: str(t / "root" / "odd" / "loop.jpg"), "symbolic link loop"),
    ],
    ids=[
        *("missing", "dotdot", "relative-dotdot", "absolute", "etc", "symlink", "linkdir"),
        *("via", "loop"),
    ],
)
def test_refused_paths_keep_the_session_usable(session, tree, make_path, message):
    path = make_path(tree)
    reply = session.ask(path)
    lines = reply.split("\n")
    assert lines[0] == f"> Scanning: {path}", reply
    assert lines[1].startswith(f"> Error: {message}"), reply
    assert lines[2:] == ["# Path: "], reply
    assert "secret" not in reply.replace(path, "")
    good = str(tree / "root" / "imgs" / "a.jpg")
    assert good in _json(session.ask(good), good)


def test_symlink_inside_the_root_is_allowed(session, tree):
    path = str(tree / "root" / "inner.jpg")
    assert path in _json(session.ask(path), path)


def test_empty_lines_long_lines_and_quit(session, tree):
    assert session.ask("") == "# Path: "
    reply = session.ask("x" * 5000)
    assert "line longer than" in reply
    good = str(tree / "root" / "imgs" / "a.jpg")
    assert good in _json(session.ask(good), good)
    session.sock.sendall(b"quit\r\n")
    tail = b""
    while chunk := session.sock.recv(1024):
        tail += chunk
    assert tail == b"> Bye\n"


def test_two_clients_at_once(server, tree):
    a, b = Session(server.tcp_port), Session(server.tcp_port)
    try:
        a.read_until_prompt()
        b.read_until_prompt()
        path = str(tree / "root" / "imgs" / "b.png")
        assert path in _json(b.ask(path), path)
        assert path in _json(a.ask(path), path)
    finally:
        a.close()
        b.close()


def test_bad_flag_values_are_one_line_and_exit_2():
    """As a user runs it: nothing but one ``error:`` line, before any model is loaded."""
    proc = run_server_cli("--batch-wait-ms", "-1", "--max-batch", "0")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: serve.yaml with flags: max_batch: input should be greater than 0 (got 0); "
        "batch_wait_ms: input should be greater than or equal to 0 (got -1.0)"
    ]
    assert proc.stdout == ""


@pytest.mark.parametrize("pieces", [1, 3], ids=["one-write", "three-writes"])
def test_the_line_after_an_over_long_line_is_answered(session, tree, pieces):
    good = str(tree / "root" / "imgs" / "a.jpg")
    data = b"x" * (MAX_LINE + 1000) + b"\r\n" + good.encode() + b"\r\n"
    cuts = [0, MAX_LINE // 2, MAX_LINE + 1001, len(data)] if pieces == 3 else [0, len(data)]
    for start, end in itertools.pairwise(cuts):
        session.sock.sendall(data[start:end])
        time.sleep(0.05)
    session.sock.settimeout(5)
    reply = b""
    while reply.count(PROMPT) < 2:
        reply += session.read_until_prompt()
    too_long = f"> Error: line longer than {MAX_LINE} bytes\n".encode() + PROMPT
    assert reply.startswith(too_long), reply
    assert good in _json(reply[len(too_long) :].decode(), good)


# ------------------------------------------------------------- the quick server's limits
def _greeting(server) -> bytes:
    """What a new client gets before the first prompt (or before it is closed)."""
    s = Session(server.tcp_port)
    try:
        return s.read_until_prompt()
    finally:
        s.close()


def _classified(server) -> int:
    """Images the server has run through the model so far."""
    return httpx.get(f"{server.url}/readyz", timeout=5).json()["images"]


def test_an_idle_session_is_closed_at_the_idle_deadline(quick):
    s = Session(quick.tcp_port)
    assert s.read_until_prompt() == GREETING
    start = time.monotonic()
    tail = read_to_close(s.sock, IDLE + MARGIN)
    waited = time.monotonic() - start
    s.close()
    assert tail == f"\n> Error: idle for {IDLE:g} s, closing\n".encode()
    assert IDLE - 0.1 < waited < IDLE + MARGIN


@pytest.mark.parametrize("opening", [b"", b"x" * (MAX_LINE + 1000)], ids=["trickled", "over-long"])
def test_a_line_not_finished_by_the_line_deadline_closes_the_session(quick, tree, opening):
    """A byte every TRICKLE seconds (an over-long line first: discarded, but the deadline
    holds while it is), never the newline: closed at LINE, long before IDLE."""
    s = Session(quick.tcp_port)
    assert s.read_until_prompt() == GREETING
    start = time.monotonic()
    s.sock.sendall(opening)
    for byte in str(tree / "root" / "imgs" / "a.jpg").encode() * 10:
        if select.select([s.sock], [], [], TRICKLE)[0]:  # the server has something to say
            break
        if time.monotonic() - start > LINE + MARGIN:
            break
        s.sock.sendall(bytes([byte]))
    tail = read_to_close(s.sock, MARGIN)
    waited = time.monotonic() - start
    s.close()
    assert tail == f"\n> Error: line not finished within {LINE:g} s, closing\n".encode()
    assert waited < LINE + MARGIN < IDLE


def test_when_full_of_idle_sessions_the_longest_idle_one_makes_room(quick, tree):
    sessions = []
    for _ in range(MAX_CLIENTS):
        sessions.append(Session(quick.tcp_port))
        assert sessions[-1].read_until_prompt() == GREETING
        time.sleep(0.1)
    oldest, *others = sessions
    newcomer = Session(quick.tcp_port)
    sessions.append(newcomer)
    try:
        assert newcomer.read_until_prompt() == GREETING
        assert read_to_close(oldest.sock, MARGIN) == MADE_ROOM
        path = str(tree / "root" / "imgs" / "a.jpg")
        for s in (*others, newcomer):
            assert path in _json(s.ask(path), path)
    finally:
        for s in sessions:
            s.close()


def test_clients_that_never_read_are_dropped_at_the_drain_deadline_and_free_their_slots(
    quick, tree
):
    """Every slot held by a client asking for big replies it never reads: a newcomer is
    refused (no session is idle), then let in once the drain deadline dropped them."""
    ask = f"{tree / 'root' / 'noise'}\n".encode() * REPEATS
    stalled = []
    try:
        for _ in range(MAX_CLIENTS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", quick.tcp_port))
            sock.settimeout(5)
            got = b""
            while len(got) < len(GREETING) and (chunk := sock.recv(len(GREETING) - len(got))):
                got += chunk
            assert got == GREETING  # it has a slot
            sock.sendall(ask)
            stalled.append(sock)
        start = time.monotonic()
        time.sleep(0.2)  # every session has its line: busy, not idle
        assert _greeting(quick) == TOO_MANY
        assert poll(lambda: _greeting(quick) == GREETING, timeout=DRAIN + 2 * MARGIN, interval=0.2)
        assert time.monotonic() - start < DRAIN + 2 * MARGIN
        for sock in stalled:  # dropped in the middle of its replies
            got = read_to_close(sock, MARGIN)
            assert got is not None and len(got) < (REPEATS - 1) * NOISE * len(FAR)
    finally:
        for sock in stalled:
            sock.close()


def test_a_folder_reply_is_streamed_as_it_is_classified(quick, tree):
    """The same document as before, pretty-printed as json.dumps(indent=2) writes it; its
    first entries arrive while most of the folder is still to be classified."""
    folder = str(tree / "root" / "many") + "/"
    before = _classified(quick)
    s = Session(quick.tcp_port)
    try:
        assert s.read_until_prompt() == GREETING
        s.sock.sendall(folder.encode() + b"\n")
        first = s.read_until(b'": {')  # the first file's entry
        classified_at_first = _classified(quick) - before
        reply = (first + s.read_until_prompt()).decode()
    finally:
        s.close()
    doc = _json(reply, folder)
    files = [f"{folder}img{i:04}.jpg" for i in range(MANY)]
    assert list(doc) == [*files, "__decision__", "__time__"]
    assert list(doc["__decision__"]) == files
    body = reply[reply.index("{") : -len("\n\n# Path: ")]
    assert body == json.dumps(doc, indent=2)
    assert _classified(quick) - before == MANY
    assert classified_at_first < MANY / 2


def test_a_client_leaving_mid_scan_stops_its_classification(quick, tree):
    folder = str(tree / "root" / "many")
    before = _classified(quick)
    s = Session(quick.tcp_port)
    assert s.read_until_prompt() == GREETING
    s.sock.sendall(folder.encode() + b"\n")
    s.read_until(b'": {')
    s.close()

    def settled() -> tuple[int] | None:
        count = _classified(quick)
        time.sleep(0.3)
        return (count,) if count == _classified(quick) else None

    final = poll(settled, timeout=10)
    assert final is not None
    assert final[0] - before < MANY / 2
