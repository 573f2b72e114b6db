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
# Run one after another on one worker (pytest-xdist): the tests that start long-lived
# servers of other programs on loopback (MLflow on PostgreSQL, OpenSSH, TensorFlow's gRPC
# workers). Every other file is a group of its own (its module fixtures run once).
SERIAL = ("test_tracking_server.py", "test_distributed_training.py", "test_dvc_remote.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its folder's tier (``unit`` unless it is marked otherwise), and
    its xdist group (``--dist loadgroup``): its file, or ``servers`` for :data:`SERIAL`."""
    for item in items:
        parts = Path(item.path).relative_to(item.config.rootpath).parts
        tier = next((t for t in TIERS[1:] if t in parts or item.get_closest_marker(t)), "unit")
        item.add_marker(getattr(pytest.mark, tier))
        group = "servers" if parts[-1] in SERIAL else "/".join(parts)
        item.add_marker(pytest.mark.xdist_group(group))
