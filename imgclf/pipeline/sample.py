"""Write the bundled sample data set into ``data/raw/<class>/<subclass>/``.

The images are scikit-learn's handwritten digits (1,797 real 8x8 scans that install with
the package), upscaled to 32x32 PNG files, byte-for-byte deterministic. Digits 0-6 form
the class ``safe`` and digits 7-9 the class ``sensitive`` (about 70/30, like the origin's
data), one subclass per digit, so moving ``sensitive/digit_7`` into ``safe/`` is a real
relabel.

Usage: ``python -m imgclf.pipeline.sample [--raw DIR] [--per-digit N] [--unless-user-data]``
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.config import PATHS, setup_logging
from imgclf.files import write_bytes

log = logging.getLogger(__name__)

SAFE_DIGITS = range(7)  # 0-6 -> safe; 7-9 -> sensitive
SIDE = 32


class ForeignDataError(RuntimeError):
    """``data/raw`` holds files the sample writer did not write."""


def digit_class(digit: int) -> str:
    """Class of a digit in the sample: ``safe`` for 0-6, ``sensitive`` for 7-9."""
    return "safe" if digit in SAFE_DIGITS else "sensitive"


def digit_png(pixels: np.ndarray) -> bytes:
    """One 8x8 digit (ink 0-16) as a 32x32 PNG, dark ink on white."""
    gray = (255 - np.rint(pixels.reshape(8, 8) * 255.0 / 16.0)).astype(np.uint8)
    img = Image.fromarray(gray).resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def sample_files(per_digit: int | None = None) -> Iterator[tuple[str, bytes]]:
    """Yield ``(relative path, PNG bytes)`` of the sample, in a fixed order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen: dict[int, int] = {}
    for index, (pixels, target) in enumerate(zip(digits.data, digits.target, strict=True)):
        digit = int(target)
        seen[digit] = seen.get(digit, 0) + 1
        if per_digit is not None and seen[digit] > per_digit:
            continue
        rel = f"{digit_class(digit)}/digit_{digit}/digit_{digit}_{index:04d}.png"
        yield rel, digit_png(pixels)


def write_sample(raw: Path, per_digit: int | None = None) -> int:
    """Write the sample into ``raw``; return the number of files written.

    Refuses (``ForeignDataError``) when ``raw`` holds any file that is not part of the
    sample with the same bytes, so a user's own data is never touched. Rerunning on a
    folder it wrote itself is a no-op apart from restoring missing files.
    """
    expected = dict(sample_files(per_digit))
    if raw.exists():
        existing = sorted(p for p in raw.rglob("*") if p.is_file())
        foreign = [
            p for p in existing if expected.get(p.relative_to(raw).as_posix()) != p.read_bytes()
        ]
        if foreign:
            shown = ", ".join(str(p.relative_to(raw)) for p in foreign[:3])
            raise ForeignDataError(
                f"{raw} already holds {len(foreign)} file(s) the sample did not write "
                f"(e.g. {shown}); it is left untouched. Use an empty folder or your own data."
            )
    written = 0
    for rel, blob in expected.items():
        target = raw / rel
        if not target.is_file():
            write_bytes(target, blob)
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 written (or user data kept with ``--unless-user-data``), 2 refused."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=PATHS.raw, help="target folder")
    parser.add_argument("--per-digit", type=int, default=None, help="at most N images a digit")
    parser.add_argument(
        "--unless-user-data",
        action="store_true",
        help="when the folder holds your own data, leave it and exit 0 (for `make run`)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        written = write_sample(args.raw, args.per_digit)
    except ForeignDataError as exc:
        if args.unless_user_data:
            log.info("%s holds your own data: using it, not the sample", args.raw)
            return 0
        log.error("%s", exc)
        return 2
    log.info("sample: %d file(s) written into %s", written, args.raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
