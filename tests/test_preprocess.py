"""The preprocess stage on awkward raw trees made in tmp_path."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from PIL import Image

import imagefactory as f
from stages.imaging import DecodeOptions
from stages.preprocess import RawFile, decide, flat_names, label_conflicts, preprocess

OPTS = DecodeOptions(size=16)


def run(tmp: Path, options: DecodeOptions = OPTS, workers: int = 1):
    return preprocess(
        raw=tmp / "data" / "raw",
        processed=tmp / "data" / "processed",
        invalid=tmp / "data" / "invalid",
        manifest=tmp / "data" / "manifest.csv",
        cache_dir=tmp / ".cache",
        options=options,
        quality=90,
        workers=workers,
        root=tmp,
    )


def manifest(tmp: Path) -> dict[str, dict[str, str]]:
    with (tmp / "data" / "manifest.csv").open(encoding="utf-8") as fh:
        return {row["raw_path"]: row for row in csv.DictReader(fh)}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """A raw tree with every kind of file the stage must handle."""
    raw = tmp_path / "data" / "raw"
    files = {
        "safe/animals/cat.jpg": f.jpeg(1),
        "safe/animals/CAT2.JPG": f.jpeg(2),
        "safe/animals/noext": f.png(3),
        "safe/animals/rotated.jpg": f.exif_rotated_jpeg(),
        "safe/animals/cmyk.jpg": f.cmyk_jpeg(),
        "safe/animals/deep16.png": f.png_16bit(40000),
        "safe/animals/palette.png": f.palette_png_transparent(),
        "safe/animals/alpha.png": f.rgba_png(128),
        "safe/animals/la.png": f.la_png(200),
        "safe/animals/anim.gif": f.animated_gif(),
        "safe/animals/pic.webp": f.webp(),
        "safe/animals/pic.bmp": f.bmp(),
        "safe/animals/nested/deeper/x.png": f.png(4),
        "safe/animals/cat.txt": b"a cat",
        "safe/animals/.DS_Store": b"\x00\x01",
        "safe/flowers/cat.jpg": f.jpeg(5),  # same name as animals/cat.jpg
        "safe/flowers/ñandú 日本.png": f.png(6),
        "safe/loose.png": f.png(7),  # directly in the class folder
        "safe/flowers/empty.jpg": b"",
        "safe/flowers/truncated.jpg": f.truncated_jpeg(),
        "safe/flowers/corrupt.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 10,
        "safe/flowers/notes.jpg": b"this is text with an image extension",
        "safe/flowers/bomb.png": f.bomb_png(),
        "safe/flowers/dup_in_class.jpg": f.jpeg(1),  # same content as cat.jpg, same class
        "safe/flowers/conflict.png": f.png(8),
        "sensitive/gore/conflict_copy.png": f.png(8),  # same content, other class
        "sensitive/gore/a.png": f.png(9),
        "stray.png": f.png(10),  # outside any class folder
    }
    for rel, data in files.items():
        f.write(raw / rel, data)
    return tmp_path


def test_every_raw_file_is_accounted_for_exactly_once(messy: Path):
    raw = messy / "data" / "raw"
    before = snapshot(raw)
    outcomes, _ = run(messy)
    assert snapshot(raw) == before, "data/raw must never be modified"
    rows = manifest(messy)
    assert sorted(rows) == sorted(f"data/raw/{rel}" for rel in before)
    outputs = [r["output_path"] for r in rows.values() if r["status"] != "skipped"]
    assert len(outputs) == len(set(outputs)), "two raw files share one output"
    on_disk = {
        p.relative_to(messy).as_posix()
        for d in ("processed", "invalid")
        for p in (messy / "data" / d).rglob("*")
        if p.is_file()
    }
    assert on_disk == set(outputs)
    assert len(outcomes) == len(before)


def test_outcomes_and_reasons(messy: Path):
    run(messy)
    rows = manifest(messy)

    def row(rel: str) -> dict[str, str]:
        return rows[f"data/raw/{rel}"]

    processed = [r for r in rows.values() if r["status"] == "processed"]
    for r in processed:
        with Image.open(messy / r["output_path"]) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (16, 16))
    for rel in [
        "safe/animals/CAT2.JPG",
        "safe/animals/noext",
        "safe/animals/anim.gif",
        "safe/animals/pic.webp",
        "safe/animals/pic.bmp",
        "safe/flowers/ñandú 日本.png",
        "safe/flowers/dup_in_class.jpg",
        "sensitive/gore/a.png",
    ]:
        assert row(rel)["status"] == "processed", rel
    assert row("safe/animals/nested/deeper/x.png")["subclass"] == "animals"
    assert row("safe/animals/nested/deeper/x.png")["output_path"].endswith(
        "safe/animals__nested__deeper__x.jpg"
    )
    assert row("safe/loose.png")["subclass"] == ""
    assert row("safe/loose.png")["output_path"] == "data/processed/safe/loose.jpg"
    assert row("safe/animals/cat.txt")["status"] == "skipped"
    assert row("safe/animals/.DS_Store")["reason"] == "hidden file"
    expected = {
        "safe/flowers/empty.jpg": "empty file",
        "safe/flowers/truncated.jpg": "truncated or corrupt",
        "safe/flowers/corrupt.png": "corrupt",
        "safe/flowers/notes.jpg": "not an image",
        "safe/flowers/bomb.png": "too many pixels",
        "safe/flowers/conflict.png": "label conflict",
        "sensitive/gore/conflict_copy.png": "label conflict",
        "stray.png": "not inside a class folder",
    }
    for rel, reason in expected.items():
        assert row(rel)["status"] == "invalid", rel
        assert reason in row(rel)["reason"], (rel, row(rel)["reason"])
        copy = messy / row(rel)["output_path"]
        assert copy.read_bytes() == (messy / "data" / "raw" / rel).read_bytes()
    assert row("stray.png")["output_path"] == "data/invalid/_unlabelled/stray.png"
    assert row("safe/flowers/bomb.png")["output_path"] == "data/invalid/safe/flowers__bomb.png"


def test_flat_names_never_collide():
    files = [
        RawFile("safe/a__b/x.png", "safe", "a__b"),
        RawFile("safe/a/b__x.png", "safe", "a"),
        RawFile("safe/a/y.png", "safe", "a"),
        RawFile("safe/a/y.jpg", "safe", "a"),
        RawFile("safe/a/Z.png", "safe", "a"),
        RawFile("safe/a/z.png", "safe", "a"),  # differ only by case
        RawFile("other/a/y.png", "other", "a"),  # other class folder: no clash
    ]
    names = flat_names(files, ".jpg")
    per_class = [(f.label, names[f.rel].casefold()) for f in files]
    assert len(set(per_class)) == len(files)
    assert names["other/a/y.png"] == "a__y.jpg"
    assert names["safe/a__b/x.png"].startswith("a__b__x-")


def test_label_conflict_is_only_across_classes():
    files = [
        RawFile("a/s/1.png", "a", "s"),
        RawFile("a/s/2.png", "a", "s"),
        RawFile("b/s/3.png", "b", "s"),
    ]
    assert label_conflicts({"a/s/1.png": "h", "a/s/2.png": "h", "b/s/3.png": "x"}, files) == {}
    conflicts = label_conflicts({"a/s/1.png": "h", "a/s/2.png": "h", "b/s/3.png": "h"}, files)
    assert set(conflicts) == {"a/s/1.png", "a/s/2.png", "b/s/3.png"}
    assert "b/s/3.png" in conflicts["a/s/1.png"]


def test_decide_keeps_decode_error_over_conflict():
    files = [RawFile("a/s/1.png", "a", "s"), RawFile("b/s/1.png", "b", "s")]
    out = decide(files, {"a/s/1.png": "h", "b/s/1.png": "h"}, {"a/s/1.png": "empty file"})
    assert [(o.status, o.reason) for o in out] == [("invalid", "empty file"), ("processed", "")]


def test_rerun_decodes_nothing_unchanged_and_only_what_changed(tmp_path: Path):
    raw = tmp_path / "data" / "raw"
    for i in range(40):
        f.write(raw / ("a" if i % 2 else "b") / "s" / f"{i}.png", f.png(i))
    _, first = run(tmp_path, workers=2)
    assert (first.decoded, first.cached) == (40, 0)
    before = snapshot(tmp_path / "data" / "processed")
    _, again = run(tmp_path, workers=2)
    assert (again.decoded, again.cached, again.written) == (0, 40, 0)
    assert {k: v[0] for k, v in snapshot(tmp_path / "data" / "processed").items()} == {
        k: v[0] for k, v in before.items()
    }
    f.write(raw / "a" / "s" / "1.png", f.png(1000))  # one changed file
    f.write(raw / "b" / "s" / "new.png", f.png(1001))  # one new file
    _, third = run(tmp_path, workers=2)
    assert (third.decoded, third.cached, third.written) == (2, 39, 2)


def test_outputs_are_synced_not_rebuilt(tmp_path: Path):
    raw = tmp_path / "data" / "raw"
    for i in range(4):
        f.write(raw / "a" / "s" / f"{i}.png", f.png(i))
    f.write(raw / "a" / "s" / "bad.jpg", b"")
    run(tmp_path)
    processed = tmp_path / "data" / "processed" / "a"
    kept = (processed / "s__1.jpg").stat().st_mtime_ns
    (raw / "a" / "s" / "0.png").unlink()  # removed raw file: its output goes
    (processed / "s__2.jpg").write_bytes(b"edited by hand")  # restored from the cache
    (processed / "s__3.jpg").unlink()  # restored
    (processed / "stray.jpg").write_bytes(b"x")  # not wanted: removed
    (raw / "a" / "s" / "bad.jpg").write_bytes(f.png(9))  # now valid: leaves invalid/
    _, stats = run(tmp_path)
    assert stats.written == 3
    assert sorted(p.name for p in processed.iterdir()) == [
        "s__1.jpg",
        "s__2.jpg",
        "s__3.jpg",
        "s__bad.jpg",
    ]
    assert (processed / "s__1.jpg").stat().st_mtime_ns == kept
    with Image.open(processed / "s__2.jpg") as img:
        assert img.size == (16, 16)
    assert list((tmp_path / "data" / "invalid").rglob("*")) == []


def test_moved_subclass_is_relabelled_without_decoding(tmp_path: Path):
    raw = tmp_path / "data" / "raw"
    for i in range(6):
        f.write(raw / "safe" / "animals" / f"{i}.png", f.png(i))
        f.write(raw / "sensitive" / "gore" / f"{i}.png", f.png(100 + i))
    run(tmp_path)
    os.rename(raw / "sensitive" / "gore", raw / "safe" / "gore")
    outcomes, stats = run(tmp_path)
    assert stats.decoded == 0
    assert {o.raw.label for o in outcomes if o.raw.subclass == "gore"} == {"safe"}
    assert len(list((tmp_path / "data" / "processed" / "safe").glob("gore__*.jpg"))) == 6
    assert not (tmp_path / "data" / "processed" / "sensitive").exists()


def test_changed_settings_reprocess(tmp_path: Path):
    f.write(tmp_path / "data" / "raw" / "a" / "s" / "x.png", f.png(1))
    run(tmp_path)
    _, stats = run(tmp_path, options=DecodeOptions(size=24))
    assert stats.decoded == 1
    with Image.open(tmp_path / "data" / "processed" / "a" / "s__x.jpg") as img:
        assert img.size == (24, 24)


def test_parallel_and_serial_give_identical_bytes(tmp_path: Path):
    for root in ("par", "seq"):
        for i in range(40):
            f.write(tmp_path / root / "data" / "raw" / "a" / "s" / f"{i}.jpg", f.jpeg(i, (90, 60)))
    run(tmp_path / "par", workers=2)
    run(tmp_path / "seq", workers=1)
    par, seq = (snapshot(tmp_path / root / "data" / "processed") for root in ("par", "seq"))
    assert len(par) == 40
    assert {k: v[0] for k, v in par.items()} == {k: v[0] for k, v in seq.items()}


def test_missing_raw_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="raw data folder not found"):
        run(tmp_path)


def test_outputs_inside_raw_are_refused(tmp_path: Path):
    raw = tmp_path / "data" / "raw"
    f.write(raw / "a" / "s" / "x.png", f.png(1))
    with pytest.raises(ValueError, match="overlaps the raw data folder"):
        preprocess(
            raw,
            raw / "processed",
            tmp_path / "inv",
            tmp_path / "m.csv",
            tmp_path / ".c",
            OPTS,
            90,
            1,
            tmp_path,
        )
    assert sorted(p.name for p in raw.rglob("*")) == ["a", "s", "x.png"]
