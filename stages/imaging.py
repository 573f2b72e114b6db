"""Image decoding and validation shared by ``preprocess`` and serving.

Both sides call :func:`load_rgb` then :func:`fit_square`, so what the model sees at serving
time is prepared exactly as its training images were.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Never accept partial images silently: a truncated file is invalid, not half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We enforce our own pixel limit (below) before decoding; disable Pillow's global one so
# the limit is the one in params.yaml, not a process-wide setting.
Image.MAX_IMAGE_PIXELS = None

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class InvalidImage(ValueError):
    """A file that cannot be used as an image; the message is the reason in words."""


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode and fit an image (the ``preprocess`` params, also stored with the model)."""

    size: int = 224
    mode: str = "pad"  # "pad" keeps the aspect ratio, "crop" takes the centre square
    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int = 89_478_485
    formats: tuple[str, ...] = DEFAULT_FORMATS

    def __post_init__(self) -> None:
        if self.mode not in ("pad", "crop"):
            raise ValueError(f"mode must be 'pad' or 'crop', got {self.mode!r}")
        if not 8 <= int(self.size) <= 4096:
            raise ValueError(f"size must be between 8 and 4096 pixels, got {self.size}")
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"background must be three values 0-255, got {self.background}")
        if int(self.max_pixels) <= 0:
            raise ValueError("max_pixels must be positive")

    @classmethod
    def from_params(cls, section: dict) -> DecodeOptions:
        """Build from the ``preprocess`` section of ``params.yaml`` (unknown keys ignored)."""
        return cls(
            size=int(section.get("size", cls.size)),
            mode=str(section.get("mode", cls.mode)),
            background=tuple(int(c) for c in section.get("background", cls.background)),
            max_pixels=int(section.get("max_pixels", cls.max_pixels)),
            formats=tuple(str(f).upper() for f in section.get("formats", DEFAULT_FORMATS)),
        )

    def to_dict(self) -> dict:
        return {
            "size": self.size,
            "mode": self.mode,
            "background": list(self.background),
            "max_pixels": self.max_pixels,
            "formats": list(self.formats),
        }


def _open(source: bytes | Path) -> Image.Image:
    if isinstance(source, bytes | bytearray):
        if not source:
            raise InvalidImage("empty file")
        fp: io.BytesIO | Path = io.BytesIO(source)
    else:
        if Path(source).stat().st_size == 0:
            raise InvalidImage("empty file")
        fp = Path(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(fp)
    except UnidentifiedImageError:
        raise InvalidImage("not an image (unrecognised format)") from None
    except Exception as exc:  # hostile headers raise more than OSError
        raise InvalidImage(f"corrupt image header: {type(exc).__name__}: {exc}") from None


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on ``background``."""
    if img.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode != "I" or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def load_rgb(source: bytes | Path, options: DecodeOptions) -> Image.Image:
    """Decode ``source`` to an upright RGB image, already reduced close to ``options.size``.

    Raises :class:`InvalidImage` with the reason for anything unusable: empty, not an image,
    a format not allowed, too many pixels (checked from the header, before decoding, so a
    decompression bomb costs nothing), truncated or corrupt data. Any other exception a
    decoder raises on hostile bytes is turned into ``InvalidImage`` too, so one bad file
    never stops a batch.
    """
    img = _open(source)
    try:
        return _decode(img, options)
    except InvalidImage:
        img.close()
        raise
    except Exception as exc:  # Pillow plugins raise IndexError, struct.error... on fuzz
        img.close()
        raise InvalidImage(f"truncated or corrupt image: {type(exc).__name__}: {exc}") from None


def _decode(img: Image.Image, options: DecodeOptions) -> Image.Image:
    fmt = (img.format or "").upper()
    if fmt not in options.formats:
        raise InvalidImage(f"format {fmt or 'unknown'} is not allowed")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"invalid dimensions {width}x{height}")
    if width * height > options.max_pixels:
        raise InvalidImage(
            f"too many pixels ({width}x{height} = {width * height:,} > "
            f"{options.max_pixels:,}): possible decompression bomb"
        )
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated: the first frame
    if fmt in ("JPEG", "MPO"):
        # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 scale, never below size.
        img.draft("RGB", (options.size, options.size))
    img.load()
    ImageOps.exif_transpose(img, in_place=True)
    return _to_rgb(img, options.background)


def fit_square(img: Image.Image, options: DecodeOptions) -> Image.Image:
    """Resize to ``size`` x ``size``: centre crop, or pad keeping the aspect ratio.

    A large image is first box-reduced by an integer factor while staying at least twice the
    target (Pillow's ``reducing_gap`` idea): the bicubic pass then works on a small image,
    at no visible cost (a PNG or an undrafted decode is often 8x or more too large).
    """
    size = (options.size, options.size)
    side = min(img.size) if options.mode == "crop" else max(img.size)
    factor = side // (2 * options.size)
    if factor >= 2:
        img = img.reduce(factor)
    if options.mode == "crop":
        return ImageOps.fit(img, size, method=Image.Resampling.BICUBIC)
    return ImageOps.pad(img, size, method=Image.Resampling.BICUBIC, color=options.background)


def decode_array(source: bytes | Path, options: DecodeOptions) -> np.ndarray:
    """Decode and fit ``source`` into a ``(size, size, 3)`` uint8 array (serving's input)."""
    return np.asarray(fit_square(load_rgb(source, options), options), dtype=np.uint8)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Encode RGB ``img`` as a baseline JPEG (deterministic for the same pixels)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality), optimize=False, subsampling=0)
    return buf.getvalue()
