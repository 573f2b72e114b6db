"""Fashion-MNIST from Debian's package (imgclf/testing/realdata.py): the IDX parser on
files written here, and the shapes' raw folders on the installed set (CI installs
``dataset-fashion-mnist``; without it those tests fail, naming the package)."""

from __future__ import annotations

import gzip
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.testing import realdata
from imgclf.testing.realdata import MissingDataError, load_fashion, read_idx, write_shape


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of a uint8 array: 0, 0, type 0x08, ndim, big-endian dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_read_idx_parses_images_and_labels_gzipped_or_not(tmp_path: Path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], dtype=np.uint8)
    (tmp_path / "x-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (tmp_path / "x-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    got = read_idx(tmp_path / "x-images-idx3-ubyte.gz")
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, images)
    assert len(idx_bytes(images)) - images.size == 16  # the 16-byte header of idx3
    np.testing.assert_array_equal(read_idx(tmp_path / "x-labels-idx1-ubyte"), labels)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x05", "bad magic"),
        (b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x05\x00\x00\x00", "element type 0x0d"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x01\x02", "holds 2"),
    ],
    ids=["magic", "type", "header", "short"],
)
def test_read_idx_refuses_what_is_not_a_whole_uint8_idx_file(tmp_path: Path, data, says):
    path = tmp_path / "bad-idx"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=says):
        read_idx(path)


def test_missing_files_are_one_line_naming_the_debian_package(tmp_path: Path):
    with pytest.raises(MissingDataError) as info:
        load_fashion("train", tmp_path)
    message = str(info.value)
    assert "\n" not in message and "dataset-fashion-mnist" in message
    assert "train-images-idx3-ubyte.gz" in message


@pytest.fixture(scope="module")
def fashion() -> tuple[np.ndarray, np.ndarray]:
    return load_fashion()  # no skip: a missing package is a failure naming it


def test_the_installed_set_has_60000_train_images_6000_a_class(fashion):
    images, labels = fashion
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6000] * 10


def test_imbalanced_writes_exact_counts_per_class_and_subclass(fashion, tmp_path: Path):
    raw = tmp_path / "raw"
    written = write_shape(raw, "imbalanced", seed=3)
    assert written.counts == {"safe": 2000, "sensitive": 100}
    assert written.positive_class == "sensitive" and not written.flipped
    files = sorted(p.relative_to(raw) for p in raw.rglob("*.png"))
    assert len(files) == 2100
    per_subclass = Counter(p.parent.as_posix() for p in files)
    assert per_subclass["sensitive/shirt"] == 100
    safe = {k: n for k, n in per_subclass.items() if k.startswith("safe/")}
    assert len(safe) == 9 and set(safe.values()) == {222, 223} and "safe/shirt" not in safe
    images, labels = fashion
    for path in files[:: len(files) // 20]:  # each PNG is its Fashion-MNIST image
        index = int(path.stem.removeprefix("fm_"))
        source = realdata.FASHION_CLASSES[labels[index]]
        assert path.parent.name == source
        np.testing.assert_array_equal(np.asarray(Image.open(raw / path)), images[index])


def test_noisy_flips_five_percent_and_records_them_seeded(fashion, tmp_path: Path):
    written = write_shape(tmp_path / "a", "noisy", seed=5, scale=0.2)  # 60 a class
    assert written.total == 600 and len(written.classes) == 10
    assert len(written.flipped) == 30 and written.positive_class == "shirt"
    _, labels = fashion
    for rel, (true, given) in written.flipped.items():
        index = int(Path(rel).stem.removeprefix("fm_"))
        assert rel.startswith(f"{given}/") and true != given
        assert realdata.FASHION_CLASSES[labels[index]] == true
    again = write_shape(tmp_path / "b", "noisy", seed=5, scale=0.2)
    assert again.flipped == written.flipped and again.counts == written.counts
    with pytest.raises(FileExistsError):
        write_shape(tmp_path / "a", "noisy", seed=5, scale=0.2)
