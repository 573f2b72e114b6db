"""One-shot prediction, as the origin's ``prediction/predict.py``::

    python serve/predict.py --image_source path/to/image.jpg
    python serve/predict.py --image_source path/to/folder/ [--recursive]

Prints the origin's JSON on stdout, ``{path: {class: probability}}``, plus top-level
``__decision__`` (``{path: decision at the stored threshold}``) and, when some files could
not be decoded, ``__errors__`` (``{path: reason}``); see :mod:`imgclf.serving.output`. ``--plain``
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
from typing import Any

from tqdm import tqdm

from imgclf.config import PATHS, setup_logging
from imgclf.serving.listing import image_files
from imgclf.serving.output import DECISION_KEY, ERRORS_KEY, origin_document
from imgclf.serving.predictor import ModelLoadError, Predictor

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module's doc)."""
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


def classify_with_progress(
    predictor: Predictor, paths: list[Path], batch_size: int
) -> list[tuple[str, dict[str, Any]]]:
    """``(path, answer)`` per file, with a progress bar on stderr for more than one."""
    answers = []
    with tqdm(total=len(paths), unit="img", disable=len(paths) < 2, file=sys.stderr) as bar:
        for path, answer in predictor.predict_paths(paths, batch_size):
            answers.append((str(path), answer))
            bar.update()
    return answers


def main(argv: list[str] | None = None) -> int:
    """Classify ``--image_source`` and print the origin's JSON; the exit status as above."""
    args = parse_args(argv)
    setup_logging(args.log_level)
    source: Path = args.image_source
    if not source.exists():
        log.error("image source not found: %s", source)
        return 2
    paths = image_files(source, args.recursive)
    try:
        predictor = Predictor.load(args.model)
    except ModelLoadError as exc:
        log.error("%s", exc)
        return 2
    doc = origin_document(classify_with_progress(predictor, paths, args.batch_size))
    errors = doc.get(ERRORS_KEY, {})
    for path, reason in errors.items():
        log.warning("%s: %s", path, reason)
    if args.plain:
        doc = {k: v for k, v in doc.items() if k not in (DECISION_KEY, ERRORS_KEY)}
    print(json.dumps(doc, indent=2))
    return 1 if paths and len(errors) == len(paths) else 0


if __name__ == "__main__":
    sys.exit(main())
