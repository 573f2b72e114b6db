"""A real ``serve/server.py`` process on free loopback ports, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx

from imgclf.testing.project import SOURCE

T = TypeVar("T")


def poll(check: Callable[[], T], timeout: float, interval: float = 0.1) -> T | None:
    """``check()``'s first truthy result, tried every ``interval`` seconds for up to
    ``timeout`` seconds; None when it never came."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> int:
    """SIGTERM ``proc``, SIGKILL it after ``timeout`` seconds; its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def read_to_close(sock: socket.socket, within: float) -> bytes | None:
    """What ``sock`` receives until the server closes (or drops) it; None when it is still
    open after ``within`` seconds."""
    got = b""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            return None
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    return None


def server_env() -> dict[str, str]:
    """The server's environment: TensorFlow quiet, no GPU."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


def run_server_cli(*args: str) -> subprocess.CompletedProcess:
    """``python serve/server.py ARGS`` to completion (for start-up failures)."""
    return subprocess.run(
        [sys.executable, "serve/server.py", *args],
        cwd=SOURCE,
        capture_output=True,
        text=True,
        timeout=120,
        env=server_env(),
    )


class ServerProcess:
    """``python serve/server.py --model <bundle> ...`` on free loopback ports, stopped with
    SIGTERM; ready (``/readyz`` answers 200) once constructed. ``bundle`` may be an MLflow
    URI (``models:/imgclf@champion``; ``env`` then holds ``MLFLOW_TRACKING_URI``)."""

    def __init__(
        self,
        tmp: Path,
        bundle: Path | str,
        *extra: str,
        cwd: Path = SOURCE,
        env: dict[str, str] | None = None,
    ):
        self.tmp = tmp
        self.bundle = bundle
        self.ports_file = tmp / "ports.json"
        self.log_file = tmp / "server.log"
        cmd = [
            *(sys.executable, "serve/server.py", "--model", str(bundle)),
            *("--http-port", "0", "--tcp-port", "0", "--ports-file", str(self.ports_file)),
            *extra,
        ]
        self._log = self.log_file.open("wb")
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=self._log, stderr=self._log, env={**server_env(), **(env or {})}
        )
        try:
            ports = poll(self._ports, timeout=90)
            if ports is None:
                raise TimeoutError(f"server did not start:\n{self.log()}")
            self.http_port, self.tcp_port = ports
            self.url = f"http://127.0.0.1:{self.http_port}"
            if not poll(self._ready, timeout=30):
                raise TimeoutError(f"server not ready:\n{self.log()}")
        except BaseException:
            self.stop()  # no server outlives a start-up that failed
            raise

    def _ports(self) -> tuple[int, int] | None:
        """The bound (HTTP, TCP) ports once the server wrote them."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
        if not self.ports_file.is_file():
            return None
        ports = json.loads(self.ports_file.read_text())
        return ports["http"], ports["tcp"]

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        """What the server wrote so far."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server."""
        self.proc.send_signal(sig)

    def stop(self) -> int:
        """SIGTERM the server; its exit code (0: it shut down cleanly)."""
        code = stop_process(self.proc)
        self._log.close()
        return code
