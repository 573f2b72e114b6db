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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its folder's tier (``unit`` unless it is marked otherwise)."""
    for item in items:
        parts = Path(item.path).relative_to(item.config.rootpath).parts
        tier = next((t for t in TIERS[1:] if t in parts or item.get_closest_marker(t)), "unit")
        item.add_marker(getattr(pytest.mark, tier))
