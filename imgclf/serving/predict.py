"""One-shot prediction, as the origin's ``prediction/predict.py``::

    python serve/predict.py --image_source path/to/image.jpg
    python serve/predict.py --image_source path/to/folder/ [--recursive]

Prints the origin's JSON on stdout, ``{path: {class: probability}}``, plus top-level
``__decision__`` (``{path: decision at the stored threshold}``), ``__model__`` (the bundle's
md5 and lineage: registry version, MLflow run, git commit, as ``/version`` gives them) and,
when some entries could not be classified, ``__errors__`` (``{path: reason}``: a file that
is not a decodable image, a FIFO or device, a dangling symbolic link, a link loop, a folder
that cannot be read); see :mod:`imgclf.serving.output`. ``--plain`` prints exactly the
origin's shape. Hidden entries
are left out, and so are sub-folders without ``--recursive`` (counted on stderr). Folders
run in batches with progress on stderr. The decoded-pixel limit is the server's,
``max_pixels`` in ``serve.yaml``.

Exit status: 0 when at least one file was classified (the entries that were not are listed
under ``__errors__`` and logged), 1 when none was (an empty folder, no image in it, a source
that is not a regular file), 2 when the source or the model is missing (a dangling link or a
link loop counts as missing) or ``serve.yaml`` is invalid; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from imgclf.config import load_serve, setup_logging, stage_main
from imgclf.serving.listing import SourceMissing, scan
from imgclf.serving.output import (
    DECISION_KEY,
    ERRORS_KEY,
    MODEL_KEY,
    model_record,
    origin_document,
)
from imgclf.serving.predictor import ModelLoadError, Predictor, add_model_options

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module's doc)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--image_source", "--image-source", required=True, type=Path)
    ap.add_argument("--recursive", action="store_true", help="also scan sub-folders")
    add_model_options(ap)
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


@stage_main
def main(argv: list[str] | None = None) -> int:
    """Classify ``--image_source`` and print the origin's JSON; the exit status as above."""
    args = parse_args(argv)
    setup_logging(args.log_level)
    settings = load_serve()  # the server's pixel limit and runtime (a bad file: one line, 2)
    source: Path = args.image_source
    try:
        listing = scan(source, args.recursive)
    except SourceMissing as exc:
        log.error("image source not found: %s (%s)", source, exc)
        return 2
    try:
        predictor = Predictor.load(
            args.model, settings.max_pixels, args.runtime or settings.runtime
        )
    except ModelLoadError as exc:
        log.error("%s", exc)
        return 2
    answers = classify_with_progress(predictor, listing.files, args.batch_size)
    answers += [(str(path), {"error": reason}) for path, reason in listing.skipped.items()]
    doc = origin_document(sorted(answers, key=lambda answer: Path(answer[0])))
    errors = doc.get(ERRORS_KEY, {})
    for path, reason in errors.items():
        log.warning("%s: %s", path, reason)
    if listing.folders_left_out:
        log.warning(
            "%s: %d sub-folder(s) not scanned (add --recursive)", source, listing.folders_left_out
        )
    classified = len(answers) - len(errors)
    if not classified:
        log.warning("%s: no image classified", source)
    if args.plain:
        doc = {k: v for k, v in doc.items() if k not in (DECISION_KEY, ERRORS_KEY)}
    else:
        doc[MODEL_KEY] = model_record(predictor.version)
    print(json.dumps(doc, indent=2))
    return 0 if classified else 1


if __name__ == "__main__":
    sys.exit(main())
