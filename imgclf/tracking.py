"""MLflow tracking shared by ``train``, ``report`` and ``promote``: one run per pipeline run.

``train`` creates the run, named after the DVC experiment (``repro-<time>-<commit>`` under
plain ``dvc repro``), and stores its id in ``.mlflow-run.json``; ``report`` and ``promote``
resume it by id. Each stage *takes* the run while it works (:func:`taken`): status RUNNING
with an owner tag (host, pid, process start time), then FINISHED, FAILED (the stage raised)
or KILLED (SIGINT/SIGTERM). A run whose owner died without a word (SIGKILL, power loss) is
closed as KILLED by the next ``train`` (:func:`close_abandoned`). Only ``promote`` registers
a model version, and only after the quality gate; the champion alias moves only to a
version that beats the champion.

Where runs go
    ``MLFLOW_TRACKING_URI`` when set; otherwise the SQLite file ``mlflow.db`` at the root of
    the *workspace* (``PATHS.workspace``: also from inside the temporary copies
    ``dvc exp run --queue`` works in, ``<repo>/.dvc/tmp/exps/<tmp>/``), created on first
    use. Artifacts of a SQLite store go beside it, in ``mlartifacts/`` (absolute location,
    so queued runs do not write them into their temporary copy).

Concurrency (queued experiments run in parallel against one SQLite file)
    Every call to a SQLite store holds an exclusive lock on ``<db>.lock`` (``filelock``;
    short: one batch of writes, never a whole training), so concurrent processes never race
    on the schema creation of a fresh database nor on SQLite's writer lock. On top of
    MLflow's own ``busy_timeout`` (20 s), a call failing with "database is locked" is
    retried with exponential backoff and jitter (``tenacity``), :data:`ATTEMPTS` times.

When the tracking store is unreachable
    The stage does NOT fail and nothing it computed is lost: the model and every DVC output
    are written as usual. The first failing call logs a loud multi-line WARNING; from then
    on the stage records what it would have logged (params, metrics, tags, artifact paths,
    the registration request) in ``<pending dir>/<run key>.json`` (:func:`pending_dir`,
    ``.cache/mlflow-pending/`` in the workspace by default), and the run link gets
    ``"run_id": null``. ``python -m stages.tracking replay`` (or ``imgclf-tracking
    replay``) logs pending records into the store once it is back. Set
    ``mlflow.required: true`` to make the stage fail instead (after its outputs are saved).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlparse

import filelock
import tenacity

from imgclf.config import PATHS, StageError, setup_logging, stage_main
from imgclf.files import write_json

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

T = TypeVar("T")
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
OWNER_TAG = "imgclf.owner"
LOCK_TIMEOUT_S = 300.0
ATTEMPTS = 7  # waits 0.2, 0.4, ... 6.4 s (+ up to 0.2 s jitter each): about 13 s in all

# A remote server that is down should not stall a stage for minutes of HTTP retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


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


# -- what a run is tagged with -----------------------------------------------------------


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": "3"}`` (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def git_commit(cwd: Path) -> str | None:
    """``git rev-parse HEAD`` in ``cwd`` (None outside a repository)."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def run_tags(data_hash: str, root: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """Git commit, DVC experiment name (under ``dvc exp run``) and the data hash."""
    env = os.environ if env is None else env
    tags = {"data_hash": data_hash}
    commit = git_commit(root)
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    if env.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = env["DVC_EXP_NAME"]
    if env.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = env["DVC_EXP_BASELINE_REV"]
    return tags


def run_name(env: dict[str, str] | None = None, commit: str | None = None) -> str:
    """The DVC experiment's name under ``dvc exp run``, else ``repro-<UTC time>-<commit>``."""
    env = os.environ if env is None else env
    if env.get("DVC_EXP_NAME"):
        return env["DVC_EXP_NAME"]
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"repro-{stamp}-{(commit or 'nogit')[:7]}"


def owner() -> str:
    """``host:pid:start time`` of this process (pids are reused; start times are not)."""
    import psutil

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.2f}"


def owner_alive(tag: str) -> bool | None:
    """Whether the process named by an owner tag still runs (None: another host's)."""
    import psutil

    host, _, rest = tag.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname():
        return None
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except (psutil.Error, ValueError):
        return False


# -- run lifecycle across stages -------------------------------------------------------


