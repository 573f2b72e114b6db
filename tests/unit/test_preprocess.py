"""The preprocess stage on awkward raw trees made in tmp_path."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from imgclf.capture import CapturedOutput, short_messages
from imgclf.imaging import DecodeOptions
from imgclf.pipeline.preprocess import (
    MANIFEST_FIELDS,
    Outcome,
    RawFile,
    decide_outcomes,
    label_conflicts,
    output_names,
    preprocess,
    problem_summary,
    reason_kind,
)
from imgclf.pipeline.preprocess_outputs import remove_stale_temp_files, temp_owner
from imgclf.testing import images as f
from imgclf.testing.project import preprocess_tree

OPTS = f.preprocess_options(size=16, jpeg_quality=90)


def run(
    tmp: Path,
    options: DecodeOptions = OPTS,
    workers: int = 1,
    decode_timeout: float | None = None,
):
    return preprocess_tree(tmp, options, workers, decode_timeout)


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
    assert row("safe/animals/nested/deeper/x.png")["output_path"] == (
        "data/processed/safe/animals__nested__deeper__x.jpg"
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


def test_output_names_never_collide():
    files = [
        RawFile("safe/a__b/x.png", "safe", "a__b"),
        RawFile("safe/a/b__x.png", "safe", "a"),
        RawFile("safe/a/y.png", "safe", "a"),
        RawFile("safe/a/y.jpg", "safe", "a"),
        RawFile("safe/a/Z.png", "safe", "a"),
        RawFile("safe/a/z.png", "safe", "a"),  # differ only by case
        RawFile("other/a/y.png", "other", "a"),  # other class folder: no clash
    ]
    names = output_names(files, ".jpg")
    per_class = [(f.label, names[f.rel].casefold()) for f in files]
    assert len(set(per_class)) == len(files)
    assert names["other/a/y.png"] == "a__y.jpg"
    tag = hashlib.sha1(b"safe/a__b/x.png").hexdigest()[:8]  # a hash of the raw path
    assert names["safe/a__b/x.png"] == f"a__b__x-{tag}.jpg"


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


def test_decide_outcomes_keeps_decode_error_over_conflict():
    files = [RawFile("a/s/1.png", "a", "s"), RawFile("b/s/1.png", "b", "s")]
    out = decide_outcomes(files, {"a/s/1.png": "h", "b/s/1.png": "h"}, {"a/s/1.png": "empty file"})
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
    _, stats = run(tmp_path, options=replace(OPTS, size=24))
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


def test_each_empty_class_folder_gets_one_warning_line(tmp_path: Path, caplog):
    raw = tmp_path / "data" / "raw"
    f.write(raw / "safe" / "a.png", f.png(1))
    f.write(raw / "sensitive" / "s" / "b.png", f.png(2))
    (raw / "cats").mkdir()
    f.write(raw / "dogs" / ".DS_Store", b"\x00")
    f.write(raw / "dogs" / "sub" / "caption.txt", b"a caption")
    with caplog.at_level(logging.INFO, logger="imgclf.pipeline.preprocess"):
        outcomes, _ = run(tmp_path)
    warnings_ = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings_ == [
        "data/raw/cats/ holds no image: not a class (add images or remove the folder)",
        "data/raw/dogs/ holds no image: not a class (add images or remove the folder)",
    ]
    assert sorted((o.raw.rel, o.status) for o in outcomes) == [
        ("dogs/.DS_Store", "skipped"),
        ("dogs/sub/caption.txt", "skipped"),
        ("safe/a.png", "processed"),
        ("sensitive/s/b.png", "processed"),
    ]


def test_a_tree_without_empty_class_folders_gets_no_warning(tmp_path: Path, caplog):
    f.write(tmp_path / "data" / "raw" / "safe" / "a.png", f.png(1))
    f.write(tmp_path / "data" / "raw" / "sensitive" / "b.png", f.png(2))
    with caplog.at_level(logging.WARNING, logger="imgclf.pipeline.preprocess"):
        run(tmp_path)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


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
            1,
            tmp_path,
        )
    assert sorted(p.name for p in raw.rglob("*")) == ["a", "s", "x.png"]


# --- the invalid-file summary ----------------------------------------------------------


def outcome(rel: str, status: str, reason: str = "", flags: str = "") -> Outcome:
    label = rel.split("/")[0] if "/" in rel else None
    return Outcome(RawFile(rel, label, ""), "", status, "", reason, flags)


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("empty file", "empty file"),
        (
            "truncated or corrupt image: OSError: image file is truncated",
            "truncated or corrupt image",
        ),
        ("not an image (unrecognised format)", "not an image"),
        ("too many pixels (9x9 = 81 > 80): possible decompression bomb", "too many pixels"),
        ("format BMP is not allowed", "format BMP is not allowed"),
        (
            "label conflict: identical image under classes a, b (also at a/s/1.png)",
            "label conflict",
        ),
        ("not inside a class folder", "not inside a class folder"),
        ("timeout: decode took longer than 30 s", "timeout"),
        ("unreadable file: Permission denied", "unreadable file"),
        (
            "truncated or corrupt image: OSError: decoder error -2 (decoder said: ZIPDecode: x)",
            "truncated or corrupt image",
        ),
    ],
)
def test_reason_kind_groups_reasons_by_their_prefix(reason: str, kind: str):
    assert reason_kind(reason) == kind


def test_problem_summary_counts_kinds_and_shows_the_first_three():
    outcomes = [
        outcome(
            "a/s/1.jpg", "invalid", "truncated or corrupt image: OSError: image file is truncated"
        ),
        outcome("a/s/2.png", "processed"),
        outcome("a/s/3.png", "invalid", "not an image (unrecognised format)"),
        outcome("a/s/4.jpg", "invalid", "truncated or corrupt image: SyntaxError: broken PNG file"),
        outcome("a/s/5.png", "processed", flags="blank"),
        outcome("b/s/6.png", "invalid", "label conflict: identical image under classes a, b"),
        outcome("stray.png", "invalid", "not inside a class folder"),
        outcome("a/s/8.tif", "invalid", "timeout: decode took longer than 30 s"),
        outcome("a/s/9.bmp", "invalid", "format BMP is not allowed"),
        outcome("a/s/cap.txt", "skipped", "sidecar file (.txt), not an image"),
        outcome("a/s/10.png", "processed", flags="blank"),
    ]
    assert problem_summary(outcomes, "data/manifest.csv", "data/raw/") == (
        "7 of 11 file(s) invalid (every reason in data/manifest.csv):\n"
        "       2  truncated or corrupt image\n"
        "       1  format BMP is not allowed\n"
        "       1  label conflict\n"
        "       1  not an image\n"
        "       1  not inside a class folder\n"
        "       1  timeout\n"
        "  first 3:\n"
        "    data/raw/a/s/1.jpg: truncated or corrupt image: OSError: image file is truncated\n"
        "    data/raw/a/s/3.png: not an image (unrecognised format)\n"
        "    data/raw/a/s/4.jpg: truncated or corrupt image: SyntaxError: broken PNG file\n"
        "2 processed image(s) near-uniform, flagged 'blank' in data/manifest.csv"
    )


def test_problem_summary_is_empty_when_nothing_needs_a_look_and_cuts_long_reasons():
    assert problem_summary([outcome("a/s/1.png", "processed")], "m.csv") == ""
    long = "corrupt image header: " + "x" * 300
    assert problem_summary([outcome("a/s/1.png", "invalid", long)], "m.csv") == (
        "1 of 1 file(s) invalid (every reason in m.csv):\n"
        "       1  corrupt image header\n"
        "  first 1:\n"
        f"    a/s/1.png: {long[:197]}..."
    )


def test_messy_tree_summary_is_one_block(messy: Path):
    outcomes, _ = run(messy)
    assert problem_summary(outcomes, "data/manifest.csv", "data/raw/") == (
        "8 of 28 file(s) invalid (every reason in data/manifest.csv):\n"
        "       2  label conflict\n"
        "       1  corrupt image header\n"
        "       1  empty file\n"
        "       1  not an image\n"
        "       1  not inside a class folder\n"
        "       1  too many pixels\n"
        "       1  truncated or corrupt image\n"
        "  first 3:\n"
        "    data/raw/stray.png: not inside a class folder\n"
        "    data/raw/safe/flowers/bomb.png: too many pixels (100000x100000 = "
        "10,000,000,000 > 89,478,485): possible decompression bomb\n"
        "    data/raw/safe/flowers/conflict.png: label conflict: identical image under classes "
        "safe, sensitive (also at sensitive/gore/conflict_copy.png)\n"
        "8 processed image(s) near-uniform, flagged 'blank' in data/manifest.csv"
    )
    # the solid-colour fixtures are the blank ones; patterns and the two-colour EXIF one not
    blank = sorted(o.raw.rel.rsplit("/", 1)[1] for o in outcomes if o.flags == "blank")
    assert blank == [
        "alpha.png",
        "anim.gif",
        "cmyk.jpg",
        "deep16.png",
        "la.png",
        "palette.png",
        "pic.bmp",
        "pic.webp",
    ]


# --- third-party decoder messages ------------------------------------------------------


def damaged_tiff(compression: str) -> bytes:
    """A TIFF decoded by libtiff whose strip data (right after the 8-byte header) is damaged:
    ``tiff_adobe_deflate`` becomes undecodable, ``group4`` still decodes with warnings."""
    img = f.pattern(1, (64, 64))
    if compression == "group4":
        img = img.convert("1")
    data = bytearray(f.encode(img, "TIFF", compression=compression))
    for i in range(8, 48):
        data[i] ^= 0x5A
    return bytes(data)


def test_libtiff_really_writes_to_fd_2(capfd):
    """Guard: the fixtures below must make libtiff print below Python, or the capture tests
    would pass without capturing anything."""
    for compression in ("tiff_adobe_deflate", "group4"):
        with (
            Image.open(io.BytesIO(damaged_tiff(compression))) as img,
            contextlib.suppress(OSError),  # the deflate one does not decode
        ):
            img.load()
    err = capfd.readouterr().err
    assert "ZIPDecode: Decoding error at scanline 0" in err
    assert "Fax4Decode: Bad code word" in err


def test_decoder_output_captures_fd_2_and_warnings_even_on_error(capfd):
    said = CapturedOutput()
    with pytest.raises(RuntimeError, match="stop"), said:
        os.write(2, b"libfoo: bad thing\n  second   line\n")
        warnings.warn("careful", UserWarning, stacklevel=1)
        raise RuntimeError("stop")
    assert said.text == "libfoo: bad thing; second line; UserWarning: careful"
    assert capfd.readouterr().err == ""
    os.write(2, b"after\n")  # fd 2 is back
    assert capfd.readouterr().err == "after\n"


def test_short_messages_keeps_three_distinct_lines():
    text = "a\n\na\nb\nc\nd\ne\n"
    assert short_messages(text) == "a; b; c (+2 more)"
    assert short_messages("x" * 400) == "x" * 297 + "..."
    assert short_messages("") == ""


@pytest.mark.parametrize(
    ("workers", "decode_timeout"), [(1, None), (2, 30.0)], ids=["inline", "pool"]
)
def test_decoder_messages_go_to_the_reason_or_the_debug_log_not_stderr(
    tmp_path: Path, capfd, caplog, workers: int, decode_timeout: float | None
):
    raw = tmp_path / "data" / "raw"
    f.write(raw / "a" / "s" / "deflate.tif", damaged_tiff("tiff_adobe_deflate"))
    f.write(raw / "a" / "s" / "fax.tif", damaged_tiff("group4"))
    f.write(raw / "a" / "s" / "fine.png", f.png(1))
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="imgclf.pipeline.preprocess_workers"):
        run(tmp_path, workers=workers, decode_timeout=decode_timeout)
    assert capfd.readouterr().err == ""
    rows = manifest(tmp_path)
    bad = rows["data/raw/a/s/deflate.tif"]
    assert bad["status"] == "invalid"
    assert bad["reason"].startswith(
        "truncated or corrupt image: OSError: decoder error -2 "
        "(decoder said: ZIPDecode: Decoding error at scanline 0, incorrect header check"
    ), bad["reason"]
    assert reason_kind(bad["reason"]) == "truncated or corrupt image"
    assert (rows["data/raw/a/s/fax.tif"]["status"], rows["data/raw/a/s/fax.tif"]["reason"]) == (
        "processed",
        "",
    )
    assert rows["data/raw/a/s/fine.png"]["status"] == "processed"
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert [m for m in debug if "Fax4Decode" in m and "a/s/fax.tif" in m], debug
    # a cached rerun gives the same reason (the decoder's words are part of the cached .err)
    capfd.readouterr()
    _, stats = run(tmp_path, workers=workers, decode_timeout=decode_timeout)
    assert stats.decoded == 0
    assert manifest(tmp_path)["data/raw/a/s/deflate.tif"]["reason"] == bad["reason"]
    assert capfd.readouterr().err == ""


# --- temporary files of a killed run ----------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()  # exited and reaped: its pid names no process
    return proc.pid


@pytest.mark.parametrize(
    ("name", "pid"),
    [
        ("ab12.jpg.4242.tmp", 4242),
        (".s__x.jpg.99.tmp", 99),  # imgclf.files.replacing's name
        ("ab12.blank.jpg.7.tmp", 7),
        ("s__x.jpg.123.tmp", 123),
        ("notes.tmp", None),
        ("x.jpg.tmp", None),
        ("x.0.tmp", None),
        ("x.12.tmpl", None),
        ("x.12", None),
        ("x.١٢.tmp", None),  # non-ASCII digits are no pid
    ],
)
def test_temp_owner_reads_the_pid_from_the_name(name: str, pid: int | None):
    assert temp_owner(name) == pid


def test_remove_stale_temp_files_spares_live_writers(tmp_path: Path):
    dead, live = dead_pid(), os.getpid()
    files = [f"a/x.jpg.{dead}.tmp", f"a/b/y.err.{dead}.tmp", f"a/x.jpg.{live}.tmp", "a/plain.tmp"]
    for rel in files:
        f.write(tmp_path / rel, b"partial")
    f.write(tmp_path / "a" / "keep.jpg", b"done")
    assert remove_stale_temp_files([tmp_path / "a", tmp_path / "missing"]) == 2
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(["a/keep.jpg", f"a/x.jpg.{live}.tmp", "a/plain.tmp"])


def test_run_removes_temp_files_of_dead_processes_only(tmp_path: Path):
    raw = tmp_path / "data" / "raw"
    for i in range(3):
        f.write(raw / "a" / "s" / f"{i}.png", f.png(i))
    run(tmp_path)
    (settings,) = [d for d in (tmp_path / ".cache" / "preprocess").iterdir() if d.is_dir()]
    dead, live = dead_pid(), os.getpid()
    sha = "ab" + "0" * 62
    stale_cache = f.write(settings / "ab" / f".{sha}.jpg.{dead}.tmp", b"half a jpeg")
    live_cache = f.write(settings / "ab" / f".{sha}.err.{live}.tmp", b"being written")
    stale_out = f.write(tmp_path / "data" / "processed" / "a" / f".s__0.jpg.{dead}.tmp", b"x")
    stale_inv = f.write(tmp_path / "data" / "invalid" / "a" / f".gone.png.{dead}.tmp", b"x")
    outcomes, stats = run(tmp_path)
    assert not stale_cache.exists() and not stale_out.exists() and not stale_inv.exists()
    assert live_cache.read_bytes() == b"being written"
    assert stats.decoded == 0 and [o.status for o in outcomes] == ["processed"] * 3
    assert sorted(p.name for p in (tmp_path / "data" / "processed" / "a").iterdir()) == [
        "s__0.jpg",
        "s__1.jpg",
        "s__2.jpg",
    ]


# --- the per-file decode time limit ------------------------------------------------------

PPM_OPTS = replace(OPTS, formats=(*OPTS.formats, "PPM"))


def slow_ppm(comments: int = 200_000) -> bytes:
    """A tiny plain-PGM image behind ``comments`` comment lines (800 KB): Pillow's plain PPM
    decoder removes each comment by copying the rest of its 1 MB block, so decoding this
    takes seconds (about 6 s on a 2-core CI machine) while a PNG of the tree takes ms."""
    return b"P2\n8 8\n255\n" + b"7 #\n" * comments + b"7 " * 64


# two worker processes (one killed at the deadline while the other goes on): integration tier
@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.integration)])
def test_a_decode_past_the_limit_is_quarantined_and_the_rest_goes_on(tmp_path: Path, workers):
    raw = tmp_path / "data" / "raw"
    slow = f.write(raw / "a" / "s" / "slow.pgm", slow_ppm())
    for i in range(4):
        f.write(raw / "a" / "s" / f"{i}.png", f.png(i))
    _, stats = run(tmp_path, PPM_OPTS, workers=workers, decode_timeout=1.0)
    rows = manifest(tmp_path)
    row = rows["data/raw/a/s/slow.pgm"]
    assert (row["status"], row["reason"]) == ("invalid", "timeout: decode took longer than 1 s")
    assert row["sha256"] == hashlib.sha256(slow.read_bytes()).hexdigest()
    assert (tmp_path / row["output_path"]).read_bytes() == slow.read_bytes()
    assert [rows[f"data/raw/a/s/{i}.png"]["status"] for i in range(4)] == ["processed"] * 4
    assert stats.decoded == 5
    cached = {p.name for p in (tmp_path / ".cache" / "preprocess").rglob("*") if p.is_file()}
    assert not [n for n in cached if n.startswith(row["sha256"])], "a timeout must not be cached"
    # a rerun tries the slow file again (a larger limit could let it through), not the rest
    _, again = run(tmp_path, PPM_OPTS, workers=workers, decode_timeout=1.0)
    assert (again.decoded, again.cached) == (1, 4)
    assert manifest(tmp_path)["data/raw/a/s/slow.pgm"]["reason"] == row["reason"]


def test_decode_timeout_must_be_positive(tmp_path: Path):
    f.write(tmp_path / "data" / "raw" / "a" / "s" / "x.png", f.png(1))
    with pytest.raises(ValueError, match="decode_timeout must be positive"):
        run(tmp_path, decode_timeout=0)


def test_pool_with_a_limit_gives_the_same_bytes_as_inline(tmp_path: Path):
    for root in ("pool", "inline"):
        for i in range(5):
            f.write(tmp_path / root / "data" / "raw" / "a" / "s" / f"{i}.jpg", f.jpeg(i, (90, 60)))
    run(tmp_path / "pool", workers=2, decode_timeout=30)
    run(tmp_path / "inline", workers=1)
    pool, inline = (snapshot(tmp_path / root / "data" / "processed") for root in ("pool", "inline"))
    assert len(pool) == 5
    assert {k: v[0] for k, v in pool.items()} == {k: v[0] for k, v in inline.items()}


# --- blank images --------------------------------------------------------------------------


def test_blank_images_are_kept_and_flagged(tmp_path: Path):
    raw = tmp_path / "data" / "raw"
    halves = f.solid((0, 0, 0), (20, 20))
    halves.paste((255, 255, 255), (10, 0, 20, 20))  # two flat halves: not blank
    files = {
        "a/s/red.png": f.encode(f.solid((255, 0, 0), (40, 30)), "PNG"),  # padded with white
        "a/s/black.jpg": f.encode(f.solid((0, 0, 0), (30, 60)), "JPEG", quality=90),
        "a/s/white.png": f.encode(f.solid((255, 255, 255), (20, 20)), "PNG"),
        "a/s/noise.png": f.png(1),
        "a/s/half.png": f.encode(halves, "PNG"),
        "a/s/bad.png": b"",
    }
    for rel, data in files.items():
        f.write(raw / rel, data)
    outcomes, _ = run(tmp_path)
    expected = {
        "data/raw/a/s/red.png": ("processed", "blank"),
        "data/raw/a/s/black.jpg": ("processed", "blank"),
        "data/raw/a/s/white.png": ("processed", "blank"),
        "data/raw/a/s/noise.png": ("processed", ""),
        "data/raw/a/s/half.png": ("processed", ""),
        "data/raw/a/s/bad.png": ("invalid", ""),
    }
    rows = manifest(tmp_path)
    assert {k: (r["status"], r["flags"]) for k, r in rows.items()} == expected
    with (tmp_path / "data" / "manifest.csv").open(encoding="utf-8") as fh:
        assert tuple(next(csv.reader(fh))) == MANIFEST_FIELDS
    for rel in ("red", "black", "white"):
        with Image.open(tmp_path / "data" / "processed" / "a" / f"s__{rel}.jpg") as out:
            assert out.size == (16, 16)
    assert problem_summary(outcomes, "m.csv").splitlines()[-1] == (
        "3 processed image(s) near-uniform, flagged 'blank' in m.csv"
    )
    # the flag comes back from the cache: nothing decoded, same manifest
    _, stats = run(tmp_path)
    assert stats.decoded == 0
    assert {k: (r["status"], r["flags"]) for k, r in manifest(tmp_path).items()} == expected
    # and with the file-hash record stale (other mtime): found by content in the cache
    os.utime(raw / "a" / "s" / "red.png", ns=(1, 1))
    _, stats = run(tmp_path)
    assert (stats.decoded, manifest(tmp_path)["data/raw/a/s/red.png"]["flags"]) == (0, "blank")
