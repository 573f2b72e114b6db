"""Train/serve parity: for a raw file, the server feeds the model exactly the pixels that
training read for it (max abs difference 0)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgclf.imaging import decode_array
from imgclf.pipeline.dataset import make_dataset
from imgclf.pipeline.preprocess import preprocess
from imgclf.serving.predictor import Predictor
from imgclf.testing import images as f
from imgclf.testing.bundles import make_bundle


def large_jpeg() -> bytes:
    """A 3000x2000 photo-like JPEG (decoded with DCT scaling, then box-reduced)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((3000, 2000), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


RAW = {
    "large.jpg": large_jpeg,
    "alpha.png": lambda: f.rgba_png(100),
    "cmyk.jpg": f.cmyk_jpeg,
    "palette.png": f.palette_png_transparent,
    "exif.jpg": f.exif_rotated_jpeg,
}


@pytest.fixture(scope="module")
def trained_and_served(tmp_path_factory):
    """Training's input and the server's input for every raw file, at two settings."""
    tmp = tmp_path_factory.mktemp("parity")
    raw = tmp / "raw"
    for name, make in RAW.items():
        f.write(raw / "a" / name, make())
    out = {}
    for options in (
        f.preprocess_options(size=48, mode="pad", jpeg_quality=95),
        f.preprocess_options(size=32, mode="crop", jpeg_quality=70),
    ):
        root = tmp / f"{options.size}"
        outcomes, _ = preprocess(
            raw, root / "processed", root / "invalid", root / "manifest.csv", tmp / "cache",
            options, workers=1, root=root,
        )  # fmt: skip
        done = {o.raw.rel: root / "processed" / o.output for o in outcomes}
        assert all(o.status == "processed" for o in outcomes), outcomes
        paths = [str(done[f"a/{name}"]) for name in RAW]
        ds = make_dataset(paths, np.zeros(len(paths), np.int32), options.size, len(paths))
        trained = next(iter(ds))[0].numpy()
        predictor = Predictor.load(
            make_bundle(root / "bundle.zip", size=options.size, decode=options.to_dict())
        )
        served = np.stack([predictor.decode_image(raw / "a" / name) for name in RAW])
        out[options] = (trained, served)
    return out


def test_served_input_equals_training_input(trained_and_served):
    for options, (trained, served) in trained_and_served.items():
        assert served.dtype == np.uint8 and served.shape == trained.shape
        assert np.abs(trained - served.astype(np.float32)).max() == 0.0, options


def test_the_jpeg_round_trip_is_what_makes_them_equal(trained_and_served):
    """Without the round trip (Pillow's fitted pixels straight to the model, as before),
    the inputs differ: the test above can fail."""
    options = next(iter(trained_and_served))
    trained, _ = trained_and_served[options]
    raw_pixels = decode_array(large_jpeg(), options).astype(np.float32)
    assert np.abs(trained[0] - raw_pixels).max() > 0  # RAW's first entry: the large JPEG
