"""One place for the project's paths and params.

Every path is derived from the project root (the folder holding ``params.yaml``), so the
stages work the same in the workspace and in the temporary copies that
``dvc exp run --queue`` makes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.params import Params, ParamsError, ServeSettings, load_serve_settings
from imgclf.params import load_params as _load_params


def find_root(start: Path | None = None) -> Path:
    """The project root: ``$IMGCLF_ROOT``, else the nearest folder from ``start`` (the
    working directory) up that holds ``params.yaml``, else the folder holding this package.

    DVC runs each stage with the project root as its working directory (also in the
    temporary copy of a queued experiment), and ``python serve/server.py`` is run from it.
    """
    if os.environ.get("IMGCLF_ROOT"):
        return Path(os.environ["IMGCLF_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder
    return Path(__file__).resolve().parents[1]


ROOT = find_root()

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
    def params_checked(self) -> Path:
        """The ``params`` stage's output: every other stage depends on it."""
        return self.root / "data" / "params.checked"

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
    def fingerprints(self) -> Path:
        """Near-duplicate fingerprints of every processed image's raw content."""
        return self.root / "data" / "fingerprints.csv"

    @property
    def overrides(self) -> Path:
        """The user's decisions (relabel, exclude), versioned with git."""
        return self.root / "data" / "labels_override.csv"

    @property
    def split_dir(self) -> Path:
        return self.root / "data" / "split"

    @property
    def serve_settings(self) -> Path:
        return self.root / "serve.yaml"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def candidate(self) -> Path:
        """What ``train`` writes and ``report`` judges; never served."""
        return self.models / "candidate"

    @property
    def model_file(self) -> Path:
        return self.candidate / "model.keras"

    @property
    def model_metadata(self) -> Path:
        return self.candidate / "metadata.json"

    @property
    def run_link(self) -> Path:
        """The MLflow run of the current candidate: written by ``train``, read by ``report``
        and ``promote``. Outside every DVC out, so no run id makes an output differ."""
        return self.root / ".mlflow-run.json"

    @property
    def bundle(self) -> Path:
        """The promoted, self-contained model bundle: the only thing serving loads."""
        return self.models / "bundle.zip"

    @property
    def export_dir(self) -> Path:
        """The ``export`` stage's SavedModel, TFLite and ONNX files, beside the bundle."""
        return self.models / "export"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def export_metrics(self) -> Path:
        """Each export's parity with the Keras model on the test split."""
        return self.metrics / "export.json"

    @property
    def promote_metrics(self) -> Path:
        """``promote``'s verdict: promoted or not, the candidate's and champion's figures."""
        return self.metrics / "promote.json"

    @property
    def promote_detail(self) -> Path:
        """``promote``'s whole verdict: both figures, the bounds and the reason."""
        return self.metrics / "promote_detail.json"

    @property
    def audit(self) -> Path:
        """The ``audit`` stage's suspects, summary and gallery."""
        return self.metrics / "audit"

    @property
    def test_metrics(self) -> Path:
        return self.metrics / "test.json"

    @property
    def operating_point(self) -> Path:
        """Threshold chosen by ``report``; ``promote`` puts it into the bundle."""
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


class StageError(RuntimeError):
    """A stage cannot go on; the message is one line saying what is wrong and what to do."""


def load_params(path: Path | None = None) -> Params:
    """``params.yaml`` (or ``path``), checked against the schema and the raw class folders."""
    return _load_params(path or PATHS.params, PATHS.raw)


def load_serve(path: Path | None = None) -> ServeSettings:
    """``serve.yaml`` (or ``path``), checked against the schema."""
    return load_serve_settings(path or PATHS.serve_settings)


def digest(value: Any) -> str:
    """Stable short hash of a JSON-serialisable value (used to key caches and models)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def setup_logging(level: str = "INFO") -> None:
    """Configure root logging once for a CLI entry point.

    TensorFlow's C++ start-up lines (oneDNN, CPU features, absl) are shown only at DEBUG;
    this must run before TensorFlow is imported.
    """
    level = level.upper()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if level == "DEBUG" else "3")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "0" if level == "DEBUG" else "3")
    logging.basicConfig(level=level, format=LOG_FORMAT)
    if level != "DEBUG":
        for noisy in ("tensorflow", "absl", "h5py", "PIL", "matplotlib", "watchfiles"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def import_tensorflow() -> Any:
    """Import TensorFlow (and Keras) with its C++ start-up lines (absl, oneDNN), which
    ignore ``TF_CPP_MIN_LOG_LEVEL``, kept off the terminal: they are logged at DEBUG."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    from imgclf.capture import CapturedOutput

    with CapturedOutput() as said:
        import keras  # noqa: F401  (Keras 3 imports TensorFlow, its backend)
        import tensorflow as tf
    if said.text:
        logging.getLogger("tensorflow").debug("start-up: %s", said.text)
    return tf


def stage_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Entry point of a stage or CLI: a bad param or a :class:`StageError` ends it with one
    ``error:`` line on stderr and exit status 2 (params) or 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return int(fn(*args, **kwargs) or 0)
        except ParamsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except StageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return wrapper
