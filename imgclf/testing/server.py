"""A real ``serve/server.py`` process on free loopback ports, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from imgclf.testing.project import SOURCE


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
    SIGTERM; ready (``/readyz`` answers 200) once constructed."""

    def __init__(self, tmp: Path, bundle: Path, *extra: str, cwd: Path = SOURCE):
        self.tmp = tmp
        self.bundle = bundle
        self.ports_file = tmp / "ports.json"
        self.log_file = tmp / "server.log"
        cmd = [
            sys.executable,
            "serve/server.py",
            "--model",
            str(bundle),
            "--http-port",
            "0",
            "--tcp-port",
            "0",
            "--ports-file",
            str(self.ports_file),
            *extra,
        ]
        self._log = self.log_file.open("wb")
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=self._log, stderr=self._log, env=server_env()
        )
        self.http_port, self.tcp_port = self._wait_ports(timeout=90)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self._wait_ready(timeout=30)

    def _wait_ports(self, timeout: float) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            if self.ports_file.is_file():
                ports = json.loads(self.ports_file.read_text())
                return ports["http"], ports["tcp"]
            time.sleep(0.1)
        raise TimeoutError(f"server did not start:\n{self.log()}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready:\n{self.log()}")

    def log(self) -> str:
        """What the server wrote so far."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server."""
        self.proc.send_signal(sig)

    def stop(self) -> int:
        """SIGTERM the server; its exit code."""
        code = stop_process(self.proc)
        self._log.close()
        return code
