"""A tracking server for a team trial: ``mlflow server`` on Debian's PostgreSQL, with
artifacts proxied by the server, both on loopback only.

``python -m imgclf.tracking.server --dir .cache/tracking-server --port 5000`` (``make
tracking-server``) starts both in the foreground, prints the ``MLFLOW_TRACKING_URI`` to
export, and stops both on Ctrl-C or SIGTERM. The e2e test starts the same servers through
:class:`TrackingServer`.

``<dir>/postgres/``
    the cluster (``data/``, made by ``initdb`` only when new: runs, params, metrics and the
    registry survive restarts), its log and its unix socket. PostgreSQL listens on
    127.0.0.1 only, on a free port chosen at each start, and trusts loopback connections:
    a trial on one machine, not a deployment (README "A team tracking server").
``<dir>/artifacts/``
    what runs upload through the server (``mlflow-artifacts:`` URIs; ``--serve-artifacts``).
``<dir>/mlflow.log``
    the MLflow server's output.

``initdb`` and ``postgres`` refuse to run as root; as root (containers, CI) the
PostgreSQL commands run as the system user :data:`PG_USER` (created when missing, via
``runuser``), which must be able to reach ``<dir>``. MLflow's job runner (GenAI jobs this
project does not use; its consumers outlive a stopped server) is turned off.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from imgclf.config import PATHS, StageError, setup_logging, stage_main

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEBIAN_PG = Path("/usr/lib/postgresql")  # Debian's <version>/bin folders
PG_USER = "imgclf-postgres"  # runs PostgreSQL when this process is root
DATABASE = "mlflow"  # the database MLflow writes, and the role it connects as
PG_START_SECONDS = 60.0
MLFLOW_START_SECONDS = 120.0  # first start: MLflow creates its tables (about 10 s on 2 cores)
STOP_SECONDS = 30.0
SOCKET_PATH_MAX = 107  # sun_path of a unix socket, without its final NUL


class ServerError(StageError):
    """A server could not start or stop (one line: what and why)."""


class PostgresMissing(ServerError):
    """Debian's ``postgresql`` (initdb, pg_ctl, postgres) is not installed here."""


# -- pure helpers ------------------------------------------------------------------------


