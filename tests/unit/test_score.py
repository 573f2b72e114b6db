"""``score.py`` in process: its rows are :meth:`Predictor.predict_paths`' answers for the same
files, one per entry of the tree; a rerun resumes (skips what is done, cuts a torn last
line); a resume with another model is refused; bad input exits 2 with one line."""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import logging
import os
from pathlib import Path

import pytest

from imgclf.config import load_serve
from imgclf.serving import score, score_input, score_output
from imgclf.serving.predictor import Predictor
from imgclf.testing import images as f
from imgclf.testing.bundles import make_bundle

LOADED: dict[tuple[str, int | None, str], Predictor] = {}  # one compile per bundle

# the regular files of the ``tree`` fixture, in the walk's order (sorted within each folder)
FILES = ["a.jpg", "b.png", "nested/c.jpg", "nested/deeper/d.jpg", "text.jpg", "z.jpg"]
FIFO_REASON = "not a regular file (FIFO)"
HOW = "use a new --output, or --restart to score everything afresh"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("score") / "models")


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory) -> Path:
    """Another model of the same classes (another md5)."""
    return make_bundle(tmp_path_factory.mktemp("score-other") / "models", seed=1)


@pytest.fixture(autouse=True)
def cached_load(monkeypatch) -> list[tuple]:
    """``Predictor.load`` as ``main`` calls it, compiled once per bundle; its arguments."""
    calls: list[tuple] = []

    class Cached:
        @staticmethod
        def load(source, max_pixels=None, runtime="auto") -> Predictor:
            calls.append((str(source), max_pixels, runtime))
            return predictor_of(source, max_pixels, runtime)

    monkeypatch.setattr(score, "Predictor", Cached)
    return calls


def predictor_of(source, max_pixels=None, runtime="auto") -> Predictor:
    key = (str(source), max_pixels, runtime)
    if key not in LOADED:
        LOADED[key] = Predictor.load(source, max_pixels, runtime)
    return LOADED[key]


def served(bundle: Path) -> Predictor:
    """The predictor ``main`` loads for ``bundle`` by default (``serve.yaml``'s settings)."""
    settings = load_serve()
    return predictor_of(bundle, settings.max_pixels, settings.runtime)


@pytest.fixture
def tree(tmp_path) -> Path:
    """Images at the top and two levels down, a file that is not an image, hidden entries,
    a FIFO (never opened) and a link to a folder (not followed)."""
    top = tmp_path / "uploads"
    f.write(top / "z.jpg", f.jpeg(1))
    f.write(top / "a.jpg", f.jpeg(2))
    f.write(top / "b.png", f.png(3))
    f.write(top / "text.jpg", b"not an image")
    f.write(top / "nested" / "c.jpg", f.jpeg(4))
    f.write(top / "nested" / "deeper" / "d.jpg", f.jpeg(5))
    f.write(top / ".hidden.jpg", f.jpeg(6))
    f.write(top / ".cache" / "e.jpg", f.jpeg(7))
    os.mkfifo(top / "nested" / "pipe")
    (top / "up").symlink_to(tmp_path, target_is_directory=True)
    return top


def run(capsys, bundle: Path, source: Path, output: Path, *flags: str) -> tuple[int, str]:
    """``main``'s exit status and its stderr."""
    argv = ["--source", str(source), "--output", str(output), "--model", str(bundle), *flags]
    status = score.main([*argv, "--workers", "2"])
    return status, capsys.readouterr().err


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected_answers(bundle: Path, tree: Path) -> dict[str, dict]:
    """``predict_paths``' answers for the tree's files, in one batch as ``main`` runs them
    (the same pixels in the same batch: the same probabilities to the last bit)."""
    paths = [tree / rel for rel in FILES]
    answers = served(bundle).predict_paths(paths, batch_size=64)
    return {p.relative_to(tree).as_posix(): answer for p, answer in answers}


