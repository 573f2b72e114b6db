"""``serve/server.py``'s settings: ``serve.yaml``, overridden by one flag per key, checked by
the same schema (in process; the exit status of a real start-up failure is tested in
``tests/integration/test_server_tcp.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imgclf.config import PATHS
from imgclf.params import ServeSettings
from imgclf.serving.server import build_parser, main, parse_args


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
