"""Shared test setup: make the test helpers importable."""

from __future__ import annotations

import sys
from pathlib import Path

# the test helpers (tests/) and the benchmark harness (benchmarks/, a folder of the repo,
# not an installed package) are importable from every test module
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