def close_abandoned(uri: str, experiment: str) -> list[str]:
    """End as KILLED the RUNNING runs of ``experiment`` whose owner process on this host is
    gone; returns their ids. Runs of other hosts or tools (no owner tag) are left alone."""

    def sweep() -> list[str]:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        closed = []
        for r in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'"):
            tag = r.data.tags.get(OWNER_TAG)
            if tag and owner_alive(tag) is False:
                client.set_tag(r.info.run_id, "imgclf.closed", "owner process gone")
                client.set_terminated(r.info.run_id, status="KILLED")
                closed.append(r.info.run_id)
        return closed

    try:
        closed = locked_call(uri, sweep)
    except Exception as exc:  # tracking trouble is reported by the run itself
        log.debug("could not sweep abandoned runs: %s", exc)
        return []
    for run_id in closed:
        log.warning("MLflow run %s was left RUNNING by a killed stage: closed as KILLED", run_id)
    return closed


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def taken(run: Run) -> Iterator[Run]:
    """Own ``run`` while a stage works on it; end it FINISHED, FAILED or KILLED.

    SIGTERM (what ``dvc`` and process managers send) is turned into KeyboardInterrupt for
    the duration, so a stopped stage still closes its run.
    """
    previous = signal.signal(signal.SIGTERM, _interrupt)
    run.set_tags({OWNER_TAG: owner()})
    try:
        yield run
    except KeyboardInterrupt:
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    else:
        run.end("FINISHED")
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_run_link(run: Run, name: str, data_hash: str, commit: str | None) -> None:
    """Tell ``report`` and ``promote`` which run the candidate belongs to (``.mlflow-run.json``,
    outside the DVC outs: run ids differ every run, the outputs must not)."""
    link = {
        "run_id": run.run_id if run.ok else None,
        "run_name": name,
        "data_hash": data_hash,
        "git_commit": commit,
    }
    write_json(PATHS.run_link, link)


def read_run_link() -> dict[str, Any]:
    """What :func:`write_run_link` wrote (a clear error before any train run)."""
    if not PATHS.run_link.is_file():
        raise StageError(f"{PATHS.run_link.name} not found: run the train stage first")
    return json.loads(PATHS.run_link.read_text(encoding="utf-8"))


def resume(link: dict[str, Any], experiment: str) -> Run:
    """The run ``train`` created for the candidate; an offline run when ``train`` could not
    reach the store either."""
    uri, key, pending = tracking_uri(), str(link["run_name"]), pending_dir()
    if link.get("run_id") is None and (pending / f"{pending_key(key)}.json").exists():
        return Run.offline(uri, experiment, key, pending, "train could not reach MLflow")
    tags = run_tags(link["data_hash"], PATHS.root)
    return Run.start(uri, experiment, key, pending, run_id=link.get("run_id"), tags=tags)


def check_required(run: Run, required: bool) -> None:
    """With ``mlflow.required``, a run that did not reach the store fails the stage."""
    if required and not run.ok:
        raise StageError(f"MLflow tracking failed and mlflow.required is set: {run.error}")


# -- one run ---------------------------------------------------------------------------


