"""Offline records (``<pending dir>/<run key>.json``) logged into the store once it is
back: ``python -m stages.tracking replay`` / ``imgclf-tracking replay``."""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.config import StageError, setup_logging, stage_main
from imgclf.files import file_md5
from imgclf.tracking.runs import (
    Run,
)
from imgclf.tracking.store import (
    locked_call,
    pending_dir,
    tracking_uri,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

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
    register: dict[str, str] | None  # promote's request: name, bundle, bundle_md5, metric, ...

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
                register=_registration(data.get("register")),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise ReplayError(f"{path} is not a readable pending record ({why})") from exc


REGISTER_KEYS = ("name", "bundle", "bundle_md5", "metric", "value", "alias")
OPTIONAL_REGISTER_KEYS = ("git_commit",)  # absent from older records


def _registration(value: object) -> dict[str, str] | None:
    """The registration request of a record (None: none, or an older record's bare name)."""
    if not isinstance(value, dict):
        return None
    optional = {k: str(value[k]) for k in OPTIONAL_REGISTER_KEYS if value.get(k)}
    return {k: str(value[k]) for k in REGISTER_KEYS} | optional


def replay(pending_file: Path, uri: str) -> tuple[str, dict[str, Any] | None]:
    """Log one pending record into the store at ``uri``, rename it to ``.replayed`` and
    return the run id and the registration (None: nothing registered); :class:`ReplayError`
    when the record is unreadable or the store still fails (the record is then kept).

    Params, metrics (with steps), tags and artifacts that still exist are logged, into the
    run the record names when it has one (a stage that resumed ``train``'s run), else into
    a new run. A model registration promote could not make is made now, tagged as promote
    would have (bundle md5, git commit) and given the champion alias, when
    ``models/bundle.zip`` is still the bundle it promoted (same md5); otherwise it is
    skipped with a warning.
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
    registered = _register(run, record.register) if record.register else None
    run.end(record.status)
    if not run.ok:
        raise ReplayError(f"replaying {pending_file} failed: {_first_line(run.error)}")
    pending_file.rename(pending_file.with_suffix(".replayed"))
    return str(run.run_id), registered


def _register(run: Run, request: dict[str, str]) -> dict[str, Any] | None:
    """Make the registration promote could not make, if the bundle is still the same."""
    bundle = Path(request["bundle"])
    if not bundle.is_file() or file_md5(bundle) != request["bundle_md5"]:
        log.warning(
            "%s is no longer the bundle this run promoted (md5 %s): not registered",
            bundle, request["bundle_md5"],
        )  # fmt: skip
        return None
    name, metric = request["name"], request["metric"]
    registered = run.register_bundle(
        bundle, name, metric, float(request["value"]), request["alias"], request.get("git_commit")
    )
    if registered:
        tags = {k: str(v) for k, v in registered.items() if v is not None}
        run.set_tags({"registered_model": name, **tags})
        return {"name": name, **registered}
    return None


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
    # MLflow prints "View run ... at: <url>" on stdout when a run on a server ends: the lines
    # below say which run, and stdout stays one line a record
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    _check_reachable(uri)
    for path in files:
        run_id, registered = replay(path, uri)
        line = f"{path.name}: logged as run {run_id} in {uri}"
        if registered:
            alias = f", @{registered['alias']}" if registered["alias"] else ""
            line += f" (registered {registered['name']} version {registered['version']}{alias})"
        print(line)


if __name__ == "__main__":
    raise SystemExit(main())