# ------------------------------------------------------------------ rows
def test_csv_rows_are_predict_paths_answers(capsys, bundle, tree, tmp_path):
    out = tmp_path / "scores.csv"
    status, err = run(capsys, bundle, tree, out, "--batch-size", "64")
    assert status == 0, err
    rows = csv_rows(out)
    expected = expected_answers(bundle, tree)
    assert [r["path"] for r in rows] == [
        "a.jpg", "b.png", "nested/c.jpg", "nested/deeper/d.jpg", "nested/pipe", "text.jpg",
        "up", "z.jpg",
    ]  # fmt: skip
    assert list(rows[0]) == [
        "path", "top_class", "top_probability", "decision", "positive",
        "p_safe", "p_sensitive", "error",
    ]  # fmt: skip
    by_path = {r["path"]: r for r in rows}
    for rel in ("a.jpg", "b.png", "nested/c.jpg", "nested/deeper/d.jpg", "z.jpg"):
        row, answer = by_path[rel], expected[rel]
        assert float(row["p_safe"]) == answer["probabilities"]["safe"]
        assert float(row["p_sensitive"]) == answer["probabilities"]["sensitive"]
        assert float(row["top_probability"]) == answer["top_probability"]
        assert row["top_class"] == answer["top_class"]
        assert row["decision"] == answer["decision"]["label"]
        assert row["positive"] == str(answer["decision"]["positive"]).lower()
        assert row["error"] == ""
    assert expected["text.jpg"] == {"error": "not an image (unrecognised format)"}
    assert by_path["text.jpg"] == {
        "path": "text.jpg", "top_class": "", "top_probability": "", "decision": "",
        "positive": "", "p_safe": "", "p_sensitive": "",
        "error": "not an image (unrecognised format)",
    }  # fmt: skip
    assert by_path["nested/pipe"]["error"] == FIFO_REASON
    assert by_path["up"]["error"] == "symbolic link to a folder (not followed)"


def test_jsonl_rows_are_predict_paths_answers(capsys, bundle, tree, tmp_path):
    out = tmp_path / "scores.jsonl"
    status, err = run(capsys, bundle, tree, out)
    assert status == 0, err
    rows = {r["path"]: r for r in jsonl_rows(out)}
    assert len(rows) == 8
    for rel, answer in expected_answers(bundle, tree).items():
        if "error" in answer:
            assert rows[rel] == {"path": rel, "error": answer["error"]}
            continue
        assert rows[rel] == {
            "path": rel,
            "probabilities": answer["probabilities"],
            "top_class": answer["top_class"],
            "top_probability": answer["top_probability"],
            "decision": answer["decision"]["label"],
            "positive": answer["decision"]["positive"],
        }
    assert rows["nested/pipe"] == {"path": "nested/pipe", "error": FIFO_REASON}
    meta = json.loads((tmp_path / "scores.jsonl.meta.json").read_text())
    assert meta == {
        "bundle_md5": served(bundle).version["bundle_md5"],
        "runtime": "keras",
        "class_names": ["safe", "sensitive"],
        "format": "jsonl",
        "source": str(tree.resolve()),
    }


def test_model_gets_the_servers_pixel_limit_and_runtime(
    capsys, cached_load, bundle, tree, tmp_path
):
    run(capsys, bundle, tree, tmp_path / "s.csv")
    run(capsys, bundle, tree, tmp_path / "k.csv", "--runtime", "keras")
    settings = load_serve()
    assert cached_load == [
        (str(bundle), settings.max_pixels, settings.runtime),
        (str(bundle), settings.max_pixels, "keras"),
    ]


def test_an_output_inside_the_source_is_not_scored(capsys, bundle, tree, caplog):
    caplog.set_level(logging.INFO, logger="imgclf.serving")
    out = tree / "scores.csv"
    assert run(capsys, bundle, tree, out)[0] == 0
    paths = [r["path"] for r in csv_rows(out)]
    assert "scores.csv" not in paths and "scores.csv.meta.json" not in paths
    assert len(paths) == 8
    assert run(capsys, bundle, tree, out)[0] == 0
    assert "0 scored, 0 errors, 8 skipped as already done" in caplog.text


def test_unreadable_folder_gets_an_error_row(capsys, monkeypatch, bundle, tree, tmp_path):
    real = os.scandir
    locked = tree / "nested" / "deeper"

    def scandir(path):  # as a folder without read permission (tests run as root)
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "scores.csv"
    assert run(capsys, bundle, tree, out)[0] == 0
    rows = {r["path"]: r["error"] for r in csv_rows(out)}
    assert rows["nested/deeper"] == "cannot read folder: permission denied"
    assert "nested/deeper/d.jpg" not in rows


