"""One process serving the model over HTTP (FastAPI + uvicorn) and the origin's TCP protocol.

Run from the project root: ``python serve/server.py`` (settings from the ``serve:`` section
of ``params.yaml``; every flag overrides its param). The model is loaded and warmed once at
start-up; ``kill -HUP <pid>`` or a change of ``model.keras``, ``metadata.json`` or
``operating_point.json`` on disk (``dvc repro``, ``dvc checkout``) loads and warms the new
model, then swaps it in without failing requests in flight.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as ``python serve/server.py``: import the project
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from typing import Any

import uvicorn

from serve.http_app import create_app
from serve.service import InferenceService, ServiceConfig
from serve.tcp import TcpServer
from stages.config import PATHS, load_params, setup_logging

log = logging.getLogger("serve.server")

DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "http_port": 8000,
    "tcp_port": 1235,
    "scan_roots": ["data/"],
    "max_body_bytes": 10 * 1024 * 1024,
    "max_files": 32,
    "max_pixels": 40_000_000,
    "read_timeout": 10.0,
    "max_batch": 32,
    "batch_wait_ms": 0.0,
    "queue_size": 256,
    "decode_workers": 2,
    "http_max_connections": 128,
    "tcp_max_clients": 32,
    "tcp_idle_timeout": 300.0,
    "reload_poll_seconds": 2.0,
}


def serve_params(path: Path | None = None) -> dict[str, Any]:
    """``DEFAULTS`` updated with the ``serve:`` section of ``params.yaml`` (if any)."""
    params = dict(DEFAULTS)
    try:
        params.update(load_params(path).get("serve") or {})
    except FileNotFoundError:
        log.warning("no params.yaml: using built-in serving defaults")
    return params


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; each defaults to its ``serve:`` param."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--params", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    p = serve_params(known.params)
    ap = argparse.ArgumentParser(description=__doc__, parents=[pre])
    ap.add_argument(
        "--model",
        "--model-dir",
        dest="model",
        default=str(PATHS.models),
        help="model folder (model.keras + metadata.json) or MLflow URI models:/name/version",
    )
    ap.add_argument("--operating-point", type=Path, default=None, help="operating_point.json")
    ap.add_argument("--host", default=p["host"], help="bind address (default loopback)")
    ap.add_argument("--http-port", type=int, default=p["http_port"], help="0 = any free port")
    ap.add_argument("--tcp-port", type=int, default=p["tcp_port"], help="0 = any free port")
    ap.add_argument(
        "--scan-root",
        dest="scan_roots",
        action="append",
        type=Path,
        default=None,
        help="folder TCP clients may scan (repeatable; relative to the project root)",
    )
    ap.add_argument("--max-body-bytes", type=int, default=p["max_body_bytes"])
    ap.add_argument("--max-files", type=int, default=p["max_files"], help="images per request")
    ap.add_argument("--max-pixels", type=int, default=p["max_pixels"], help="per image")
    ap.add_argument("--read-timeout", type=float, default=p["read_timeout"])
    ap.add_argument("--max-batch", type=int, default=p["max_batch"], help="1 = no batching")
    ap.add_argument("--batch-wait-ms", type=float, default=p["batch_wait_ms"])
    ap.add_argument("--queue-size", type=int, default=p["queue_size"])
    ap.add_argument("--decode-workers", type=int, default=p["decode_workers"])
    ap.add_argument("--http-max-connections", type=int, default=p["http_max_connections"])
    ap.add_argument("--tcp-max-clients", type=int, default=p["tcp_max_clients"])
    ap.add_argument("--tcp-idle-timeout", type=float, default=p["tcp_idle_timeout"])
    ap.add_argument(
        "--reload-poll-seconds",
        type=float,
        default=p["reload_poll_seconds"],
        help="0 disables watching the model files (SIGHUP still reloads)",
    )
    ap.add_argument("--ports-file", type=Path, default=None, help="write bound ports as JSON")
    ap.add_argument("--access-log", action="store_true")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    roots = args.scan_roots or [Path(r) for r in p["scan_roots"]]
    args.scan_roots = [r if r.is_absolute() else PATHS.root / r for r in roots]
    return args


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose proto
    # says TCP, and without it keep-alive responses stall ~40 ms on delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def run(args: argparse.Namespace) -> None:
    """Load the model, then serve HTTP and TCP until SIGINT/SIGTERM."""
    service = InferenceService(
        ServiceConfig(
            source=args.model,
            operating_point=args.operating_point,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
            queue_size=args.queue_size,
            decode_workers=args.decode_workers,
            reload_poll_seconds=args.reload_poll_seconds,
            max_pixels=args.max_pixels,
        )
    )
    await service.start()
    tcp = TcpServer(service, args.scan_roots, args.tcp_idle_timeout, args.tcp_max_clients)
    tcp_server = await tcp.start(args.host, args.tcp_port)
    http_sock = _listen(args.host, args.http_port)
    app = create_app(service, args.max_body_bytes, args.read_timeout, args.max_files)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=args.access_log,
        limit_concurrency=args.http_max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
    )
    http = uvicorn.Server(config)
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task] = set()

    def on_sighup() -> None:
        task = loop.create_task(service.reload("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    watcher = loop.create_task(service.watch(), name="model-watcher")
    ports = {
        "http": http_sock.getsockname()[1],
        "tcp": tcp_server.sockets[0].getsockname()[1],
        "pid": os.getpid(),
    }
    log.info(
        "serving HTTP on http://%s:%d and TCP on %s:%d (scan roots: %s)",
        args.host,
        ports["http"],
        args.host,
        ports["tcp"],
        ", ".join(map(str, args.scan_roots)),
    )
    if args.ports_file:
        tmp = args.ports_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(ports), encoding="utf-8")
        tmp.replace(args.ports_file)
    try:
        await http.serve(sockets=[http_sock])
    finally:
        watcher.cancel()
        tcp_server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(tcp_server.wait_closed(), 2)
        await service.stop()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    from serve.predictor import ModelLoadError

    try:
        asyncio.run(run(args))
    except ModelLoadError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:  # e.g. port in use
        log.error("cannot start: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
