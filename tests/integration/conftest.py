"""Fixtures shared by the integration tests."""

from __future__ import annotations

import os

import pytest

from imgclf.testing.browser import CHROMIUM, NO_CHROMIUM, chromium


@pytest.fixture
def browser(tmp_path):
    """A fresh headless Chromium; yields the DevTools HTTP endpoint. Skipped where
    Chromium is missing, except in CI (which installs it): there it fails."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail(NO_CHROMIUM)
        pytest.skip(NO_CHROMIUM)
    with chromium(tmp_path) as devtools:
        yield devtools
