"""One process serving the model over HTTP (FastAPI + uvicorn) and the origin's TCP protocol.

Run from the project root: ``python serve/server.py`` (settings from ``serve.yaml``, checked
by the same schema as the pipeline's params; every key has a ``--flag`` that overrides it).
The promoted bundle (``models/bundle.zip``) is loaded and warmed once at start-up;
``kill -HUP <pid>`` or a new bundle on disk (``promote`` passing its gate, ``dvc checkout``)
loads and warms the new one, then swaps it in without failing requests in flight. A reload
that fails keeps the old bundle and shows in ``/readyz`` and ``/version``. SIGTERM or
SIGINT stops accepting, lets requests in flight finish, then stops the watcher and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from imgclf.config import PATHS, load_serve, setup_logging, stage_main
from imgclf.files import write_json
from imgclf.params import ServeSettings, validate
from imgclf.serving.http_app import HttpLimits, app_service, create_app
from imgclf.serving.predictor import ModelLoadError
from imgclf.serving.service import InferenceService, ServiceConfig
from imgclf.serving.tcp import TcpServer

log = logging.getLogger(__name__)

LIST_FLAGS = {"scan_roots": "--scan-root"}  # list settings: one repeatable flag per item


def _flag(name: str) -> str:
    return LIST_FLAGS.get(name, f"--{name.replace('_', '-')}")


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--settings`` and one flag per :class:`ServeSettings` field
    (``--http-port`` for ``http_port``), each overriding ``serve.yaml`` when given."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--settings", type=Path, default=PATHS.serve_settings, help="serve.yaml")
    ap.add_argument(
        "--model",
        default=str(PATHS.bundle.relative_to(PATHS.root)),
        help="bundle file (or a folder holding bundle.zip), or an MLflow URI such as "
        "models:/imgclf@champion",
    )
    overrides = ap.add_argument_group("serve.yaml overrides (default: the file's value)")
    for name, spec in ServeSettings.model_fields.items():
        if name in LIST_FLAGS:
            overrides.add_argument(_flag(name), dest=name, action="append", help="repeatable")
        else:
            kind = spec.annotation if spec.annotation in (int, float) else str
            overrides.add_argument(_flag(name), dest=name, type=kind)
    ap.add_argument("--ports-file", type=Path, default=None, help="write bound ports as JSON")
    ap.add_argument("--access-log", action="store_true")
    ap.add_argument("--log-level", default="INFO")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed flags; ``settings`` is ``serve.yaml`` with the given flags applied and checked
    by the schema again, ``scan_roots`` its roots made absolute (against the project)."""
    args = build_parser().parse_args(argv)
    from_file = load_serve(args.settings)
    given = {name: getattr(args, name) for name in ServeSettings.model_fields}
    merged = from_file.model_dump() | {k: v for k, v in given.items() if v is not None}
    args.settings = validate(merged, ServeSettings, f"{args.settings.name} with flags")
    args.scan_roots = [PATHS.root / p for p in map(Path, args.settings.scan_roots)]
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


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: :func:`_signals` routes SIGINT/SIGTERM to
    :meth:`handle_exit`. (uvicorn's would re-raise the signal once it has stopped, ending
    the process before the TCP server, the watcher and the batcher are stopped.)"""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@contextlib.contextmanager
def _signals(http: _HttpServer, service: InferenceService) -> Iterator[None]:
    """SIGTERM/SIGINT stop the HTTP server (then everything else); SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    stops = (signal.SIGTERM, signal.SIGINT)
    for sig in stops:
        loop.add_signal_handler(sig, http.handle_exit, sig, None)
    loop.add_signal_handler(signal.SIGHUP, service.request_reload, "SIGHUP")
    try:
        yield
    finally:
        for sig in (*stops, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def _uvicorn_config(app: Any, settings: ServeSettings, access_log: bool) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        lifespan="off",  # run by serve(), so a bundle that fails to load is one clear error
        log_config=None,
        access_log=access_log,
        limit_concurrency=settings.http_max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
    )


async def serve(args: argparse.Namespace) -> None:
    """Load the model, then serve HTTP and TCP until SIGINT/SIGTERM."""
    s: ServeSettings = args.settings
    app = create_app(
        ServiceConfig.from_settings(args.model, s),
        HttpLimits(s.max_body_bytes, s.read_timeout, s.max_files),
    )
    async with app.router.lifespan_context(app):  # the model is loaded here
        service = app_service(app)
        tcp = TcpServer(service, args.scan_roots, s.tcp_idle_timeout, s.tcp_max_clients)
        async with tcp.listening(s.host, s.tcp_port) as tcp_server:
            http_sock = _listen(s.host, s.http_port)
            http = _HttpServer(_uvicorn_config(app, s, args.access_log))
            ports = {
                "http": http_sock.getsockname()[1],
                "tcp": tcp_server.sockets[0].getsockname()[1],
                "pid": os.getpid(),
            }
            log.info(
                "serving HTTP on http://%s:%d and TCP on %s:%d (scan roots: %s)",
                s.host, ports["http"], s.host, ports["tcp"], ", ".join(map(str, args.scan_roots)),
            )  # fmt: skip
            if args.ports_file:
                write_json(args.ports_file, ports)
            with _signals(http, service):
                await http.serve(sockets=[http_sock])
    log.info("stopped")


@stage_main
def main(argv: list[str] | None = None) -> int:
    """``python serve/server.py``: 0 after SIGTERM/SIGINT, 2 when it cannot start."""
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        asyncio.run(serve(args))
    except ModelLoadError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:  # e.g. port in use
        log.error("cannot start: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
