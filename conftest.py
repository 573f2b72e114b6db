"""Test tiers, by folder: ``tests/unit`` (in-process, ``make test-fast``, under a minute),
``tests/integration`` (real server processes, sockets, browsers, several processes on one
MLflow store) and ``tests/e2e`` (the pipeline itself: ``dvc repro``/``dvc exp run`` in a
throw-away git + DVC repository). Each test gets its tier's marker, so ``pytest -m unit``
picks the fast tier from any set of paths. A test (or one parameter of it) may name a
slower tier itself: ``@pytest.mark.integration`` in ``tests/unit`` runs with that tier."""

from __future__ import annotations

from pathlib import Path

import pytest

TIERS = ("unit", "integration", "e2e")
# Files run one after another on one xdist worker: those that start long-lived servers
# of other programs on loopback (MLflow on PostgreSQL, OpenSSH, TensorFlow's gRPC workers).
SERIAL = ("test_tracking_server.py", "test_distributed_training.py", "test_dvc_remote.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its folder's tier (``unit`` unless it is marked otherwise)."""
    for item in items:
        parts = Path(item.path).relative_to(item.config.rootpath).parts
        tier = next((t for t in TIERS[1:] if t in parts or item.get_closest_marker(t)), "unit")
        item.add_marker(getattr(pytest.mark, tier))


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's ``loadfile`` (each file whole, in order, on one worker: its module
    fixtures run once), with the :data:`SERIAL` files as one unit."""
    from xdist.scheduler import LoadFileScheduling

    class ServersTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "servers" if Path(scope).name in SERIAL else scope

    return ServersTogether(config, log)
