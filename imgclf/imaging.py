"""Image decoding and validation shared by ``preprocess``, training and serving.

``preprocess`` turns a raw file into the stored JPEG with :func:`load_rgb`,
:func:`fit_square` and :func:`encode_jpeg`; training reads that JPEG back with
:func:`decode_stored_jpeg`. Serving runs the very same chain on an upload
(:func:`serving_input`: decode, fit, encode at the same quality, decode with the same
TensorFlow op), so the tensor the model gets for a raw file is bit-for-bit the one it was
trained on for that file.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Never accept partial images silently: a truncated file is invalid, not half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We enforce our own pixel limit (below) before decoding; disable Pillow's global one so
# the limit is the one in params.yaml, not a process-wide setting.
Image.MAX_IMAGE_PIXELS = None

if TYPE_CHECKING:
    from imgclf.params import Preprocess

SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# A fitted image whose every channel has a standard deviation below this (on 0-255) is
# near-uniform: kept, but flagged ``blank`` (a lens cap, an empty scan, a failed export).
BLANK_MAX_STD = 2.0


class InvalidImage(ValueError):
    """A file that cannot be used as an image; the message is the reason in words."""


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode and fit an image (the ``preprocess`` params, also stored with the model).

    Build it with :meth:`from_params` (a stage) or :meth:`from_dict` (a model bundle); the
    values live in ``params.yaml``.
    """

    size: int
    mode: str  # "pad" keeps the aspect ratio, "crop" takes the centre square
    background: tuple[int, int, int]
    max_pixels: int
    formats: tuple[str, ...]  # of imgclf.params.FORMATS
    jpeg_quality: int  # of the stored training JPEG, and of serving's round trip

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
    def from_params(cls, params: Preprocess) -> DecodeOptions:
        """From the (validated) ``preprocess`` params."""
        return cls.from_dict(params.model_dump())

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DecodeOptions:
        """From :meth:`to_dict`'s shape (as stored in a model bundle); other keys ignored.

        Every key is required: bundle format 1 (:data:`imgclf.bundle.FORMAT`, the only one)
        has always stored all six, so there is no older bundle to fill in for.
        """
        return cls(
            size=int(values["size"]),
            mode=str(values["mode"]),
            background=tuple(int(c) for c in values["background"]),
            max_pixels=int(values["max_pixels"]),
            formats=tuple(str(f).upper() for f in values["formats"]),
            jpeg_quality=int(values["jpeg_quality"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """The values as plain JSON types (stored in a model bundle, keys a cache)."""
        return {
            "size": self.size,
            "mode": self.mode,
            "background": list(self.background),
            "max_pixels": self.max_pixels,
            "formats": list(self.formats),
            "jpeg_quality": self.jpeg_quality,
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
    return fit_square_content(img, options)[0]


def fit_square_content(img: Image.Image, options: DecodeOptions) -> tuple[Image.Image, Image.Image]:
    """:func:`fit_square`, plus the part of its result that is picture, not padding.

    In ``pad`` mode the picture is the resized image before the background is added
    (``ImageOps.pad`` is ``contain`` then paste, so padding the contained image gives the
    same pixels); in ``crop`` mode it is the whole fitted image.
    """
    size = (options.size, options.size)
    side = min(img.size) if options.mode == "crop" else max(img.size)
    factor = side // (2 * options.size)
    if factor >= 2:
        img = img.reduce(factor)
    if options.mode == "crop":
        fitted = ImageOps.fit(img, size, method=Image.Resampling.BICUBIC)
        return fitted, fitted
    content = ImageOps.contain(img, size, method=Image.Resampling.BICUBIC)
    fitted = ImageOps.pad(content, size, method=Image.Resampling.BICUBIC, color=options.background)
    return fitted, content


def is_blank(img: Image.Image, max_std: float = BLANK_MAX_STD) -> bool:
    """True when every channel of ``img`` has a standard deviation below ``max_std``.

    Computed from Pillow's per-band histogram (no pixel copy, the same cost at any size).
    An image without pixels is blank.
    """
    if img.width == 0 or img.height == 0:
        return True
    hist = np.asarray(img.histogram(), dtype=np.float64).reshape(-1, 256)
    levels = np.arange(256, dtype=np.float64)
    count = hist.sum(axis=1)
    mean = hist @ levels / count
    variance = np.maximum(hist @ (levels * levels) / count - mean * mean, 0.0)
    return bool(np.sqrt(variance).max() < max_std)


def decode_array(source: bytes | Path, options: DecodeOptions) -> np.ndarray:
    """Decode and fit ``source`` into a ``(size, size, 3)`` uint8 array (before the JPEG
    round trip that training and serving share; see :func:`serving_input`)."""
    return np.asarray(fit_square(load_rgb(source, options), options), dtype=np.uint8)


def decode_stored_jpeg(data: Any) -> Any:
    """The stored JPEG's pixels as a uint8 tensor: the one decoder training and serving
    share (TensorFlow's, exact integer IDCT). Works eagerly and inside ``tf.data``."""
    import tensorflow as tf

    return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")


def stored_jpeg(source: bytes | Path, options: DecodeOptions) -> bytes:
    """The JPEG training stored for a raw file (decode, fit, JPEG at
    ``options.jpeg_quality``): the first steps of :func:`serving_input`, without
    TensorFlow (batch scoring runs them in worker processes)."""
    return encode_jpeg(fit_square(load_rgb(source, options), options), options.jpeg_quality)


def serving_input(source: bytes | Path, options: DecodeOptions) -> np.ndarray:
    """The ``(size, size, 3)`` uint8 pixels the model gets for a raw file: exactly what
    training read for it (:func:`stored_jpeg`, then :func:`decode_stored_jpeg`)."""
    return np.asarray(decode_stored_jpeg(stored_jpeg(source, options)))


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Encode RGB ``img`` as a baseline JPEG (deterministic for the same pixels)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality), optimize=False, subsampling=0)
    return buf.getvalue()
