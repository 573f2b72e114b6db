"""``serve/server.py``'s settings: ``serve.yaml``, overridden by one flag per key, checked by
the same schema (in process; the exit status of a real start-up failure is tested in
``tests/integration/test_server_tcp.py``)."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
from pathlib import Path

import pytest
import yaml

from imgclf.config import PATHS
from imgclf.params import ServeSettings
from imgclf.serving.server import (
    LifespanDone,
    build_parser,
    hypercorn_config,
    main,
    parse_args,
    raise_open_files_limit,
)


@pytest.fixture
def custom(tmp_path) -> Path:
    """A copy of ``serve.yaml`` with other TCP port, scan roots and polling period."""
    settings = yaml.safe_load(PATHS.serve_settings.read_text(encoding="utf-8"))
    settings.update(tcp_port=4321, scan_roots=["/srv/images"], reload_poll_seconds=0.5)
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_every_setting_has_a_flag():
    shown = build_parser().format_help()
    for name in ServeSettings.model_fields:
        flag = "--scan-root" if name == "scan_roots" else f"--{name.replace('_', '-')}"
        assert f" {flag} " in shown, flag


def test_safe_defaults():
    args = parse_args([])
    assert args.settings == ServeSettings.model_validate(
        yaml.safe_load(PATHS.serve_settings.read_text(encoding="utf-8"))
    )
    assert args.settings.host == "127.0.0.1" and args.settings.tcp_port == 1235
    assert args.scan_roots == [PATHS.root / "data"]
    assert args.model == "models/bundle.zip"


def test_flags_override_the_settings_file(custom):
    args = parse_args(
        [
            *("--settings", str(custom), "--scan-root", "/a", "--scan-root", "rel"),
            *("--http-port", "0", "--batch-wait-ms", "2.5", "--model", "models:/imgclf@champion"),
        ]
    )
    assert args.settings.tcp_port == 4321 and args.settings.reload_poll_seconds == 0.5
    assert args.settings.http_port == 0 and args.settings.batch_wait_ms == 2.5
    assert args.scan_roots == [Path("/a"), PATHS.root / "rel"]
    assert args.model == "models:/imgclf@champion"
    assert parse_args(["--settings", str(custom)]).scan_roots == [Path("/srv/images")]


def test_bad_flag_value_is_one_line_and_exit_2(capsys):
    assert main(["--http-port", "70000"]) == 2
    assert capsys.readouterr().err == (
        "error: serve.yaml with flags: http_port: input should be less than or equal to "
        "65535 (got 70000)\n"
    )


def test_bad_settings_file_is_one_line_and_exit_2(custom, capsys):
    settings = yaml.safe_load(custom.read_text())
    settings["tcp_prot"] = settings.pop("tcp_port")
    custom.write_text(yaml.safe_dump(settings))
    assert main(["--settings", str(custom)]) == 2
    err = capsys.readouterr().err
    assert err == "error: custom.yaml: tcp_prot: unknown key (did you mean 'tcp_port'?)\n"


def test_connection_deadlines_reach_hypercorn():
    """``http_idle_timeout`` is Hypercorn's keep-alive timeout (from connecting, and after a
    reply, to a request's headers); its per-read timeout is only a backstop behind
    ``read_timeout``, which BodyLimit answers with 408 (as ``http_body_timeout``)."""
    args = parse_args(
        ["--http-idle-timeout", "1.5", "--read-timeout", "0.5", "--http-body-timeout", "3"]
    )
    s = args.settings
    assert (s.http_idle_timeout, s.read_timeout, s.http_body_timeout) == (1.5, 0.5, 3.0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
        sock.bind(("127.0.0.1", 0))
        fd = sock.fileno()
        config = hypercorn_config(sock, s, access_log=False)
        assert sock.fileno() == -1  # handed over: closing ours does not close Hypercorn's
    os.close(fd)
    assert config.bind == [f"fd://{fd}"]
    assert config.keep_alive_timeout == 1.5
    assert config.read_timeout > max(s.http_idle_timeout, s.read_timeout)
    assert config.accesslog is None  # quiet unless --access-log


def test_removed_connection_cap_is_explained(custom, capsys):
    settings = yaml.safe_load(custom.read_text())
    settings["http_max_connections"] = 128
    custom.write_text(yaml.safe_dump(settings))
    assert main(["--settings", str(custom)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: custom.yaml: http_max_connections: unknown key (no connection")
    assert err.count("\n") == 1


def test_open_files_soft_limit_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_open_files_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 256), hard))


def test_hypercorn_gets_an_app_whose_lifespan_already_ran():
    """serve() runs the app's lifespan itself (a bundle that fails to load is one error line
    before anything listens): Hypercorn's lifespan events are only acknowledged."""
    calls: list[str] = []

    async def app(scope, receive, send) -> None:
        calls.append(scope["type"])

    events = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[dict] = []

    async def receive() -> dict:
        return next(events)

    async def send(message: dict) -> None:
        sent.append(message)

    wrapped = LifespanDone(app)
    asyncio.run(wrapped({"type": "lifespan"}, receive, send))
    asyncio.run(wrapped({"type": "http"}, receive, send))
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert calls == ["http"]
