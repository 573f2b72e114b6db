"""A shared DVC remote on a real SSH server (Debian's OpenSSH on loopback): one clone pushes,
a fresh clone pulls, finds every stage up to date and serves the same bundle."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from imgclf.files import file_md5
from imgclf.testing.project import commit, dvc, make_repo, ran, run, set_params
from imgclf.testing.server import ServerProcess
from imgclf.testing.sshd import SshdMissing, SshServer

PUSH_ADVICE = "Use `dvc push` to send your updates to remote storage."
FAST = {"epochs": 2, "patience": 2, "cnn_filters": [8, 16], "batch_size": 16}


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    try:
        server = SshServer(tmp_path_factory.mktemp("sshd"))
    except SshdMissing as exc:
        pytest.skip(str(exc))  # only where the Debian package cannot be installed
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pusher(tmp_path_factory, sshd):
    """A repository that ran the pipeline and has the SSH remote as its default."""
    repo = make_repo(tmp_path_factory.mktemp("pusher") / "repo", per_digit=6)
    set_params(repo, {f"train.{key}": value for key, value in FAST.items()})
    set_params(repo, {"promote.min_value": 0.0})
    commit(repo, "fast params")
    # DVC's "Use `dvc push`" advice (hard-coded in `dvc repro`): `make repro` shows it only
    # when a default remote is set
    made = run(repo, "make", "-s", "repro", f"PY={sys.executable}")
    assert "train" in ran(made.stdout) and PUSH_ADVICE not in made.stdout, made.stdout
    store = tmp_path_factory.mktemp("store")
    dvc(repo, "remote", "add", "-d", "shared", sshd.url(store))
    add_key(repo, sshd)
    set_params(repo, {"export.batch_size": 32})  # export alone reruns
    commit(repo, "the shared remote")
    made = run(repo, "make", "-s", "repro", f"PY={sys.executable}")
    assert ran(made.stdout) == {"params", "export"} and PUSH_ADVICE in made.stdout, made.stdout
    commit(repo, "first run")
    return repo, store


def add_key(repo: Path, sshd: SshServer) -> None:
    """The user's key: in ``.dvc/config.local``, never in git."""
    dvc(repo, "remote", "modify", "--local", "shared", "keyfile", str(sshd.user_key))


def ssh_env(sshd: SshServer) -> dict[str, str]:
    """``HOME`` whose known_hosts pins the server's host key."""
    return {"HOME": str(sshd.home)}


def test_push_then_a_fresh_clone_pulls_recomputes_nothing_and_serves_the_same_bundle(
    pusher, sshd, tmp_path
):
    repo, store = pusher
    pushed = dvc(repo, "push", extra_env=ssh_env(sshd))
    assert "pushed" in pushed.stdout, pushed.stdout
    assert sum(1 for p in store.rglob("*") if p.is_file()) > 0

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    add_key(clone, sshd)
    dvc(clone, "pull", extra_env=ssh_env(sshd))
    proc = dvc(clone, "repro", extra_env=ssh_env(sshd))
    assert ran(proc.stdout) == set(), proc.stdout
    assert "Use `dvc push`" not in proc.stdout  # nothing new: no advice
    bundle = clone / "models" / "bundle.zip"
    assert file_md5(bundle) == file_md5(repo / "models" / "bundle.zip")
    assert (clone / "models" / "export" / "model.tflite").read_bytes() == (
        repo / "models" / "export" / "model.tflite"
    ).read_bytes()

    srv = ServerProcess(tmp_path, bundle)
    try:
        version = httpx.get(f"{srv.url}/version", timeout=10).json()
    finally:
        assert srv.stop() == 0, srv.log()
    assert version["bundle_md5"] == file_md5(bundle)
    assert version["dvc_lock"]["matches"] is True
    assert version["runtime"]["unavailable"] == {}  # the pulled exports serve too


def test_a_clone_without_the_key_is_refused_and_keeps_its_workspace(pusher, sshd, tmp_path):
    repo, _ = pusher
    clone = tmp_path / "stranger"
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    proc = dvc(clone, "pull", check=False, extra_env=ssh_env(sshd), timeout=120)
    assert proc.returncode != 0
    said = (proc.stdout + proc.stderr).lower()
    assert "permission denied" in said or "authentication" in said, said
    assert "Traceback" not in proc.stderr
    assert not (clone / "models" / "bundle.zip").exists()
