"""One MLflow run across the train, report and promote stages: taken while a stage works,
linked through ``.mlflow-run.json``, recorded offline when the store is unreachable."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.config import PATHS, StageError
from imgclf.files import file_md5, write_json
from imgclf.tracking.identity import (
    OWNER_TAG,
    owner,
    owner_alive,
    run_name,
    run_tags,
)
from imgclf.tracking.registry import GIT_COMMIT_TAG, version_tags
from imgclf.tracking.store import (
    T,
    artifact_location,
    locked_call,
    pending_dir,
    pending_key,
    tracking_uri,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

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


def audit_experiment(experiment: str) -> str:
    """The experiment of the ``audit`` stage's runs, ``<experiment>-audit``: one audit run
    per pipeline run would otherwise double the runs listed beside ``train``'s."""
    return f"{experiment}-audit"


def start_run(
    experiment: str, data_hash: str, tags: dict[str, str], prefix: str = ""
) -> tuple[Run, str, str | None]:
    """Close runs whose owner died; start a new run in ``experiment``, named ``prefix`` +
    :func:`run_name`, tagged with the data hash, the git commit and ``tags``. Returns the
    run, its name and the commit."""
    uri = tracking_uri()
    tags = run_tags(data_hash, PATHS.root) | tags
    commit = tags.get("git_commit")
    name = prefix + run_name(commit=commit)
    close_abandoned(uri, experiment)
    run = Run.start(uri, experiment, name, pending_dir(), run_name=name, tags=tags)
    return run, name, commit


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


def _create_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model ``name`` unless it exists."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "already exists" not in str(exc).lower():
            raise


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
            run.run_id = run_id  # a resumed run keeps its id: replay logs into that very run
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
        self,
        bundle: Path,
        name: str,
        metric: str,
        value: float,
        alias: str,
        git_commit: str | None = None,
    ) -> dict[str, Any] | None:
        """Log ``bundle`` under ``bundle/``, register it as a new version of ``name`` and
        move ``alias`` to that version: promote registers only the bundle it serves, so the
        newest version is the champion. The version is tagged with ``test_<metric>`` =
        ``value`` and, so that any copy of the bundle finds it again
        (:mod:`imgclf.tracking.registry`), ``bundle_md5`` and ``git_commit`` (``git_commit``,
        else the run's tag). Returns ``{"version", "alias", "champion_value",
        "champion_version"}`` (the new version and ``value``), or None offline."""
        md5 = file_md5(bundle)

        def register(client: MlflowClient) -> dict[str, Any]:
            commit = git_commit or client.get_run(self.run_id).data.tags.get(GIT_COMMIT_TAG)
            client.log_artifact(self.run_id, str(bundle), "bundle")
            _create_registered_model(client, name)
            tags = {f"test_{metric}": str(value)} | version_tags(md5, commit)
            version = client.create_model_version(
                name, source=f"runs:/{self.run_id}/bundle", run_id=self.run_id, tags=tags
            ).version
            client.set_registered_model_alias(name, alias, version)
            return {
                "version": str(version),
                "alias": alias,
                "champion_value": value,
                "champion_version": str(version),
            }

        result = self._attempt("register the bundle", register)
        if not self.ok:  # replay registers it, if the bundle is still this one
            request = {"name": name, "bundle": str(Path(bundle).resolve()), "metric": metric}
            request |= {"value": value, "alias": alias, "bundle_md5": md5}
            self._record("register", request | ({"git_commit": git_commit} if git_commit else {}))
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