def test_walk_is_lazy_sorted_and_leaves_out_hidden_and_excluded(tree):
    walked = score_input.walk(tree, frozenset({"z.jpg"}))
    assert next(walked) == score_input.Entry("a.jpg", str(tree / "a.jpg"))
    assert [e.rel for e in walked] == [
        "b.png", "nested/c.jpg", "nested/deeper/d.jpg", "nested/pipe", "text.jpg", "up",
    ]  # fmt: skip


# ------------------------------------------------------------------ resuming
def test_resume_skips_done_files_and_cuts_a_torn_line(capsys, caplog, bundle, tree, tmp_path):
    caplog.set_level(logging.INFO, logger="imgclf.serving")
    out = tmp_path / "scores.csv"
    assert run(capsys, bundle, tree, out)[0] == 0
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 9  # the header and one row per entry
    # a kill during the last batch: the first four rows whole, the fifth half written;
    # and a kept row marked, to see that the rerun does not score its file again
    kept = [lines[0], lines[1].replace(lines[1].split(",")[2], "0.125", 1), *lines[2:5]]
    out.write_text("".join(kept) + lines[5][:12], encoding="utf-8")
    status, _ = run(capsys, bundle, tree, out)
    assert status == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("".join(kept))
    paths = [r["path"] for r in csv_rows(out)]
    assert sorted(paths) == sorted(r.split(",")[0] for r in lines[1:])  # one row per entry
    assert csv_rows(out)[0]["top_probability"] == "0.125"
    assert text.count("path,top_class") == 1
    assert f"{out}: cut off a torn last line (12 bytes)" in caplog.text
    # left: z.jpg, and the FIFO, the text file and the link to a folder (error rows)
    assert "1 scored, 3 errors, 4 skipped as already done" in caplog.text


def test_repair_tail(tmp_path):
    path = tmp_path / "out"
    path.write_bytes(b"a\nbb\nccc")
    assert score_output.repair_tail(path) == 3
    assert path.read_bytes() == b"a\nbb\n"
    assert score_output.repair_tail(path) == 0
    path.write_bytes(b"torn header")
    assert score_output.repair_tail(path) == 11
    assert path.read_bytes() == b""


def test_resume_with_another_bundle_is_refused(capsys, bundle, other_bundle, tree, tmp_path):
    out = tmp_path / "scores.jsonl"
    assert run(capsys, bundle, tree, out)[0] == 0
    before = out.read_bytes()
    old = served(bundle).version["bundle_md5"]
    new = served(other_bundle).version["bundle_md5"]
    assert old != new
    status, err = run(capsys, other_bundle, tree, out)
    assert status == 2
    assert (
        err.splitlines()[-1] == f"error: {out} was scored with bundle md5 {old}, not {new}: {HOW}"
    )
    assert "Traceback" not in err
    assert out.read_bytes() == before
    status, _ = run(capsys, other_bundle, tree, out, "--restart")
    assert status == 0
    assert len(jsonl_rows(out)) == 8
    assert json.loads(score_output.meta_path(out).read_text())["bundle_md5"] == new


def test_resume_in_another_format_is_refused(capsys, bundle, tree, tmp_path):
    out = tmp_path / "scores.txt"
    assert run(capsys, bundle, tree, out, "--format", "csv")[0] == 0
    status, err = run(capsys, bundle, tree, out, "--format", "jsonl")
    assert status == 2
    assert err.splitlines()[-1] == f"error: {out} holds csv rows, not jsonl: {HOW}"


def test_rows_without_a_sidecar_are_not_resumed(capsys, bundle, tree, tmp_path):
    out = tmp_path / "scores.csv"
    out.write_text("path,error\nx.jpg,lost\n")
    status, err = run(capsys, bundle, tree, out)
    assert status == 2
    assert err.splitlines()[-1] == (
        f"error: {out} has rows but no readable scores.csv.meta.json: {HOW}"
    )


