"""The origin's TCP telnet protocol on a real ``serve/server.py``, with a raw socket, and
the server's start-up failures on bad flags."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from imgclf.serving.predictor import Predictor
from imgclf.testing import images as f
from imgclf.testing.bundles import make_bundle
from imgclf.testing.server import ServerProcess, run_server_cli

GREETING = b"\n\nWelcome! Enter image path to scan\n# Path: "
PROMPT = b"# Path: "


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
    return tmp


@pytest.fixture(scope="module")
def server(tree):
    srv = ServerProcess(tree, make_bundle(tree / "models"), "--scan-root", str(tree / "root"))
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
    ],
    ids=["missing", "dotdot", "relative-dotdot", "absolute", "etc", "symlink", "linkdir", "via"],
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
