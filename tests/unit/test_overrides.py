"""The decisions file ``data/labels_override.csv`` (imgclf.pipeline.overrides): what it
refuses, in one line each, and what ``preprocess`` and ``split`` make of what it accepts."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import pytest

from imgclf.config import StageError
from imgclf.pipeline.overrides import (
    Override,
    OverrideError,
    check_paths,
    parse_overrides,
    read_overrides,
)
from imgclf.pipeline.split import assign, read_manifest
from imgclf.testing import images as f
from imgclf.testing.project import preprocess_tree

OPTS = f.preprocess_options(size=16, jpeg_quality=90)
CLASSES = {"cat", "dog"}
SOURCE = "labels_override.csv"


def exactly(message: str) -> str:
    """A ``match`` pattern for exactly ``message``."""
    return f"^{re.escape(message)}$"


# --- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "raw_path,label\ndata/raw/cat/s/0.png,exclude\n",
            "labels_override.csv line 1: the header must be raw_path,action, got 'raw_path,label'",
        ),
        (
            "# my decisions\n\nraw_path;action\n",
            "labels_override.csv line 3: the header must be raw_path,action, got 'raw_path;action'",
        ),
        (  # no header at all: the first decision is read as one
            "data/raw/cat/s/0.png,exclude\n",
            "labels_override.csv line 1: the header must be raw_path,action, got "
            "'data/raw/cat/s/0.png,exclude'",
        ),
        (
            "raw_path,action\ndata/raw/cat/s/0.png,delete\n",
            "labels_override.csv line 2: unknown action 'delete' (exclude or relabel:<class>)",
        ),
        (
            "raw_path,action\ndata/raw/cat/s/0.png,Exclude\n",
            "labels_override.csv line 2: unknown action 'Exclude' (exclude or relabel:<class>)",
        ),
        (
            "raw_path,action\n\ndata/raw/cat/s/0.png,relabel:bird\n",
            "labels_override.csv line 3: relabel:bird names no class (classes: cat, dog)",
        ),
        (
            "raw_path,action\ndata/raw/cat/s/0.png,relabel:\n",
            "labels_override.csv line 2: relabel: names no class (classes: cat, dog)",
        ),
        (
            "raw_path,action\ndata/raw/cat/s/0.png,exclude\n# later\ndata/raw/cat/s/0.png,"
            "relabel:dog\n",
            "labels_override.csv line 4: data/raw/cat/s/0.png is already decided on line 2",
        ),
        (
            "raw_path,action\ndata/raw/cat/s/0.png\n",
            "labels_override.csv line 2: expected raw_path,action, got 'data/raw/cat/s/0.png'",
        ),
        (
            "raw_path,action\ndata/raw/cat/s/0.png,exclude,because\n",
            "labels_override.csv line 2: expected raw_path,action, got "
            "'data/raw/cat/s/0.png,exclude,because'",
        ),
    ],
    ids=[
        "bad-header",
        "header-after-comments",
        "no-header",
        "unknown-action",
        "action-case",
        "unknown-class",
        "empty-class",
        "duplicate-path",
        "one-column",
        "three-columns",
    ],
)
def test_a_file_that_cannot_be_applied_is_one_line_naming_file_line_and_problem(text, message):
    with pytest.raises(OverrideError, match=exactly(message)):
        parse_overrides(text, SOURCE, CLASSES)


def test_an_override_error_is_a_stage_error():
    """So ``stage_main`` ends the stage with its one ``error:`` line, not a traceback."""
    with pytest.raises(StageError, match="unknown action"):
        parse_overrides("raw_path,action\nx,drop\n", SOURCE, CLASSES)


def test_comments_blank_lines_spaces_and_quotes_are_read_as_meant():
    text = (
        "# decisions after the audit of May\n"
        "\n"
        " raw_path , action \n"
        "   # an indented comment\n"
        "data/raw/cat/s/0.png,exclude\n"
        "  \n"
        " data/raw/cat/s/1.png , relabel:dog \n"
        '"data/raw/dog/s/a,b.png",relabel:cat\r\n'
    )
    assert parse_overrides(text, SOURCE, CLASSES) == {
        "data/raw/cat/s/0.png": Override(5, None),
        "data/raw/cat/s/1.png": Override(7, "dog"),
        "data/raw/dog/s/a,b.png": Override(8, "cat"),
    }
    assert Override(5, None).reason == "labels_override.csv line 5: excluded"
    assert Override(7, "dog").reason == "labels_override.csv line 7: relabelled dog"


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing decided yet\n", "raw_path,action\n"])
def test_a_file_without_decisions_decides_nothing(text):
    assert parse_overrides(text, SOURCE, CLASSES) == {}


def test_read_overrides_tolerates_a_byte_order_mark_and_a_missing_file(tmp_path: Path):
    path = tmp_path / "labels_override.csv"
    path.write_text("raw_path,action\r\ndata/raw/cat/s/0.png,exclude\r\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_overrides(path, CLASSES) == {"data/raw/cat/s/0.png": Override(2, None)}
    assert read_overrides(tmp_path / "absent.csv", CLASSES) == {}
    path.write_text("raw_path,action\nx,relabel:cow\n", encoding="utf-8")
    with pytest.raises(
        OverrideError,
        match=exactly("labels_override.csv line 2: relabel:cow names no class (classes: cat, dog)"),
    ):
        read_overrides(path, CLASSES)


def test_check_paths_names_the_first_unknown_path_and_counts_the_others():
    decisions = {
        "data/raw/cat/s/0.png": Override(2, None),
        "data/raw/cat/s/gone.png": Override(5, "dog"),
        "cat/s/1.png": Override(3, None),  # relative to the raw folder, not as in the manifest
    }
    known = {"data/raw/cat/s/0.png", "data/raw/cat/s/1.png"}
    with pytest.raises(
        OverrideError,
        match=exactly(
            "labels_override.csv line 3: cat/s/1.png is not a file under the raw folder (and 1 "
            "more); fix the path (as in data/manifest.csv) or delete the line"
        ),
    ):
        check_paths(decisions, known, SOURCE)
    check_paths({"data/raw/cat/s/0.png": Override(2, None)}, known, SOURCE)  # known: no error


# --- applied by preprocess ----------------------------------------------------------------

DECISIONS = (
    "raw_path,action\n"
    "data/raw/cat/s/wrong.png,relabel:dog\n"
    "# looked at it twice\n"
    "data/raw/dog/s/junk.png,exclude\n"
    "\n"
    "data/raw/dog/s/same.png,relabel:cat\n"
)


def run(tmp: Path):
    outcomes, _ = preprocess_tree(tmp, OPTS, overrides=tmp / "data" / "labels_override.csv")
    return outcomes


def manifest(tmp: Path) -> dict[str, dict[str, str]]:
    with (tmp / "data" / "manifest.csv").open(encoding="utf-8") as fh:
        return {row["raw_path"]: row for row in csv.DictReader(fh)}


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def tag(rel: str) -> str:
    """The suffix preprocess gives colliding output names (a hash of the raw path)."""
    return hashlib.sha1(rel.encode()).hexdigest()[:8]


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    """Two classes, a mislabelled image, a junk image, and one image under both classes."""
    raw = tmp_path / "data" / "raw"
    for i in range(6):
        f.write(raw / "cat" / "s" / f"{i}.png", f.png(i))
        f.write(raw / "dog" / "s" / f"{i}.png", f.png(100 + i))
    f.write(raw / "cat" / "s" / "wrong.png", f.png(50))
    f.write(raw / "dog" / "s" / "junk.png", f.png(60))
    f.write(raw / "cat" / "s" / "same.png", f.png(70))
    f.write(raw / "dog" / "s" / "same.png", f.png(70))  # byte-identical: a label conflict
    return tmp_path


def test_decisions_relabel_exclude_and_resolve_a_conflict(labelled: Path):
    run(labelled)  # no decisions file yet: the conflict is quarantined
    before = manifest(labelled)
    for rel in ("cat/s/same.png", "dog/s/same.png"):
        row = before[f"data/raw/{rel}"]
        assert (row["status"], row["reason"].split(":")[0]) == ("invalid", "label conflict")
    assert before["data/raw/cat/s/wrong.png"]["output_path"] == "data/processed/cat/s__wrong.jpg"

    (labelled / "data" / "labels_override.csv").write_text(DECISIONS, encoding="utf-8")
    run(labelled)
    rows = manifest(labelled)
    assert len(rows) == 16
    fields = ("class", "subclass", "status", "output_path", "reason")
    assert [rows["data/raw/cat/s/wrong.png"][k] for k in fields] == [
        "dog",
        "s",
        "processed",
        "data/processed/dog/s__wrong.jpg",
        "labels_override.csv line 2: relabelled dog",
    ]
    junk = rows["data/raw/dog/s/junk.png"]
    assert [junk[k] for k in fields] == [
        "dog",
        "s",
        "excluded",
        "",
        "labels_override.csv line 4: excluded",
    ]
    raw_junk = (labelled / "data" / "raw" / "dog" / "s" / "junk.png").read_bytes()
    assert junk["sha256"] == hashlib.sha256(raw_junk).hexdigest()
    # both copies of the conflict are now cat: processed, under names that do not collide
    assert [rows["data/raw/cat/s/same.png"][k] for k in fields] == [
        "cat",
        "s",
        "processed",
        f"data/processed/cat/s__same-{tag('cat/s/same.png')}.jpg",
        "",
    ]
    assert [rows["data/raw/dog/s/same.png"][k] for k in fields] == [
        "cat",
        "s",
        "processed",
        f"data/processed/cat/s__same-{tag('dog/s/same.png')}.jpg",
        "labels_override.csv line 6: relabelled cat",
    ]
    processed = files_under(labelled / "data" / "processed")
    assert processed == sorted(
        [f"cat/s__{i}.jpg" for i in range(6)]
        + [f"dog/s__{i}.jpg" for i in range(6)]
        + ["dog/s__wrong.jpg"]
        + [f"cat/s__same-{tag('cat/s/same.png')}.jpg", f"cat/s__same-{tag('dog/s/same.png')}.jpg"]
    )  # the relabelled image left cat/, the excluded one is nowhere
    assert files_under(labelled / "data" / "invalid") == []
    with (labelled / "data" / "fingerprints.csv").open(encoding="utf-8") as fh:
        fingerprinted = {row["sha256"] for row in csv.DictReader(fh)}
    assert fingerprinted == {r["sha256"] for r in rows.values() if r["status"] == "processed"}
    assert junk["sha256"] not in fingerprinted
    assert len(fingerprinted) == 14  # 15 processed images, two of them one content


def test_split_lists_follow_the_decisions(labelled: Path):
    (labelled / "data" / "labels_override.csv").write_text(DECISIONS, encoding="utf-8")
    run(labelled)
    sides = assign(
        read_manifest(labelled / "data" / "manifest.csv", "data/processed/"), 3, 0.3, 0.15
    )
    listed = {i.path: i.label for members in sides.values() for i in members}
    assert len(listed) == 15
    assert listed["data/processed/dog/s__wrong.jpg"] == "dog"
    assert "data/processed/cat/s__wrong.jpg" not in listed
    assert [p for p in listed if "junk" in p] == []
    same = {p: label for p, label in listed.items() if "s__same" in p}
    assert same == {
        f"data/processed/cat/s__same-{tag('cat/s/same.png')}.jpg": "cat",
        f"data/processed/cat/s__same-{tag('dog/s/same.png')}.jpg": "cat",
    }
    where = {i.path: side for side, members in sides.items() for i in members}
    assert len({where[p] for p in same}) == 1  # one content: one side


def test_an_excluded_copy_also_resolves_a_conflict(labelled: Path):
    path = labelled / "data" / "labels_override.csv"
    path.write_text("raw_path,action\ndata/raw/dog/s/same.png,exclude\n", encoding="utf-8")
    run(labelled)
    rows = manifest(labelled)
    assert [rows[f"data/raw/{rel}/s/same.png"]["status"] for rel in ("cat", "dog")] == [
        "processed",
        "excluded",
    ]
    assert rows["data/raw/cat/s/same.png"]["output_path"] == "data/processed/cat/s__same.jpg"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "data/raw/cat/s/nope.png,exclude",
            "labels_override.csv line 2: data/raw/cat/s/nope.png is not a file under the raw "
            "folder; fix the path (as in data/manifest.csv) or delete the line",
        ),
        (
            "cat/s/0.png,exclude",
            "labels_override.csv line 2: cat/s/0.png is not a file under the raw folder; fix "
            "the path (as in data/manifest.csv) or delete the line",
        ),
        (
            "data/raw/cat/s/0.png,relabel:bird",
            "labels_override.csv line 2: relabel:bird names no class (classes: cat, dog)",
        ),
        (
            "data/raw/cat/s/notes.txt,relabel:dog",
            "labels_override.csv line 2: data/raw/cat/s/notes.txt is not an image (sidecar file "
            "(.txt), not an image); delete the line",
        ),
    ],
    ids=["unknown-path", "path-below-raw", "unknown-class", "not-an-image"],
)
def test_preprocess_refuses_a_bad_decision_before_writing_anything(labelled: Path, line, message):
    (labelled / "data" / "raw" / "cat" / "s" / "notes.txt").write_text("a caption")
    path = labelled / "data" / "labels_override.csv"
    path.write_text(f"raw_path,action\n{line}\n", encoding="utf-8")
    with pytest.raises(OverrideError, match=exactly(message)):
        run(labelled)
    assert sorted(p.name for p in (labelled / "data").iterdir()) == ["labels_override.csv", "raw"]
    assert not (labelled / ".cache").exists()
