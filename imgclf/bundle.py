"""The model bundle: the one self-contained file that ``promote`` writes and serving loads.

``models/bundle.zip`` holds ``model.keras`` (raw 0-255 pixels in, probabilities out; every
preprocessing step is a layer inside it) and ``bundle.json``: class names, input size,
decode settings, the operating threshold, the gate verdict, a metrics summary, the data
hash, the git commit and the MLflow run id. Training, report and serving therefore never
disagree, and what is served is always one file's bytes: the model, the threshold and the
md5 reported by ``/version`` come from the same read.

The file is written to a temporary name beside it and renamed over the old one, so a
reader sees the old bundle or the new one, never half of either. Its bytes depend only on
its content (fixed zip timestamps, sorted JSON), so an identical model gives an identical
bundle.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.files import write_bytes, write_json

MODEL_ENTRY = "model.keras"
INFO_ENTRY = "bundle.json"
FORMAT = 1
REQUIRED = ("class_names", "image_size", "decode", "operating_point", "gate")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest timestamp: no build time in the bytes


class BundleError(ValueError):
    """A file that is not a complete, promoted bundle; the message says what is wrong."""


@dataclass(frozen=True)
class Bundle:
    """A bundle read into memory: its info, the Keras model's bytes and the file's md5."""

    info: dict[str, Any]
    model_bytes: bytes
    md5: str

    @classmethod
    def from_bytes(cls, data: bytes) -> Bundle:
        """Parse and check a bundle (raises :class:`BundleError`)."""
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                if zf.testzip() is not None:
                    raise BundleError("bundle is corrupt (CRC mismatch)")
                info = json.loads(zf.read(INFO_ENTRY))
                model = zf.read(MODEL_ENTRY)
        except (zipfile.BadZipFile, KeyError, ValueError, EOFError) as exc:
            if isinstance(exc, BundleError):
                raise
            raise BundleError(f"not a complete bundle ({type(exc).__name__}: {exc})") from None
        check_info(info)
        return cls(info, model, hashlib.md5(data, usedforsecurity=False).hexdigest())

    @classmethod
    def read(cls, path: Path) -> Bundle:
        """Read ``path`` once and parse it."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read {path.name}: {exc.strerror or exc}") from None
        if not data:
            raise BundleError(f"{path.name} is empty")
        return cls.from_bytes(data)

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])


def check_info(info: Any) -> None:
    """A bundle's info must be complete and must say the gate passed."""
    if not isinstance(info, dict):
        raise BundleError(f"{INFO_ENTRY} must hold a JSON object")
    missing = [k for k in REQUIRED if k not in info]
    if missing:
        raise BundleError(f"{INFO_ENTRY} lacks {', '.join(missing)}")
    if info.get("format") != FORMAT:
        raise BundleError(f"bundle format {info.get('format')!r} is not {FORMAT}")
    classes = info["class_names"]
    if not isinstance(classes, list) or len(classes) < 2:
        raise BundleError("class_names must list at least two classes")
    op = info["operating_point"]
    if op["positive_class"] not in classes or not 0.0 <= float(op["threshold"]) <= 1.0:
        raise BundleError(f"operating point {op} does not fit the classes {classes}")
    if info["gate"].get("passed") is not True:
        raise BundleError("the bundle did not pass its quality gate")


def run_facts_path(bundle: Path) -> Path:
    """``bundle.run.json`` beside ``bundle.zip``: the run-specific facts of a bundle."""
    return bundle.with_suffix(".run.json")


def read_run_facts(bundle: Path, md5: str) -> dict[str, Any]:
    """The facts beside ``bundle`` when they describe the bundle with this md5, else ``{}``
    (a bundle copied or checked out without them is still a bundle)."""
    try:
        facts = json.loads(run_facts_path(bundle).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return facts if isinstance(facts, dict) and facts.get("bundle_md5") == md5 else {}


def write_run_facts(bundle: Path, facts: dict[str, Any]) -> Path:
    """Write ``facts`` beside ``bundle`` (atomically; :func:`read_run_facts` reads them)."""
    return write_json(run_facts_path(bundle), facts)


def bundle_bytes(model_file: Path, info: dict[str, Any]) -> bytes:
    """The bundle's bytes: deterministic for the same model file and info."""
    info = {**info, "format": FORMAT}
    check_info(info)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        # model.keras is a zip already: stored, not compressed again
        zf.writestr(zipfile.ZipInfo(MODEL_ENTRY, _EPOCH), model_file.read_bytes())
        entry = zipfile.ZipInfo(INFO_ENTRY, _EPOCH)
        entry.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(entry, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return buf.getvalue()


def write_bundle(path: Path, model_file: Path, info: dict[str, Any]) -> str:
    """Write the bundle atomically (temporary file, fsync, rename); returns its md5."""
    data = bundle_bytes(model_file, info)
    write_bytes(path, data, fsync=True)
    return hashlib.md5(data, usedforsecurity=False).hexdigest()