def postgres_bindir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``: ``pg_config --bindir``,
    else the newest ``/usr/lib/postgresql/<version>/bin``, else ``initdb`` on PATH."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["pg_config", "--bindir"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    versions = DEBIAN_PG.glob("*/bin")
    candidates += sorted(versions, key=lambda p: _version(p.parent.name), reverse=True)
    if shutil.which("initdb"):
        candidates.append(Path(str(shutil.which("initdb"))).resolve().parent)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise PostgresMissing(
        "PostgreSQL's server programs (initdb, pg_ctl, postgres) not found: "
        "apt-get install postgresql"
    )


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit())


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` on loopback now (with SO_REUSEADDR, as
    uvicorn and PostgreSQL do: connections of a stopped server in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def backend_uri(pg_port: int) -> str:
    """The SQLAlchemy URI of MLflow's database (driver: psycopg 3, SQLAlchemy 2.1's default)."""
    return f"postgresql://{DATABASE}@{HOST}:{pg_port}/{DATABASE}"


def last_line(text: str) -> str:
    """The last non-empty line of ``text`` ("" when none)."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return lines[-1] if lines else ""


def tail_of(path: Path) -> str:
    """The last line of the file at ``path`` ("" when it does not exist)."""
    return last_line(path.read_text(errors="replace")) if path.is_file() else ""


def as_user(cmd: list[str], user: str | None) -> list[str]:
    """``cmd`` run as ``user`` (through ``runuser``), or as is when ``user`` is None."""
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def postgres_options(port: int, socket_dir: Path) -> str:
    """``pg_ctl -o`` options: loopback only, ``port``, unix socket in ``socket_dir`` (none
    when that path is too long for a socket)."""
    fits = len(str(socket_dir / f".s.PGSQL.{port}")) <= SOCKET_PATH_MAX
    sockets = str(socket_dir) if fits else ""
    sockets_option = shlex.quote(f"unix_socket_directories={sockets}")
    return f"-c listen_addresses={HOST} -p {port} -c {sockets_option}"


# -- PostgreSQL --------------------------------------------------------------------------


def ensure_system_user(name: str) -> None:
    """Create the system user ``name`` (no home, no login shell) unless it exists."""
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 and proc.returncode != 9:  # 9: made meanwhile by another process
        raise ServerError(f"could not create the system user {name}: {last_line(proc.stderr)}")
    log.info("created the system user %s to run PostgreSQL (it refuses to run as root)", name)


class Postgres:
    """A PostgreSQL cluster in ``<folder>/postgres`` on ``127.0.0.1:<port>``."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.bindir = postgres_bindir()
        self.home = folder.resolve() / "postgres"
        self.data = self.home / "data"
        self.log_file = self.home / "postgres.log"
        self.port = port
        self.user = PG_USER if os.geteuid() == 0 else None

    @property
    def uri(self) -> str:
        if self.port is None:
            raise ServerError("PostgreSQL is not started")
        return backend_uri(self.port)

    def _run(self, *args: str, timeout: float = STOP_SECONDS) -> subprocess.CompletedProcess:
        """A PostgreSQL program, as the user that owns the cluster; its output captured."""
        cmd = as_user([str(self.bindir / args[0]), *args[1:]], self.user)
        try:
            return subprocess.run(
                cmd, cwd=self.home, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise ServerError(f"{args[0]} did not finish within {timeout:g} s") from exc

    def _prepare(self) -> None:
        """``<folder>/postgres`` owned by the user running PostgreSQL, who can reach it."""
        self.home.mkdir(parents=True, exist_ok=True)
        if self.user is None:
            return
        ensure_system_user(self.user)
        entry = pwd.getpwnam(self.user)
        if self.home.stat().st_uid != entry.pw_uid:
            shutil.chown(self.home, entry.pw_uid, entry.pw_gid)
        if not self._reachable():
            raise ServerError(
                f"{self.home} is not reachable by the user {self.user} that runs PostgreSQL "
                "(a parent folder is private): choose a folder every user can traverse"
            )

    def _reachable(self) -> bool:
        cmd = as_user(["test", "-w", str(self.home)], self.user)
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0

    def start(self) -> None:
        """``initdb`` (a new cluster only), ``pg_ctl start``, the ``mlflow`` database."""
        self._prepare()
        if not (self.data / "PG_VERSION").is_file():
            proc = self._run(
                *("initdb", "-D", str(self.data), "-U", DATABASE, "--auth=trust"),
                *("-E", "UTF8", "--locale=C"),
                timeout=120,
            )
            if proc.returncode != 0:
                why = last_line(proc.stderr) or last_line(proc.stdout)
                raise ServerError(f"initdb {self.data} failed: {why}")
            log.info("initialised a PostgreSQL cluster in %s", self.data)
        elif self.running():  # left behind by a start that was killed: its port is unknown
            log.warning("PostgreSQL on %s was left running: restarting it", self.data)
            self.stop()
        if self.port is None:
            self.port = free_port()
        elif not port_free(self.port):
            raise ServerError(f"port {self.port} on {HOST} is busy: PostgreSQL cannot use it")
        proc = self._run(
            *("pg_ctl", "start", "-w", "-t", str(int(PG_START_SECONDS)), "-D", str(self.data)),
            *("-l", str(self.log_file), "-o", postgres_options(self.port, self.home)),
            timeout=PG_START_SECONDS + 10,
        )
        if proc.returncode != 0:
            why = tail_of(self.log_file) or last_line(proc.stderr) or last_line(proc.stdout)
            raise ServerError(f"PostgreSQL did not start on {HOST}:{self.port}: {why}")
        log.info("PostgreSQL %s on %s:%d", self.data, HOST, self.port)
        try:
            self._create_database()
        except BaseException:
            self.stop()
            raise

    def _create_database(self) -> None:
        """The ``mlflow`` database, unless it exists."""
        import psycopg

        try:
            with psycopg.connect(
                host=HOST,
                port=self.port,
                user=DATABASE,
                dbname="postgres",
                autocommit=True,
                connect_timeout=10,
            ) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
                ).fetchone()
                if not exists:
                    conn.execute(f"CREATE DATABASE {DATABASE}")
                    log.info("created the database %s", DATABASE)
        except psycopg.Error as exc:
            why = last_line(str(exc))
            raise ServerError(f"could not create the database {DATABASE}: {why}") from exc

    def running(self) -> bool:
        """Whether ``pg_ctl status`` finds the cluster's server running."""
        if not self.data.is_dir():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.data)).returncode == 0

    def stop(self) -> None:
        """``pg_ctl stop -m fast`` (clients are disconnected, nothing committed is lost)."""
        if not self.running():
            return
        proc = self._run(
            *("pg_ctl", "stop", "-m", "fast", "-w", "-t", str(int(STOP_SECONDS))),
            *("-D", str(self.data)),
            timeout=STOP_SECONDS + 10,
        )
        if proc.returncode != 0:
            why = last_line(proc.stderr) or last_line(proc.stdout)
            raise ServerError(f"PostgreSQL on {HOST}:{self.port} did not stop: {why}")
        log.info("PostgreSQL stopped")


# -- MLflow --------------------------------------------------------------------------------


def mlflow_command(backend: str, artifacts: Path, port: int, workers: int) -> list[str]:
    """``mlflow server`` on ``backend``, proxying artifacts to ``artifacts``, loopback only."""
    return [
        *(sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend),
        *("--serve-artifacts", "--artifacts-destination", str(artifacts)),
        *("--host", HOST, "--port", str(port), "--workers", str(workers)),
    ]


def healthy(url: str) -> bool:
    """Whether ``<url>/health`` answers 200 now."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError):
        return False


class MlflowServer:
    """``mlflow server`` in its own process group (uvicorn and its workers stop together)."""

    def __init__(self, folder: Path, port: int | None = None, workers: int = 2) -> None:
        self.folder = folder.resolve()
        self.artifacts = self.folder / "artifacts"
        self.log_file = self.folder / "mlflow.log"
        self.port = port
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, backend: str, timeout: float = MLFLOW_START_SECONDS) -> None:
        """Start the server on ``backend`` and wait until ``/health`` answers."""
        self.check_port()
        self.artifacts.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with self.log_file.open("ab") as out:
            self.proc = subprocess.Popen(
                mlflow_command(backend, self.artifacts, self.port, self.workers),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_healthy(self.proc, timeout)
        except BaseException:
            self.stop()  # no server outlives a start that failed
            raise
        log.info("MLflow server %s (artifacts in %s)", self.url, self.artifacts)

    def check_port(self) -> None:
        """Pick a free port when none was given; :class:`ServerError` when it is busy."""
        if self.port is None:
            self.port = free_port()
        elif not port_free(self.port):
            raise ServerError(f"port {self.port} on {HOST} is busy: is an MLflow server running?")

    def _wait_healthy(self, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not healthy(self.url):
            if proc.poll() is not None:
                why = tail_of(self.log_file)
                raise ServerError(f"mlflow server exited {proc.returncode}: {why}")
            if time.monotonic() > deadline:
                why = tail_of(self.log_file)
                raise ServerError(f"mlflow server not healthy within {timeout:g} s: {why}")
            time.sleep(0.25)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after :data:`STOP_SECONDS`."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_SECONDS), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # workers outliving their parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
        deadline = time.monotonic() + 10
        while self.port is not None and not port_free(self.port):
            if time.monotonic() > deadline:
                raise ServerError(f"port {self.port} still busy after the MLflow server stopped")
            time.sleep(0.1)
        log.info("MLflow server stopped")


# -- both ------------------------------------------------------------------------------------


class TrackingServer:
    """PostgreSQL and an MLflow server on it, in ``folder``; :meth:`start` starts both,
    :meth:`stop` stops both (MLflow first). The MLflow server alone can be stopped and
    started again (same port, same database) with :meth:`stop_mlflow` / :meth:`start_mlflow`."""

    def __init__(self, folder: Path, port: int | None = None, workers: int = 2) -> None:
        self.folder = folder.resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.postgres = Postgres(self.folder)
        self.mlflow = MlflowServer(self.folder, port, workers)

    @property
    def uri(self) -> str:
        """What to export as ``MLFLOW_TRACKING_URI``."""
        return self.mlflow.url

    @property
    def artifacts(self) -> Path:
        return self.mlflow.artifacts

    def start(self) -> TrackingServer:
        self.mlflow.check_port()  # before PostgreSQL starts for nothing
        self.postgres.start()
        try:
            self.start_mlflow()
        except BaseException:
            self.stop()
            raise
        return self

    def start_mlflow(self) -> None:
        self.mlflow.start(self.postgres.uri)

    def stop_mlflow(self) -> None:
        self.mlflow.stop()

    def stop(self) -> None:
        try:
            self.mlflow.stop()
        finally:
            self.postgres.stop()

    def __enter__(self) -> TrackingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt while the block runs (also where SIGINT
    came in ignored, as in a background job of a script)."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@stage_main
def main(argv: list[str] | None = None) -> None:
    """``python -m imgclf.tracking.server [--dir DIR] [--port PORT]``: a trial tracking
    server in the foreground until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        description="Run MLflow on PostgreSQL on loopback (a team trial), until Ctrl-C."
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=PATHS.cache / "tracking-server",
        help="the database, artifacts and logs, kept between starts (default: %(default)s)",
    )
    parser.add_argument("--port", type=int, default=5000, help="MLflow's port (default: 5000)")
    parser.add_argument("--workers", type=int, default=2, help="MLflow's workers (default: 2)")
    args = parser.parse_args(argv)
    setup_logging()
    server = TrackingServer(args.dir, args.port, args.workers)
    with stop_signals():
        try:
            server.start()
            print(f"export MLFLOW_TRACKING_URI={server.uri}", flush=True)
            log.info("data in %s; Ctrl-C stops both servers", server.folder)
            while server.mlflow.alive():
                time.sleep(0.5)
            raise ServerError(f"mlflow server exited: {tail_of(server.mlflow.log_file)}")
        except KeyboardInterrupt:
            log.info("stopping")
        finally:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
