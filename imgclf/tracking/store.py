"""Where runs go (``MLFLOW_TRACKING_URI`` or the workspace's SQLite file) and access to
the store: one process at a time on SQLite (``filelock``), lock errors retried (``tenacity``)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote, urlparse

import filelock
import tenacity

from imgclf.config import PATHS

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

T = TypeVar("T")
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
LOCK_TIMEOUT_S = 300.0
ATTEMPTS = 7  # waits 0.2, 0.4, ... 6.4 s (+ up to 0.2 s jitter each): about 13 s in all

# A remote server that is down should not stall a stage for minutes of HTTP retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
# MLflow's own INFO lines ("Creating initial MLflow database tables...") are noise in a
# stage's log and break the one-line errors of the replay CLI; MLFLOW_LOGGING_LEVEL=INFO
# brings them back.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


# -- where runs go ---------------------------------------------------------------------


def tracking_uri(env: dict[str, str] | None = None, workspace: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<workspace>/mlflow.db``."""
    env = os.environ if env is None else env
    if env.get("MLFLOW_TRACKING_URI"):
        return env["MLFLOW_TRACKING_URI"]
    root = (workspace or PATHS.workspace).resolve()
    return f"sqlite:///{root / DB_NAME}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///...`` URI (None for other stores)."""
    if not uri.startswith("sqlite:"):
        return None
    path = unquote(urlparse(uri).path)
    if path in ("", "/", "/:memory:"):
        return None
    # sqlite:///rel.db -> "/rel.db" (relative); sqlite:////abs.db -> "//abs.db" (absolute)
    return Path(path[1:]) if path.startswith("/") else Path(path)


def artifact_location(uri: str) -> str | None:
    """Absolute artifact root for new experiments of a SQLite store (None: server decides)."""
    db = sqlite_path(uri)
    return (db.resolve().parent / ARTIFACTS_DIR).as_uri() if db else None


def pending_dir() -> Path:
    """Where runs that could not reach the store record what they would have logged."""
    return PATHS.cache / "mlflow-pending"


def pending_key(key: str) -> str:
    """File-name-safe key of a pipeline run (its run name)."""
    return re.sub(r"[^0-9A-Za-z_.-]", "_", key)


# -- store access: one process at a time, lock errors retried --------------------------


@contextlib.contextmanager
def store_lock(uri: str, timeout: float | None = None) -> Iterator[None]:
    """Exclusive inter-process lock on ``<db>.lock`` for a SQLite store (no-op for others).

    Raises TimeoutError naming the lock file when it is not free within ``timeout`` seconds
    (default :data:`LOCK_TIMEOUT_S`).
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    lock_file = Path(f"{db}.lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(lock_file, timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout as exc:
        raise TimeoutError(
            f"MLflow store busy: could not lock {lock_file} within {timeout:g} s "
            "(another process holds it)"
        ) from exc
    try:
        yield
    finally:
        lock.release()


def is_database_locked(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's transient "database (table) is locked" error."""
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text


# The policy of :func:`locked_call`; copied for each call (a Retrying keeps per-call state).
BUSY_RETRY = tenacity.Retrying(
    retry=tenacity.retry_if_exception(is_database_locked),
    stop=tenacity.stop_after_attempt(ATTEMPTS),
    wait=tenacity.wait_exponential(multiplier=0.2, max=10) + tenacity.wait_random(0, 0.2),
    before_sleep=tenacity.before_sleep_log(log, logging.INFO),
    reraise=True,
)


def locked_call(uri: str, fn: Callable[[], T]) -> T:
    """``fn()`` under :func:`store_lock`; "database is locked" errors are retried with
    backoff (the lock is released while waiting), any other error is raised at once."""

    def attempt() -> T:
        with store_lock(uri):
            return fn()

    return BUSY_RETRY.copy()(attempt)
