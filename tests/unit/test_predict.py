"""``predict.py``'s ``main`` in process: every kind of source gives the documented output
and exit status, never a traceback; every entry it does not classify is named with the
reason; its pixel limit is the server's (``serve.yaml``)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import yaml

from imgclf.config import PATHS, load_serve
from imgclf.files import file_md5
from imgclf.serving import predict
from imgclf.serving.predictor import Predictor
from imgclf.testing import images as f
from imgclf.testing.bundles import RUN_FACTS, make_bundle

LOADED: dict[tuple[str, int | None], Predictor] = {}  # one compile per limit, not per call


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("predict") / "models")


@pytest.fixture(autouse=True)
def loads(monkeypatch) -> list[int | None]:
    """``Predictor.load`` as ``main`` calls it, remembered; the ``max_pixels`` it got."""
    limits: list[int | None] = []

    class Cached:
        @staticmethod
        def load(source, max_pixels=None, runtime="auto") -> Predictor:
            limits.append(max_pixels)
            key = (str(source), max_pixels, runtime)
            if key not in LOADED:
                LOADED[key] = Predictor.load(source, max_pixels, runtime)
            return LOADED[key]

    monkeypatch.setattr(predict, "Predictor", Cached)
    return limits


def model_doc(bundle: Path) -> dict:
    """``__model__`` for the test bundle: its md5 and the run facts beside it (unregistered)."""
    return {
        "source": "bundle.zip",  # outside the project and the cwd: the name alone
        "bundle_md5": file_md5(bundle),
        "registry": None,
        **RUN_FACTS,
    }


def run(capsys, bundle: Path, source: Path | str, *flags: str) -> tuple[int, dict | None, str]:
    """``main``'s exit status, its stdout as JSON (None when empty) and its stderr."""
    status = predict.main(["--image_source", str(source), "--model", str(bundle), *flags])
    out, err = capsys.readouterr()
    return status, (json.loads(out) if out else None), err


