"""The registry by content: every registered version is tagged with the md5 of its
``bundle.zip`` and the git commit of its run, so a bundle found anywhere (an older commit
checked out, ``dvc exp apply``, a file copied to another machine) is traced back to its
version, run and commit by its bytes alone (:func:`find_origin`).

The look-up informs, it never decides: it runs in a daemon thread bounded by a timeout,
and an unreachable, slow or missing store is a logged warning and no answer, never an
error nor a wait past the bound (nor a held process exit).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic

from imgclf.tracking.store import T, sqlite_path

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

BUNDLE_MD5_TAG = "bundle_md5"
GIT_COMMIT_TAG = "git_commit"
LOOKUP_TIMEOUT_S = 10.0  # importing mlflow and opening a SQLite store take 2-4 s cold


def version_tags(md5: str, git_commit: str | None) -> dict[str, str]:
    """The tags that identify a registered version by content (no commit: no tag)."""
    return {BUNDLE_MD5_TAG: md5} | ({GIT_COMMIT_TAG: git_commit} if git_commit else {})


def md5_filter(name: str, md5: str) -> str:
    """``search_model_versions``' filter for the versions of ``name`` holding ``md5``."""
    if "'" in name or not md5.isalnum():
        raise ValueError(f"cannot search the registry for model {name!r}, md5 {md5!r}")
    return f"name='{name}' and tags.{BUNDLE_MD5_TAG}='{md5}'"


def registry_origin(
    client: MlflowClient, name: str, md5: str, alias: str | None = None
) -> dict[str, Any] | None:
    """``{"registry": {"name", "version", "alias"}, "mlflow_run_id", "run_name",
    "git_commit"}`` of the newest version of ``name`` whose bundle has ``md5`` (None: no
    such version). ``alias`` is reported when the version holds it, else its first alias."""
    found = client.search_model_versions(md5_filter(name, md5))
    if not found:
        return None
    newest = max(found, key=lambda v: int(v.version))
    version = client.get_model_version(name, newest.version)  # search leaves aliases out
    aliases = list(version.aliases or [])
    run = client.get_run(version.run_id) if version.run_id else None
    run_tags = run.data.tags if run else {}
    return {
        "registry": {
            "name": name,
            "version": str(version.version),
            "alias": alias if alias in aliases else (aliases[0] if aliases else None),
        },
        "mlflow_run_id": version.run_id or None,
        "run_name": run.info.run_name if run else None,
        "git_commit": version.tags.get(GIT_COMMIT_TAG) or run_tags.get(GIT_COMMIT_TAG),
    }


class Background(Generic[T]):
    """``fn()`` started in a daemon thread: :meth:`result` waits for it at most a given
    time (a hung call never holds the caller, nor the process's exit)."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller by result()
            self._outcome["error"] = exc

    def result(self, timeout: float) -> T:
        """The value; ``fn``'s exception, or TimeoutError past ``timeout`` seconds (counted
        from this call)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"no answer within {timeout:g} s")
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["value"]


def start_lookup(
    uri: str, name: str, md5: str, alias: str | None = None
) -> Background[dict[str, Any] | None]:
    """:func:`registry_origin` against the store at ``uri``, started in the background
    (a SQLite store that does not exist answers None at once and is not created)."""

    def lookup() -> dict[str, Any] | None:
        db = sqlite_path(uri)
        if db is not None and not db.is_file():
            return None
        from mlflow import MlflowClient

        return registry_origin(MlflowClient(tracking_uri=uri), name, md5, alias)

    return Background(lookup, f"registry-lookup-{md5[:8]}")


def lookup_result(
    lookup: Background[dict[str, Any] | None], uri: str, md5: str, timeout: float
) -> dict[str, Any] | None:
    """What :func:`start_lookup` found, or None with a warning when the store failed or
    did not answer within ``timeout`` seconds."""
    try:
        return lookup.result(timeout)
    except Exception as exc:
        why = (str(exc).strip().split("\n", 1)[0] or type(exc).__name__)[:300]
        log.warning(
            "registry look-up of bundle md5 %s in %s failed (%s): its MLflow version, run "
            "and git commit are left empty",
            md5, uri, why,
        )  # fmt: skip
        return None


def find_origin(
    uri: str, name: str, md5: str, alias: str | None = None, timeout: float = LOOKUP_TIMEOUT_S
) -> dict[str, Any] | None:
    """:func:`registry_origin` of the bundle with ``md5`` in the store at ``uri``, within
    ``timeout`` seconds; None when not registered, or (warning) when the store fails."""
    return lookup_result(start_lookup(uri, name, md5, alias), uri, md5, timeout)
