"""Decoding and validation shared by preprocess and serving."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from imgclf.imaging import (
    BLANK_MAX_STD,
    DecodeOptions,
    InvalidImage,
    decode_array,
    fit_square,
    fit_square_content,
    is_blank,
    load_rgb,
)
from imgclf.testing import images as f

OPTS = f.preprocess_options(size=16, mode="pad", background=(255, 255, 255))


def center(arr: np.ndarray) -> tuple[int, ...]:
    h, w, _ = arr.shape
    return tuple(int(v) for v in arr[h // 2, w // 2])


def close(a, b, tol=12) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


def test_exif_orientation_is_applied():
    img = load_rgb(f.exif_rotated_jpeg(), replace(OPTS, size=64))
    assert img.size == (20, 40)  # landscape stored, portrait shown
    arr = np.asarray(img)
    assert close(arr[5, 10], (255, 0, 0)) and close(arr[35, 10], (0, 0, 255))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (f.cmyk_jpeg(), (255, 0, 0)),
        (f.encode(Image.new("L", (20, 20), 100), "PNG"), (100, 100, 100)),
        (f.png_16bit(65535), (255, 255, 255)),
        (f.png_16bit(32896), (128, 128, 128)),  # scaled, not clipped to 255
        (f.palette_png_transparent(), (255, 255, 255)),  # transparent -> background
        (f.rgba_png(0), (255, 255, 255)),
        (f.rgba_png(255), (255, 0, 0)),
        (f.la_png(255), (0, 0, 0)),
        (f.la_png(0), (255, 255, 255)),
        (f.animated_gif(), (255, 0, 0)),  # first frame
        (f.webp(), (0, 0, 255)),
        (f.bmp(), (0, 255, 0)),
    ],
    ids=[
        "cmyk",
        "gray",
        "16bit-max",
        "16bit-mid",
        "palette-alpha",
        "rgba-clear",
        "rgba-opaque",
        "la-opaque",
        "la-clear",
        "animated",
        "webp",
        "bmp",
    ],
)
def test_modes_and_formats_become_rgb(data, expected):
    arr = decode_array(data, OPTS)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    assert close(center(arr), expected), center(arr)


def test_alpha_uses_configured_background():
    arr = decode_array(f.rgba_png(0), replace(OPTS, background=(10, 20, 30)))
    assert center(arr) == (10, 20, 30)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"caption: a cat on a mat\n", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "not an image|corrupt"),
        (f.truncated_jpeg(), "truncated or corrupt"),
        (f.bomb_png(), "too many pixels"),
        (f.CRASHING_GIF, "truncated or corrupt"),
    ],
    ids=["empty", "text", "corrupt-jpeg", "truncated", "bomb", "fuzzed-gif"],
)
def test_unusable_input_raises_with_reason(data, reason):
    with pytest.raises(InvalidImage, match=reason):
        load_rgb(data, OPTS)


def test_pixel_limit_is_a_parameter():
    data = f.png(1, (200, 100))
    assert load_rgb(data, replace(OPTS, max_pixels=20_000)).size == (200, 100)
    with pytest.raises(InvalidImage, match="too many pixels"):
        load_rgb(data, replace(OPTS, max_pixels=19_999))


def test_format_allow_list():
    with pytest.raises(InvalidImage, match="format BMP is not allowed"):
        load_rgb(f.bmp(), replace(OPTS, formats=("JPEG", "PNG")))


def test_large_jpeg_is_draft_decoded_but_never_below_target():
    data = f.encode(f.pattern(3, (1600, 1200)), "JPEG", quality=80)
    img = load_rgb(data, replace(OPTS, size=200))
    assert img.size == (400, 300)  # 1/4 scale in the DCT domain: >= 200 on both sides
    assert load_rgb(data, replace(OPTS, size=500)).size == (800, 600)  # 1/2: 1/4 is < 500


@pytest.mark.parametrize(("mode", "corner"), [("pad", (255, 255, 255)), ("crop", (0, 0, 0))])
def test_fit_square_pad_keeps_everything_crop_fills(mode, corner):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    out = np.asarray(fit_square(img, replace(OPTS, size=20, mode=mode)))
    assert out.shape == (20, 20, 3)
    assert tuple(int(v) for v in out[0, 0]) == corner


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "stretch"}, "mode must be 'pad' or 'crop', got 'stretch'"),
        ({"size": 2}, "size must be between 8 and 4096 pixels, got 2"),
        ({"background": (1, 2)}, r"background must be three values 0-255, got \(1, 2\)"),
        ({"max_pixels": 0}, "max_pixels must be positive"),
    ],
)
def test_bad_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        replace(OPTS, **change)


def test_options_survive_the_bundle_round_trip():
    options = replace(OPTS, mode="crop", background=(1, 2, 3), formats=("PNG",), jpeg_quality=7)
    assert DecodeOptions.from_dict(options.to_dict()) == options


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_box_reduction_of_large_images_matches_a_direct_resize(mode):
    from PIL import ImageFilter, ImageOps

    big = f.pattern(5, (64, 48)).resize((1600, 1200), Image.Resampling.BICUBIC)
    big = big.filter(ImageFilter.GaussianBlur(2))
    opts = replace(OPTS, size=100, mode=mode)
    ours = np.asarray(fit_square(big, opts), dtype=np.float64)
    if mode == "crop":
        direct = ImageOps.fit(big, (100, 100), method=Image.Resampling.BICUBIC)
    else:
        direct = ImageOps.pad(
            big, (100, 100), method=Image.Resampling.BICUBIC, color=opts.background
        )
    mse = np.mean((ours - np.asarray(direct, dtype=np.float64)) ** 2)
    assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 35  # PSNR in dB


@pytest.mark.parametrize(
    ("size", "content_size"), [((40, 30), (16, 12)), ((30, 60), (8, 16)), ((20, 20), (16, 16))]
)
def test_fit_square_content_is_the_picture_without_padding(size, content_size):
    from PIL import ImageOps

    img = f.pattern(2, size)
    fitted, content = fit_square_content(img, OPTS)
    assert content.size == content_size
    direct = ImageOps.pad(img, (16, 16), method=Image.Resampling.BICUBIC, color=OPTS.background)
    assert fitted.tobytes() == direct.tobytes()  # fit_square's pixels are unchanged
    assert fit_square(img, OPTS).tobytes() == direct.tobytes()


def test_fit_square_content_in_crop_mode_is_the_whole_fitted_image():
    fitted, content = fit_square_content(f.pattern(2, (40, 30)), replace(OPTS, mode="crop"))
    assert fitted.size == (16, 16) and content is fitted


def two_values(low: int, high: int, mode: str = "RGB") -> Image.Image:
    """Half the pixels ``low``, half ``high``: a standard deviation of (high - low) / 2."""
    img = Image.new(mode, (10, 10), (low,) * len(mode) if mode != "L" else low)
    img.paste((high,) * len(mode) if mode != "L" else high, (0, 0, 5, 10))
    return img


@pytest.mark.parametrize(
    ("img", "blank"),
    [
        (Image.new("RGB", (9, 7), (3, 200, 9)), True),
        (two_values(100, 103), True),  # std 1.5
        (two_values(100, 104), False),  # std 2.0: not below the limit
        (two_values(100, 103, "L"), True),
        (two_values(0, 255, "L"), False),
        (f.pattern(1), False),
        (Image.new("RGB", (0, 5)), True),
    ],
    ids=["solid", "std-1.5", "std-2.0", "gray-std-1.5", "gray-halves", "noise", "empty"],
)
def test_is_blank_is_a_standard_deviation_below_the_limit(img, blank):
    assert BLANK_MAX_STD == 2.0
    assert is_blank(img) is blank
