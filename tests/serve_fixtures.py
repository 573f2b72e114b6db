"""Helpers for the serving tests: tiny models following the artifact contract, and a real
server process on loopback ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import stop_process

ROOT = Path(__file__).resolve().parents[1]
DECODE = {
    "mode": "pad",
    "background": [255, 255, 255],
    "max_pixels": 89_478_485,
    "formats": ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"],
}


def make_model(
    folder: Path,
    class_names: tuple[str, ...] = ("safe", "sensitive"),
    size: int = 32,
    seed: int = 0,
    threshold: float | None = 0.4,
    positive_class: str | None = None,
) -> Path:
    """Write ``model.keras``, ``metadata.json`` and (unless ``threshold`` is None)
    ``operating_point.json`` into ``folder``, as the train and report stages would."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((size, size, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(len(class_names), activation="softmax"),
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    meta = metadata(class_names, size)
    (folder / "metadata.json").write_text(json.dumps(meta))
    if threshold is not None:
        op = {
            "positive_class": positive_class or class_names[-1],
            "target_recall": 0.9,
            "threshold": threshold,
            "val": {},
            "test": {},
        }
        (folder / "operating_point.json").write_text(json.dumps(op))
    return folder


def metadata(class_names: tuple[str, ...], size: int) -> dict[str, Any]:
    return {
        "class_names": list(class_names),
        "image_size": size,
        "decode": {"size": size, **DECODE},
        "backbone": "tiny-test",
        "params_digest": "test",
        "data_hash": "test",
        "mlflow_run_id": None,
        "created": "2026-01-01T00:00:00Z",
    }


class ServerProcess:
    """``python serve/server.py ...`` on free loopback ports, stopped with SIGTERM."""

    def __init__(self, tmp: Path, model_dir: Path, *extra: str):
        self.tmp = tmp
        self.ports_file = tmp / "ports.json"
        self.log_file = tmp / "server.log"
        cmd = [
            sys.executable,
            "serve/server.py",
            "--model",
            str(model_dir),
            "--http-port",
            "0",
            "--tcp-port",
            "0",
            "--ports-file",
            str(self.ports_file),
            *extra,
        ]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        self._log = self.log_file.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=self._log, env=env)
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
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        code = stop_process(self.proc)
        self._log.close()
        return code
