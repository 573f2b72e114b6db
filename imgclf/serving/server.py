"""One process serving the model over HTTP (FastAPI on Hypercorn) and the origin's TCP protocol.

Run from the project root: ``python serve/server.py`` (settings from ``serve.yaml``, checked
by the same schema as the pipeline's params; every key has a ``--flag`` that overrides it).
The promoted bundle (``models/bundle.zip``) is loaded and warmed once at start-up;
``kill -HUP <pid>`` or a new bundle on disk (``promote`` passing its gate, ``dvc checkout``)
loads and warms the new one, then swaps it in without failing requests in flight. A reload
that fails keeps the old bundle and shows in ``/readyz`` and ``/version``. SIGTERM or
SIGINT stops accepting, lets requests in flight finish, then stops the watcher and exits 0.

Every HTTP connection has deadlines, so idle and slow clients cannot hold the server:
``http_idle_timeout`` to send a request's headers (from connecting, or after a reply on a
keep-alive connection; bytes that arrive do not extend it), ``read_timeout`` between two
chunks of a body and ``http_body_timeout`` for a whole body (both 408, then closed).
Hypercorn enforces the first (its ``keep_alive_timeout`` runs from the connection's start
until a request's headers are complete); :class:`~imgclf.serving.http_app.BodyLimit` the
other two.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from starlette.types import ASGIApp, Receive, Scope, Send

from imgclf.config import PATHS, load_serve, setup_logging, stage_main
from imgclf.files import write_json
from imgclf.params import ServeSettings, validate
from imgclf.serving.http_app import HttpLimits, app_service, create_app
from imgclf.serving.predictor import ModelLoadError
from imgclf.serving.service import InferenceService, ServiceConfig
from imgclf.serving.tcp import TcpServer

log = logging.getLogger(__name__)

LIST_FLAGS = {"scan_roots": "--scan-root"}  # list settings: one repeatable flag per item
BACKLOG = 1024  # connections the kernel holds until they are accepted
GRACEFUL_SECONDS = 10.0  # for requests in flight at SIGTERM to finish
# Hypercorn's own bound on each socket read: only a backstop, later than our deadlines, so
# a stalled body gets BodyLimit's 408 answer rather than a silent close.
READ_BACKSTOP_MARGIN = 1.0
ACCESS_LOG_FORMAT = '%(h)s - "%(m)s %(Uq)s HTTP/%(H)s" %(s)s'  # as uvicorn's


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


def raise_open_files_limit() -> int:
    """Raise the soft limit on open descriptors to the hard one (idle connections each hold
    one until their deadline closes them); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit the kernel caps
            log.debug("open files: soft limit stays %d (hard %d): %s", soft, hard, exc)
            return soft
    log.debug("open files: soft limit %d (was %d)", hard, soft)
    return hard


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose proto
    # says TCP, and without it keep-alive responses stall ~40 ms on delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


class LifespanDone:
    """The app as Hypercorn serves it: :func:`serve` runs the app's lifespan itself (so a
    bundle that fails to load is one clear error, before anything listens), so this one
    answers Hypercorn's lifespan events without running it again."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            event = (await receive())["type"]  # lifespan.startup, then lifespan.shutdown
            await send({"type": f"{event}.complete"})
            if event == "lifespan.shutdown":
                return


def hypercorn_config(
    sock: socket.socket, settings: ServeSettings, access_log: bool
) -> HypercornConfig:
    """Hypercorn's settings: serve on ``sock`` (bound by us; Hypercorn takes it over) with
    the header/keep-alive deadline ``http_idle_timeout``."""
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]  # the descriptor is Hypercorn's from now on
    config.backlog = BACKLOG
    # from connecting, and after each reply, until a request's headers are complete; bytes
    # that arrive meanwhile do not extend it (a header trickler is closed on time)
    config.keep_alive_timeout = settings.http_idle_timeout
    # per socket read, a backstop only: never before the header deadline above, nor before
    # BodyLimit answers a stalled body with 408
    config.read_timeout = (
        max(settings.http_idle_timeout, settings.read_timeout) + READ_BACKSTOP_MARGIN
    )
    config.graceful_timeout = GRACEFUL_SECONDS
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = logging.getLogger("hypercorn.access") if access_log else None
    config.access_log_format = ACCESS_LOG_FORMAT
    return config


@contextlib.contextmanager
def _signals(stop: asyncio.Event, service: InferenceService) -> Iterator[None]:
    """SIGTERM/SIGINT stop the HTTP server (then everything else); SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    stops = (signal.SIGTERM, signal.SIGINT)
    for sig in stops:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.request_reload, "SIGHUP")
    try:
        yield
    finally:
        for sig in (*stops, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def serve(args: argparse.Namespace) -> None:
    """Load the model, then serve HTTP and TCP until SIGINT/SIGTERM."""
    s: ServeSettings = args.settings
    app = create_app(
        ServiceConfig.from_settings(args.model, s),
        HttpLimits(s.max_body_bytes, s.read_timeout, s.max_files, s.http_body_timeout),
    )
    async with app.router.lifespan_context(app):  # the model is loaded here
        service = app_service(app)
        tcp = TcpServer(
            service,
            args.scan_roots,
            s.tcp_idle_timeout,
            s.tcp_max_clients,
            line_timeout=s.tcp_line_timeout,
            drain_timeout=s.tcp_drain_timeout,
        )
        async with tcp.listening(s.host, s.tcp_port) as tcp_server:
            http_sock = _listen(s.host, s.http_port)
            ports = {
                "http": http_sock.getsockname()[1],
                "tcp": tcp_server.sockets[0].getsockname()[1],
                "pid": os.getpid(),
            }
            config = hypercorn_config(http_sock, s, args.access_log)
            log.info(
                "serving HTTP on http://%s:%d and TCP on %s:%d (scan roots: %s)",
                s.host, ports["http"], s.host, ports["tcp"], ", ".join(map(str, args.scan_roots)),
            )  # fmt: skip
            stop = asyncio.Event()
            with _signals(stop, service):  # before anyone can know the ports
                if args.ports_file:
                    write_json(args.ports_file, ports)
                await hypercorn_serve(LifespanDone(app), config, shutdown_trigger=stop.wait)
    log.info("stopped")


@stage_main
def main(argv: list[str] | None = None) -> int:
    """``python serve/server.py``: 0 after SIGTERM/SIGINT, 2 when it cannot start."""
    args = parse_args(argv)
    setup_logging(args.log_level)
    if args.log_level.upper() != "DEBUG":  # "Running on ...": said by our own line
        logging.getLogger("hypercorn.error").setLevel(logging.WARNING)
    raise_open_files_limit()
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
