"""One-shot prediction, as the origin's ``prediction/predict.py``::

    python serve/predict.py --image_source path/to/image.jpg
    python serve/predict.py --image_source path/to/folder/ [--recursive]

Prints the origin's JSON on stdout, ``{path: {class: probability}}``, plus top-level
``__decision__`` (``{path: decision at the stored threshold}``) and, when some files could
not be decoded, ``__errors__`` (``{path: reason}``); see :mod:`serve.output`. ``--plain``
prints exactly the origin's shape. Folders run in batches with progress on stderr. Exit
status: 0 when at least one file was classified (undecodable ones are listed under
``__errors__`` and logged), 1 when none could be, 2 when the source or the model is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from imgclf.config import PATHS, setup_logging
from imgclf.serving.output import DECISION_KEY, ERRORS_KEY, origin_document
from imgclf.serving.predictor import ModelLoadError, Predictor

log = logging.getLogger("imgclf.serving.predict")


def list_images(source: Path, recursive: bool) -> list[Path]:
    """The file itself, or the regular files of a folder (sorted, hidden ones skipped)."""
    if source.is_file():
        return [source]
    found = source.rglob("*") if recursive else source.iterdir()
    return sorted(p for p in found if p.is_file() and not p.name.startswith("."))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--image_source", "--image-source", required=True, type=Path)
    ap.add_argument("--recursive", action="store_true", help="also scan sub-folders")
    ap.add_argument(
        "--model",
        default=str(PATHS.bundle),
        help="bundle file (models/bundle.zip) or MLflow URI such as models:/imgclf@champion",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--plain", action="store_true", help="only {path: {class: probability}}")
    ap.add_argument("--log-level", default="WARNING")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    source: Path = args.image_source
    if not source.exists():
        log.error("image source not found: %s", source)
        return 2
    paths = list_images(source, args.recursive)
    try:
        predictor = Predictor.load(args.model)
    except ModelLoadError as exc:
        log.error("%s", exc)
        return 2
    results = predictor.predict_paths(paths, args.batch_size)
    with tqdm(total=len(paths), unit="img", disable=len(paths) < 2, file=sys.stderr) as bar:
        answers = []
        for path, answer in results:
            answers.append((str(path), answer))
            bar.update()
    doc = origin_document(answers)
    errors = doc.get(ERRORS_KEY, {})
    for path, reason in errors.items():
        log.warning("%s: %s", path, reason)
    if args.plain:
        doc = {k: v for k, v in doc.items() if k not in (DECISION_KEY, ERRORS_KEY)}
    print(json.dumps(doc, indent=2))
    return 1 if paths and len(errors) == len(paths) else 0


if __name__ == "__main__":
    sys.exit(main())
