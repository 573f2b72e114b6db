"""One process serving the model over HTTP (FastAPI + uvicorn) and the origin's TCP protocol.

Run from the project root: ``python serve/server.py`` (settings from ``serve.yaml``, checked
by the same schema as the pipeline's params; every key has a ``--flag`` that overrides it).
The promoted bundle (``models/bundle.zip``) is loaded and warmed once at start-up;
``kill -HUP <pid>`` or a new bundle on disk (``promote`` passing its gate, ``dvc checkout``)
loads and warms the new one, then swaps it in without failing requests in flight. A reload
that fails keeps the old bundle and shows in ``/readyz`` and ``/version``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from imgclf.config import PATHS, load_serve, setup_logging, stage_main
from imgclf.params import ServeSettings, validate
from imgclf.serving.http_app import create_app
from imgclf.serving.service import InferenceService, ServiceConfig
from imgclf.serving.tcp import TcpServer

log = logging.getLogger("imgclf.serving.server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags: one per ``serve.yaml`` key (``--http-port`` for ``http_port``), defaulting to
    the file's value; the merged settings are checked by the schema again."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--settings", type=Path, default=PATHS.serve_settings, help="serve.yaml")
    known, _ = pre.parse_known_args(argv)
    settings = load_serve(known.settings)
    ap = argparse.ArgumentParser(description=__doc__, parents=[pre])
    ap.add_argument(
        "--model",
        default=str(PATHS.bundle.relative_to(PATHS.root)),
        help="bundle file (or a folder holding bundle.zip), or an MLflow URI such as "
        "models:/imgclf@champion",
    )
    for name, spec in ServeSettings.model_fields.items():
        default = getattr(settings, name)
        if name == "scan_roots":
            ap.add_argument(
                "--scan-root", dest=name, action="append", default=None,
                help=f"folder TCP clients may scan, repeatable (default {default})",
            )  # fmt: skip
        else:
            kind = spec.annotation if spec.annotation in (int, float) else str
            ap.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=default)
    ap.add_argument("--ports-file", type=Path, default=None, help="write bound ports as JSON")
    ap.add_argument("--access-log", action="store_true")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    merged = {name: getattr(args, name) for name in ServeSettings.model_fields}
    merged["scan_roots"] = merged["scan_roots"] or settings.scan_roots
    args.settings = validate(merged, ServeSettings, f"{known.settings.name} with flags")
    args.scan_roots = [
        p if p.is_absolute() else PATHS.root / p for p in map(Path, args.settings.scan_roots)
    ]
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
    s: ServeSettings = args.settings
    service = InferenceService(
        ServiceConfig(
            source=args.model,
            max_batch=s.max_batch,
            batch_wait_ms=s.batch_wait_ms,
            queue_size=s.queue_size,
            decode_workers=s.decode_workers,
            reload_poll_seconds=s.reload_poll_seconds,
            max_pixels=s.max_pixels,
        )
    )
    await service.start()
    tcp = TcpServer(service, args.scan_roots, s.tcp_idle_timeout, s.tcp_max_clients)
    tcp_server = await tcp.start(s.host, s.tcp_port)
    http_sock = _listen(s.host, s.http_port)
    app = create_app(service, s.max_body_bytes, s.read_timeout, s.max_files)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=args.access_log,
        limit_concurrency=s.http_max_connections,
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
        s.host,
        ports["http"],
        s.host,
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


@stage_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    from imgclf.serving.predictor import ModelLoadError

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