def test_a_file_name_that_is_not_utf8_resumes(capsys, caplog, bundle, tmp_path):
    caplog.set_level(logging.INFO, logger="imgclf.serving")
    top = tmp_path / "uploads"
    f.write(Path(os.fsdecode(bytes(top) + b"/caf\xe9.jpg")), f.jpeg(1))
    out = tmp_path / "scores.csv"
    assert run(capsys, bundle, top, out)[0] == 0
    assert b"\ncaf\xe9.jpg," in out.read_bytes()
    assert run(capsys, bundle, top, out)[0] == 0
    assert "0 scored, 0 errors, 1 skipped as already done" in caplog.text


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing source", "source not found: {source} (no such file or directory)"),
        ("source is a file", "source is not a folder: {source}"),
        ("bad suffix", "cannot tell the format of {out}: name it .csv or .jsonl, or pass --format"),
        ("missing model", "no model bundle at"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, bundle, tree, tmp_path, case, message):
    source = {"missing source": tmp_path / "gone", "source is a file": tree / "a.jpg"}.get(
        case, tree
    )
    out = tmp_path / ("scores.xlsx" if case == "bad suffix" else "scores.csv")
    model = tmp_path / "no-models" if case == "missing model" else bundle
    status, err = run(capsys, model, source, out)
    assert status == 2
    assert err.splitlines()[-1].startswith("error: " + message.format(source=source, out=out))
    assert "Traceback" not in err
    assert not out.exists()


def test_an_output_that_cannot_be_written_exits_2(capsys, bundle, tree, tmp_path):
    out = tmp_path / "scores.csv"
    out.mkdir()
    status, err = run(capsys, bundle, tree, out)
    assert status == 2
    assert err.splitlines()[-1] == f"error: cannot write {out}: is a directory"


def test_a_second_run_on_the_same_output_is_refused(capsys, bundle, tree, tmp_path):
    out = tmp_path / "scores.csv"
    with out.open("a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a run in progress holds it
        status, err = run(capsys, bundle, tree, out)
    assert status == 2
    assert err.splitlines()[-1] == f"error: {out} is being written by another run"
    assert out.read_bytes() == b""


# ------------------------------------------------------------------ the worker pool
def test_decode_pool_keeps_order_and_times_out_a_slow_file(tmp_path):
    """A file past the time limit gets an error, its worker is replaced, and the files
    after it are still decoded; results come in the entries' order."""
    options = f.preprocess_options(size=32)
    small = [f.write(tmp_path / f"{i}.jpg", f.jpeg(i)) for i in range(3)]
    slow = f.write(tmp_path / "slow.png", f.encode(f.solid((9, 99, 199), (6000, 4000)), "PNG"))
    entries = [score_input.Entry(p.name, str(p)) for p in (small[0], slow, small[1], small[2])]
    entries.insert(2, score_input.Entry("pipe", str(tmp_path / "pipe"), FIFO_REASON))
    with score_input.decode_pool(2) as pool:
        got = list(score_input.decode_all(pool, entries, options, timeout=0.05, window=2))
    assert [d.rel for d in got] == ["0.jpg", "slow.png", "pipe", "1.jpg", "2.jpg"]
    assert got[1].error == "timeout: decode took longer than 0.05 s" and got[1].jpeg is None
    assert got[2].error == FIFO_REASON
    for decoded, path in zip([got[0], got[3], got[4]], small, strict=True):
        assert decoded.error is None
        assert decoded.jpeg == score_input.stored_jpeg(str(path), options)[0]


def test_decode_pool_sends_nothing_more_once_stopping(tmp_path):
    options = f.preprocess_options(size=32)
    paths = [f.write(tmp_path / f"{i}.jpg", f.jpeg(i)) for i in range(20)]
    entries = [score_input.Entry(p.name, str(p)) for p in paths]
    stop: list[bool] = []
    got = []
    with score_input.decode_pool(2) as pool:
        assert list(score_input.decode_all(pool, entries, options, 30.0, 4, lambda: True)) == []
        for decoded in score_input.decode_all(pool, entries, options, 30.0, 4, lambda: bool(stop)):
            got.append(decoded)
            stop.append(True)
    assert len(got) == 4  # the first, and the rest of the window: nothing sent after
    for decoded in got[1:]:  # done before the stop, or left for a rerun
        assert decoded.jpeg is not None or (decoded.error, decoded.lost) == ("stopped", True)