class Run:
    """One MLflow run, tolerant of an unreachable store (see the module docstring).

    Every method logs to MLflow while the store answers; after the first failure it records
    into the pending file instead. ``ok`` tells whether everything reached the store.
    """

    def __init__(self, uri: str, experiment: str, key: str, pending_dir: Path) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_id: str | None = None
        self.ok = True
        self.pending_file = pending_dir / f"{pending_key(key)}.json"
        self.error: str | None = None

    @classmethod
    def start(
        cls,
        uri: str,
        experiment: str,
        key: str,
        pending_dir: Path,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> Run:
        """Resume ``run_id`` or create a new run in ``experiment`` (never raises)."""
        run = cls(uri, experiment, key, pending_dir)

        def create_or_reopen() -> str:
            client = run.client()
            if run_id:
                client.update_run(run_id, status="RUNNING")
                return run_id
            exp = client.get_experiment_by_name(experiment)
            exp_id = (
                exp.experiment_id
                if exp
                else client.create_experiment(experiment, artifact_location=artifact_location(uri))
            )
            return client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id

        try:
            run.run_id = locked_call(uri, create_or_reopen)
            log.info("MLflow run %s in %s (%s)", run.run_id, experiment, uri)
        except Exception as exc:
            run._fail(exc, "start the run")
            run._record("tags", tags or {})
        return run

    @classmethod
    def offline(cls, uri: str, experiment: str, key: str, pending_dir: Path, why: str) -> Run:
        """A run that only records into its pending file (its start already failed)."""
        run = cls(uri, experiment, key, pending_dir)
        run.ok = False
        run.error = why
        log.warning("MLflow: %s; recording into %s", why, run.pending_file)
        return run

    def client(self) -> MlflowClient:
        """A client of this run's store (mlflow is imported lazily: it is slow to import)."""
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run with ``status`` (FINISHED, FAILED or KILLED)."""
        self._attempt("end the run", lambda c: c.set_terminated(self.run_id, status=status))
        self._record("status", status)

    def log_params(self, params: dict[str, str]) -> None:
        """Log params; a key already logged with another value is kept (warning)."""

        def log_new(client: MlflowClient) -> None:
            from mlflow.entities import Param

            have = client.get_run(self.run_id).data.params
            new = {k: v[:6000] for k, v in params.items() if k not in have}
            changed = sorted(k for k, v in params.items() if k in have and have[k] != v[:6000])
            if changed:
                log.warning("params already logged with other values, kept: %s", changed)
            items = list(new.items())
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])

        self._attempt("log params", log_new)
        self._record("params", params)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log metrics at ``step`` (None values are skipped)."""
        clean = {k: float(v) for k, v in metrics.items() if v is not None}

        def log_batch(client: MlflowClient) -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, v, now, step) for k, v in clean.items()]
            client.log_batch(self.run_id, metrics=batch)

        self._attempt("log metrics", log_batch)
        self._record("metrics", [{"key": k, "value": v, "step": step} for k, v in clean.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags (values as strings)."""

        def log_batch(client: MlflowClient) -> None:
            from mlflow.entities import RunTag

            client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

        self._attempt("set tags", log_batch)
        self._record("tags", tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload the file or folder ``path`` under ``artifact_path``."""
        self._attempt(
            "log artifact", lambda c: c.log_artifact(self.run_id, str(path), artifact_path)
        )
        self._record("artifacts", [[str(Path(path).resolve()), artifact_path]])

    def register_bundle(
        self, bundle: Path, name: str, metric: str, value: float, alias: str
    ) -> dict[str, Any] | None:
        """Log ``bundle`` under ``bundle/``, register it as a new version of ``name`` and give
        it ``alias`` when ``value`` beats the current holder's ``test_<metric>`` (higher is
        better; a holder without that metric is beaten). Returns ``{"version", "alias",
        "champion_value", "champion_version"}``, or None offline."""

        def register(client: MlflowClient) -> dict[str, Any]:
            from mlflow.exceptions import MlflowException

            client.log_artifact(self.run_id, str(bundle), "bundle")
            try:
                client.create_registered_model(name)
            except MlflowException as exc:
                if "already exists" not in str(exc).lower():
                    raise
            version = client.create_model_version(
                name, source=f"runs:/{self.run_id}/bundle", run_id=self.run_id
            ).version
            client.set_model_version_tag(name, version, f"test_{metric}", str(value))
            try:
                holder = client.get_model_version_by_alias(name, alias)
            except MlflowException:
                holder = None
            best = None
            if holder is not None:
                best = client.get_run(holder.run_id).data.metrics.get(f"test_{metric}")
            crowned = holder is None or best is None or value > best
            if crowned:
                client.set_registered_model_alias(name, alias, version)
            return {
                "version": str(version),
                "alias": alias if crowned else None,
                "champion_value": value if crowned else best,
                "champion_version": str(version) if crowned else str(holder.version),
            }

        result = self._attempt("register the bundle", register)
        self._record("register", name)
        return result

    # -- failure handling --------------------------------------------------------------

    def _attempt(self, what: str, fn: Callable[[MlflowClient], T]) -> T | None:
        """``fn(client)`` against the store while it answers; None (and offline) after."""
        if not self.ok or self.run_id is None:
            return None
        try:
            return locked_call(self.uri, lambda: fn(self.client()))
        except Exception as exc:
            self._fail(exc, what)
            return None

    def _fail(self, exc: BaseException, what: str) -> None:
        self.ok = False
        self.error = f"could not {what}: {type(exc).__name__}: {exc}"
        bar = "!" * 78
        log.warning(
            "\n%s\nMLFLOW TRACKING FAILED (%s)\n  %s\n"
            "  The stage goes on: the model and all DVC outputs are still written.\n"
            "  What would have been logged is recorded in %s;\n"
            "  replay it with `python -m stages.tracking replay` when the store is back.\n%s",
            bar,
            self.uri,
            self.error,
            self.pending_file,
            bar,
        )
        self._record("error", self.error)

    def _record(self, field: str, value: Any) -> None:
        """Add to the pending file (only once the store has failed)."""
        if self.ok:
            return
        self.pending_file.parent.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {}
        if self.pending_file.exists():
            data = json.loads(self.pending_file.read_text(encoding="utf-8"))
        data.setdefault("uri", self.uri)
        data.setdefault("experiment", self.experiment)
        data.setdefault("run_id", self.run_id)
        if field in ("params", "tags"):
            data.setdefault(field, {}).update(value)
        elif field in ("metrics", "artifacts"):
            data.setdefault(field, []).extend(value)
        elif field == "error":
            data.setdefault("errors", []).append(value)
        else:
            data[field] = value
        write_json(self.pending_file, data)


# -- pending records: replay -----------------------------------------------------------


class ReplayError(StageError):
    """A pending record could not be read or logged (one line: what and which file)."""


@dataclass(frozen=True)
class PendingRecord:
    """What an offline run recorded, checked before anything is logged."""

    experiment: str
    run_id: str | None
    params: dict[str, str]
    tags: dict[str, str]
    metrics: list[tuple[int, dict[str, float]]]  # (step, {key: value}) in logging order
    artifacts: list[tuple[str, str | None]]
    status: str

    @classmethod
    def read(cls, path: Path) -> PendingRecord:
        """Parse ``path``; :class:`ReplayError` when it is not a pending record."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            metrics: list[tuple[int, dict[str, float]]] = []
            for m in data.get("metrics", []):
                step, key, value = int(m["step"]), str(m["key"]), float(m["value"])
                if not metrics or metrics[-1][0] != step or key in metrics[-1][1]:
                    metrics.append((step, {}))
                metrics[-1][1][key] = value
            return cls(
                experiment=str(data["experiment"]),
                run_id=data.get("run_id"),
                params={str(k): str(v) for k, v in data.get("params", {}).items()},
                tags={str(k): str(v) for k, v in data.get("tags", {}).items()},
                metrics=metrics,
                artifacts=[(str(p), a) for p, a in data.get("artifacts", [])],
                status=str(data.get("status", "FINISHED")),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise ReplayError(f"{path} is not a readable pending record ({why})") from exc


def replay(pending_file: Path, uri: str) -> str:
    """Log one pending record into the store at ``uri``, rename it to ``.replayed`` and
    return the run id; :class:`ReplayError` when the record is unreadable or the store
    still fails (the record is then kept).

    Params, metrics (with steps), tags and artifacts that still exist are logged; a model
    registration is not replayed (register it from the run once checked).
    """
    record = PendingRecord.read(pending_file)
    run = Run.start(
        uri, record.experiment, pending_file.stem, pending_file.parent, run_id=record.run_id
    )
    if not run.ok:
        raise ReplayError(f"MLflow store {uri} still unreachable: {_first_line(run.error)}")
    run.set_tags({**record.tags, "replayed_from": pending_file.name})
    run.log_params(record.params)
    for step, metrics in record.metrics:
        run.log_metrics(metrics, step=step)
    for path, artifact_path in record.artifacts:
        if Path(path).exists():
            run.log_artifact(Path(path), artifact_path)
    run.end(record.status)
    if not run.ok:
        raise ReplayError(f"replaying {pending_file} failed: {_first_line(run.error)}")
    pending_file.rename(pending_file.with_suffix(".replayed"))
    return str(run.run_id)


def _check_reachable(uri: str) -> None:
    """:class:`ReplayError` unless the store at ``uri`` answers (a fresh SQLite file is
    created), so that a replay against a store still down changes no pending record."""
    from mlflow import MlflowClient

    try:
        locked_call(uri, lambda: MlflowClient(tracking_uri=uri).search_experiments(max_results=1))
    except Exception as exc:
        why = _first_line(f"{type(exc).__name__}: {exc}")
        raise ReplayError(f"MLflow store {uri} still unreachable: {why}") from exc


def _first_line(text: str | None) -> str:
    return (text or "").strip().split("\n", 1)[0]


@stage_main
def main(argv: list[str] | None = None) -> None:
    """``imgclf-tracking replay [--dir DIR]``: log the pending records of offline runs into
    the tracking store (:func:`tracking_uri`)."""
    parser = argparse.ArgumentParser(
        description="Log the pending records of offline MLflow runs into the tracking store."
    )
    parser.add_argument("command", choices=["replay"])
    parser.add_argument(
        "--dir", type=Path, default=pending_dir(), help="pending records (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    if not args.dir.is_dir():
        raise ReplayError(f"{args.dir} not found: no run has recorded anything offline")
    files = sorted(args.dir.glob("*.json"))
    if not files:
        print(f"nothing to replay in {args.dir}")
        return
    uri = tracking_uri()
    _check_reachable(uri)
    for path in files:
        print(f"{path.name}: logged as run {replay(path, uri)} in {uri}")


if __name__ == "__main__":
    raise SystemExit(main())
