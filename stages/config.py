"""One place for the project's paths and params.

Every path is derived from the project root (the folder holding ``params.yaml``), so the
stages work the same in the workspace and in the temporary copies that
``dvc exp run --queue`` makes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class Paths:
    """Every file and folder the pipeline reads or writes, relative to one root."""

    root: Path

    @property
    def workspace(self) -> Path:
        """The user's workspace, also from inside a queued experiment's temporary copy.

        ``dvc exp run --queue`` runs stages in ``<workspace>/.dvc/tmp/exps/<tmpdir>/``;
        shared stores (the preprocess cache, the default MLflow database) live in the
        workspace so queued and workspace runs share them.
        """
        parts = self.root.parts
        for i in range(len(parts) - 3):
            if parts[i : i + 3] == (".dvc", "tmp", "exps"):
                return Path(*parts[:i])
        return self.root

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def processed(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def invalid(self) -> Path:
        return self.root / "data" / "invalid"

    @property
    def manifest(self) -> Path:
        return self.root / "data" / "manifest.csv"

    @property
    def split_dir(self) -> Path:
        return self.root / "data" / "split"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def model_file(self) -> Path:
        return self.models / "model.keras"

    @property
    def model_metadata(self) -> Path:
        return self.models / "metadata.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def operating_point(self) -> Path:
        """Threshold chosen by ``report``; serving reads it beside the model."""
        return self.metrics / "operating_point.json"

    @property
    def cache(self) -> Path:
        """Work cache kept outside DVC outs (DVC deletes outs before a stage reruns)."""
        env = os.environ.get("IMGCLF_CACHE_DIR")
        return Path(env) if env else self.workspace / ".cache"

    def split_list(self, side: str) -> Path:
        """File list of one side of the split: ``train``, ``val`` or ``test``."""
        return self.split_dir / f"{side}.csv"


PATHS = Paths(ROOT)


def load_params(path: Path | None = None) -> dict[str, Any]:
    """Read ``params.yaml`` (or ``path``) into a dict; a missing file is a clear error."""
    path = path or PATHS.params
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    with path.open(encoding="utf-8") as fh:
        params = yaml.safe_load(fh) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a mapping of sections, got {type(params).__name__}")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One section of the params, with a clear error when it is missing."""
    try:
        value = params[name]
    except KeyError:
        raise KeyError(f"params.yaml has no '{name}' section") from None
    if not isinstance(value, dict):
        raise ValueError(f"params.yaml section '{name}' must be a mapping")
    return value


def digest(value: Any) -> str:
    """Stable short hash of a JSON-serialisable value (used to key caches and models)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def setup_logging(level: str = "INFO") -> None:
    """Configure root logging once for a CLI entry point."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
