"""MLflow tracking shared by ``train``, ``report`` and ``promote``: one run per pipeline run
(plus one ``audit-<run name>`` run, tagged ``stage: audit``, in the experiment of its own
``<mlflow.experiment>-audit`` (:func:`audit_experiment`), when the ``audit`` stage runs).

``train`` creates the run, named after the DVC experiment (``repro-<time>-<commit>`` under
plain ``dvc repro``), and stores its id in ``.mlflow-run.json``; ``report`` and ``promote``
resume it by id. Each stage *takes* the run while it works (:func:`taken`): status RUNNING
with an owner tag (host, pid, process start time), then FINISHED, FAILED (the stage raised)
or KILLED (SIGINT/SIGTERM). A run whose owner died without a word (SIGKILL, power loss) is
closed as KILLED by the next ``train`` (:func:`close_abandoned`). Only ``promote`` registers
a model version, and only the bundle it serves; the champion alias moves to every version
it registers. Each version is tagged with its bundle's md5 and git commit, so any copy of
a registered bundle finds its version, run and commit again (:mod:`.registry`).

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
    replay``) logs pending records into the store once it is back: into the run ``train``
    created when it had reached the store, with promote's model registration when
    ``models/bundle.zip`` is still the bundle promoted. Set
    ``mlflow.required: true`` to make the stage fail instead (after its outputs are saved).

Modules: :mod:`.store` (where runs go, lock and retries), :mod:`.identity` (names and
tags), :mod:`.registry` (versions found by content), :mod:`.runs` (the run across stages),
:mod:`.replay` (offline records, the CLI);
:mod:`.server` (``mlflow server`` on PostgreSQL for a team trial, and for the e2e test;
not imported here).
"""

from imgclf.tracking.identity import flatten, git_commit, owner, owner_alive, run_name, run_tags
from imgclf.tracking.registry import find_origin
from imgclf.tracking.replay import ReplayError, main, replay
from imgclf.tracking.runs import (
    Run,
    audit_experiment,
    check_required,
    close_abandoned,
    read_run_link,
    resume,
    start_run,
    taken,
    write_run_link,
)
from imgclf.tracking.store import (
    ATTEMPTS,
    artifact_location,
    locked_call,
    pending_dir,
    sqlite_path,
    store_lock,
    tracking_uri,
)

__all__ = [
    "ATTEMPTS",
    "ReplayError",
    "Run",
    "artifact_location",
    "audit_experiment",
    "check_required",
    "close_abandoned",
    "find_origin",
    "flatten",
    "git_commit",
    "locked_call",
    "main",
    "owner",
    "owner_alive",
    "pending_dir",
    "read_run_link",
    "replay",
    "resume",
    "run_name",
    "run_tags",
    "sqlite_path",
    "start_run",
    "store_lock",
    "taken",
    "tracking_uri",
    "write_run_link",
]
