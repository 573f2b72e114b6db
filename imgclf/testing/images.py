"""Small image files of every awkward kind, made with Pillow, and the decode settings to
read them (for tests and benchmarks)."""

from __future__ import annotations

import dataclasses
import functools
import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgclf.imaging import DecodeOptions
from imgclf.params import load_params
from imgclf.testing.project import SOURCE


@functools.cache
def _project_options() -> DecodeOptions:
    return DecodeOptions.from_params(load_params(SOURCE / "params.yaml").preprocess)


def preprocess_options(**changes: Any) -> DecodeOptions:
    """The project's ``preprocess`` params (``params.yaml``) as DecodeOptions, with
    ``changes`` (say ``size=16``) applied: tests never restate a default."""
    return dataclasses.replace(_project_options(), **changes)


def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    """``img`` saved as ``fmt`` with Pillow's save options ``kwargs``."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def solid(
    color: tuple[int, ...], size: tuple[int, int] = (40, 30), mode: str = "RGB"
) -> Image.Image:
    """An image of one colour."""
    return Image.new(mode, size, color)


def pattern(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A random RGB image (distinct content per seed)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def jpeg(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    """A random-pattern JPEG (quality 90)."""
    return encode(pattern(seed, size), "JPEG", quality=90)


def png(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    """A random-pattern PNG."""
    return encode(pattern(seed, size), "PNG")


def exif_rotated_jpeg() -> bytes:
    """A 40x20 landscape JPEG whose EXIF says 'rotate 90 degrees' (orientation 6)."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    """A red CMYK JPEG."""
    return encode(Image.new("CMYK", (30, 30), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def png_16bit(value: int) -> bytes:
    """A 16-bit greyscale PNG, every pixel ``value``."""
    arr = np.full((20, 20), value, dtype=np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def palette_png_transparent() -> bytes:
    """A palette PNG whose only colour (green) is fully transparent."""
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 255, 0] + [0, 0, 0] * 255)  # index 0 green
    return encode(img, "PNG", transparency=0)  # ... but fully transparent


def rgba_png(alpha: int) -> bytes:
    """A red RGBA PNG with opacity ``alpha``."""
    return encode(Image.new("RGBA", (20, 20), (255, 0, 0, alpha)), "PNG")


def la_png(alpha: int) -> bytes:
    """A black greyscale-with-alpha PNG with opacity ``alpha``."""
    return encode(Image.new("LA", (20, 20), (0, alpha)), "PNG")


def animated_gif() -> bytes:
    """A two-frame GIF: red, then blue."""
    frames = [Image.new("RGB", (20, 20), c).convert("P") for c in [(255, 0, 0), (0, 0, 255)]]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def webp() -> bytes:
    """A blue lossless WebP."""
    return encode(Image.new("RGB", (20, 20), (0, 0, 255)), "WEBP", lossless=True)


def bmp() -> bytes:
    """A green BMP."""
    return encode(Image.new("RGB", (20, 20), (0, 255, 0)), "BMP")


def truncated_jpeg() -> bytes:
    """The first half of a JPEG."""
    data = jpeg(7, (200, 150))
    return data[: len(data) // 2]


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` pixels with almost no data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# 83 bytes found by fuzzing: Pillow's GIF plugin raises IndexError on it, not OSError.
CRASHING_GIF = (
    b"GIF89a\x14\x00\x14\x00\x81\x00\x00\xff\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    b'!\xf9\x04\x00\n\x00\x00\x00,\x00\x00\x00\x00\x1b\x00\x14\x00\x00\x08"\x00\x01\x08\x1cH'
    b"\xb0\xa0\xc1\x83\x08\x9e*\\\xc8\xb0\xa1\xc3\x87\x10#J\x9cH\xb1\xa2\xc5\x8b\x183j\xdc"
    b"\xfe1>\x00!\xf9\x04"
)


def write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` (parent folders created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
