"""The tracking server's pure parts and its one-line errors (no server is started here:
tests/e2e/test_tracking_server.py starts real ones)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from imgclf.tracking import server


def test_postgres_listens_on_loopback_with_its_socket_in_the_folder():
    assert server.postgres_options(5432, Path("/srv/ts/postgres")) == (
        "-c listen_addresses=127.0.0.1 -p 5432 -c unix_socket_directories=/srv/ts/postgres"
    )


def test_a_folder_too_long_for_a_socket_path_gets_no_socket():
    deep = Path("/tmp") / ("x" * 100)
    assert server.postgres_options(5432, deep).endswith("-c unix_socket_directories=")
    assert "'" not in server.postgres_options(5432, Path("/srv/ts"))
    assert server.postgres_options(5432, Path("/srv/my ts")).endswith(
        "-c 'unix_socket_directories=/srv/my ts'"
    )  # quoted for the shell pg_ctl starts postgres with


def test_backend_uri_names_the_database_and_role():
    assert server.backend_uri(5433) == "postgresql://mlflow@127.0.0.1:5433/mlflow"


def test_as_user_goes_through_runuser_only_when_asked():
    assert server.as_user(["initdb", "-D", "d"], None) == ["initdb", "-D", "d"]
    assert server.as_user(["initdb"], "pg") == ["runuser", "-u", "pg", "--", "initdb"]


def test_last_line_skips_blank_lines():
    assert server.last_line("a\nFATAL: no\n\n  \n") == "FATAL: no"
    assert server.last_line("") == ""


def test_a_busy_port_is_one_error_line(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not server.port_free(port)
        with pytest.raises(server.ServerError) as info:
            server.MlflowServer(tmp_path, port).check_port()
    assert str(info.value) == f"port {port} on 127.0.0.1 is busy: is an MLflow server running?"
    assert server.port_free(port)  # closed: free again


def test_main_refuses_a_busy_port_before_starting_anything(tmp_path, capsys):
    try:
        server.postgres_bindir()
    except server.PostgresMissing as exc:
        pytest.skip(str(exc))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code = server.main(["--dir", str(tmp_path / "ts"), "--port", str(port)])
    assert code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: port {port} on 127.0.0.1 is busy: is an MLflow server running?\n"
    assert not (tmp_path / "ts" / "postgres").exists()  # PostgreSQL was never started


def test_no_postgresql_is_a_specific_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no pg_config, no initdb
    monkeypatch.setattr(server, "DEBIAN_PG", tmp_path / "none")
    with pytest.raises(server.PostgresMissing) as info:
        server.postgres_bindir()
    assert str(info.value) == (
        "PostgreSQL's server programs (initdb, pg_ctl, postgres) not found: "
        "apt-get install postgresql"
    )