def serve_yaml(tmp_path: Path, **changes) -> Path:
    settings = {**yaml.safe_load(PATHS.serve_settings.read_text()), **changes}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """One image next to every kind of entry that cannot be classified."""
    top = tmp_path / "images"
    f.write(top / "good.jpg", f.jpeg(1))
    f.write(top / "text.jpg", b"not an image")
    f.write(top / ".hidden.jpg", f.jpeg(2))  # left out, as documented
    f.write(top / "sub" / "deep.png", f.png(3))
    os.mkfifo(top / "pipe")
    (top / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (top / "loop_a").symlink_to(top / "loop_b")
    (top / "loop_b").symlink_to(top / "loop_a")
    (top / "null").symlink_to("/dev/null")
    (top / "up").symlink_to(tmp_path, target_is_directory=True)
    return top


def test_every_entry_not_classified_is_named_with_its_reason(capsys, caplog, bundle, folder):
    status, doc, _ = run(capsys, bundle, folder)
    assert status == 0
    assert [k for k in doc if not k.startswith("__")] == [str(folder / "good.jpg")]
    assert doc["__errors__"] == {
        str(folder / "dangling.jpg"): f"dangling symbolic link (to {folder.parent / 'gone.jpg'})",
        str(folder / "loop_a"): "symbolic link loop",
        str(folder / "loop_b"): "symbolic link loop",
        str(folder / "null"): "not a regular file (character device)",
        str(folder / "pipe"): "not a regular file (FIFO)",
        str(folder / "text.jpg"): "not an image (unrecognised format)",
    }
    assert "2 sub-folder(s) not scanned (add --recursive)" in caplog.text  # sub/ and up/
    assert "pipe: not a regular file (FIFO)" in caplog.text


def test_recursive_scan_names_links_to_folders_it_does_not_follow(capsys, bundle, folder):
    status, doc, _ = run(capsys, bundle, folder, "--recursive")
    assert status == 0
    assert sorted(k for k in doc if not k.startswith("__")) == [
        str(folder / "good.jpg"),
        str(folder / "sub" / "deep.png"),
    ]
    assert doc["__errors__"][str(folder / "up")] == "symbolic link to a folder (not followed)"
    assert len(doc["__errors__"]) == 7


@pytest.mark.parametrize("plain", [False, True])
def test_empty_folder_exits_1(capsys, caplog, bundle, tmp_path, plain):
    (tmp_path / "empty").mkdir()
    f.write(tmp_path / "empty" / ".DS_Store", b"hidden")
    status, doc, _ = run(capsys, bundle, tmp_path / "empty", *(["--plain"] if plain else []))
    assert status == 1
    assert doc == ({} if plain else {"__decision__": {}, "__model__": model_doc(bundle)})
    assert "no image classified" in caplog.text


@pytest.mark.parametrize("kind", ["/dev/null", "fifo", "link to a fifo", "not an image"])
def test_a_source_that_is_not_an_image_exits_1_with_the_reason(capsys, bundle, tmp_path, kind):
    source = {
        "/dev/null": Path("/dev/null"),
        "fifo": tmp_path / "pipe",
        "link to a fifo": tmp_path / "link",
        "not an image": f.write(tmp_path / "notes.txt", b"hello"),
    }[kind]
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link").symlink_to(tmp_path / "pipe")
    status, doc, err = run(capsys, bundle, source)
    assert status == 1
    expected = {
        "/dev/null": "not a regular file (character device)",
        "fifo": "not a regular file (FIFO)",
        "link to a fifo": "not a regular file (FIFO)",
        "not an image": "not an image (unrecognised format)",
    }[kind]
    assert doc == {
        "__decision__": {},
        "__errors__": {str(source): expected},
        "__model__": model_doc(bundle),
    }
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: tmp / "nope", "no such file or directory"),
        (lambda tmp: tmp / "file.jpg" / "below", "not a directory"),
        (lambda tmp: _link(tmp / "dangling", tmp / "gone"), "dangling symbolic link (to "),
        (lambda tmp: _link(tmp / "a", _link(tmp / "b", tmp / "a")), "symbolic link loop"),
    ],
    ids=["missing", "below-a-file", "dangling", "loop"],
)
def test_a_source_that_leads_nowhere_exits_2(capsys, caplog, bundle, tmp_path, make, reason):
    f.write(tmp_path / "file.jpg", f.jpeg(1))
    source = make(tmp_path)
    status, doc, err = run(capsys, bundle, source)
    assert (status, doc) == (2, None)
    assert f"image source not found: {source} ({reason}" in caplog.text
    assert "Traceback" not in err


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _refuse(monkeypatch, refused: Path) -> None:
    """``os.scandir(refused)`` fails as a folder without read permission does (tests run as
    root, whom permissions do not stop)."""
    real = os.scandir

    def scandir(path):
        if Path(path) == refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_folders_are_named(capsys, monkeypatch, bundle, tmp_path):
    f.write(tmp_path / "top" / "a.jpg", f.jpeg(1))
    f.write(tmp_path / "top" / "locked" / "b.jpg", f.jpeg(2))
    _refuse(monkeypatch, tmp_path / "top" / "locked")
    status, doc, _ = run(capsys, bundle, tmp_path / "top", "--recursive")
    assert status == 0 and str(tmp_path / "top" / "a.jpg") in doc
    assert doc["__errors__"] == {
        str(tmp_path / "top" / "locked"): "cannot read folder: permission denied"
    }
    _refuse(monkeypatch, tmp_path / "top")
    status, doc, _ = run(capsys, bundle, tmp_path / "top")
    assert status == 1
    assert doc["__errors__"] == {str(tmp_path / "top"): "cannot read folder: permission denied"}


def test_pixel_limit_is_the_servers(capsys, monkeypatch, loads, bundle, tmp_path):
    """``max_pixels`` comes from ``serve.yaml``, as the server's does (no limit of its own)."""
    image = f.write(tmp_path / "a.jpg", f.jpeg(1))  # 40 x 30 = 1,200 pixels
    assert run(capsys, bundle, image)[0] == 0
    assert loads == [load_serve().max_pixels]
    settings = serve_yaml(tmp_path, max_pixels=1000)
    monkeypatch.setattr(predict, "load_serve", lambda: load_serve(settings))
    status, doc, _ = run(capsys, bundle, image)
    assert status == 1 and loads[-1] == 1000
    assert doc["__errors__"][str(image)].startswith("too many pixels (40x30 = 1,200 > 1,000)")


def test_bad_serve_yaml_is_one_line_and_exit_2(capsys, monkeypatch, bundle, tmp_path):
    settings = serve_yaml(tmp_path, max_pixels=0)
    monkeypatch.setattr(predict, "load_serve", lambda: load_serve(settings))
    status, doc, err = run(capsys, bundle, tmp_path)
    assert (status, doc) == (2, None)
    assert err.startswith("error: serve.yaml: max_pixels:") and err.count("\n") == 1
