"""Benchmark 13: a shared DVC remote over SSH (a real OpenSSH server on loopback).

``dvc push`` from one repository and ``dvc pull`` into a fresh clone, time and bytes, for
the bundled sample and a tree of many small images, against ``scp -r`` of the same tree to
the same server (the copy a team would do without DVC); and a second push after one
subclass changed, which must send only that subclass (content-addressed storage).
"""

from __future__ import annotations

import logging
import subprocess
import time
import zlib
from pathlib import Path

from benchmarks.common import Figure, Result, Settings, fmt, temp_dir
from imgclf.runtimes import folder_bytes
from imgclf.testing import images as f
from imgclf.testing.project import commit, dvc, init_repo, make_repo, run, set_params
from imgclf.testing.sshd import SshServer

log = logging.getLogger(__name__)

CLASSES = ("safe", "sensitive")
SUBCLASSES = 10  # a class


def write_tree(raw: Path, files: int, generation: int = 0, only: str | None = None) -> int:
    """``files`` small PNGs spread over ``CLASSES`` x ``SUBCLASSES`` folders (``only``: just
    that ``class/subclass``, rewritten with ``generation``'s content); returns bytes written."""
    per_folder = max(1, files // (len(CLASSES) * SUBCLASSES))
    written = 0
    for c in CLASSES:
        for s in range(SUBCLASSES):
            folder = f"{c}/sub{s:02d}"
            if only is not None and folder != only:
                continue
            for i in range(per_folder):
                seed = zlib.crc32(f"{folder}/{i}/{generation}".encode()) & 0xFFFFFF
                data = f.png(seed, (32, 32))
                f.write(raw / folder / f"img{i:05d}.png", data)
                written += len(data)
    return written


def folder_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def timed(cwd: Path, *args: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    run(cwd, *args, extra_env=env, timeout=1800)
    return time.perf_counter() - start


def make_data_repo(repo: Path, files: int, sshd: SshServer, store: Path) -> Path:
    """A git + DVC repository holding a ``data/raw`` of ``files`` images, the SSH remote
    its default."""
    repo.mkdir(parents=True)
    init_repo(repo)
    write_tree(repo / "data" / "raw", files)
    dvc(repo, "add", "-q", "data/raw")
    dvc(repo, "remote", "add", "-d", "shared", sshd.url(store))
    dvc(repo, "remote", "modify", "--local", "shared", "keyfile", str(sshd.user_key))
    commit(repo, "data")
    return repo


def sample_round_trip(tmp: Path, sshd: SshServer, env: dict[str, str]) -> dict[str, float]:
    """The bundled sample after a whole pipeline run (``train.epochs`` 5): push every
    output and the raw data, then pull them into a fresh clone; seconds, bytes, objects."""
    store = tmp / "sample-store"
    store.mkdir()
    repo = make_repo(tmp / "sample", per_digit=None)
    set_params(repo, {"train.epochs": 5})
    dvc(repo, "remote", "add", "-d", "shared", sshd.url(store))
    dvc(repo, "remote", "modify", "--local", "shared", "keyfile", str(sshd.user_key))
    dvc(repo, "repro")
    commit(repo, "a run")
    push = timed(repo, "dvc", "push", "-q", env=env)
    clone = tmp / "sample-clone"
    run(tmp, "git", "clone", "-q", str(repo), str(clone))
    dvc(clone, "remote", "modify", "--local", "shared", "keyfile", str(sshd.user_key))
    pull = timed(clone, "dvc", "pull", "-q", env=env)
    sizes = {"bytes": folder_bytes(store), "objects": folder_files(store)}
    return {"push": push, "pull": pull} | sizes


def scp_seconds(src: Path, sshd: SshServer, dest: Path, env: dict[str, str]) -> float:
    """``scp -r`` of ``src`` to ``dest`` on the server, with the same key."""
    start = time.perf_counter()
    subprocess.run(
        ["scp", "-q", "-r", "-P", str(sshd.port), "-i", str(sshd.user_key),
         "-o", f"UserKnownHostsFile={sshd.home / '.ssh' / 'known_hosts'}",
         str(src), f"{sshd.user}@127.0.0.1:{dest}"],
        check=True, env={**env, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    return time.perf_counter() - start


def bench(settings: Settings, corpus: object = None) -> Result:
    """Push / pull / scp times and bytes, and the bytes of an incremental push."""
    result = Result("remote", "Shared DVC remote (SSH)")
    files = 2_000 if settings.quick else 20_000
    with temp_dir(settings, "remote") as tmp:
        sshd = SshServer(tmp / "sshd")
        env = {"HOME": str(sshd.home)}
        try:
            store = tmp / "store"
            store.mkdir()
            repo = make_data_repo(tmp / "repo", files, sshd, store)
            raw_bytes = folder_bytes(repo / "data" / "raw")
            push = timed(repo, "dvc", "push", "-q", env=env)
            pushed_bytes = folder_bytes(store)
            clone = tmp / "clone"
            run(tmp, "git", "clone", "-q", str(repo), str(clone))
            dvc(clone, "remote", "modify", "--local", "shared", "keyfile", str(sshd.user_key))
            pull = timed(clone, "dvc", "pull", "-q", env=env)
            scp_dest = tmp / "scp"
            scp_dest.mkdir()
            scp = scp_seconds(repo / "data" / "raw", sshd, scp_dest, env)
            # one subclass changes: only its files (and the new .dir listing) travel
            changed = write_tree(repo / "data" / "raw", files, 1, only="sensitive/sub03")
            per_subclass = files // (len(CLASSES) * SUBCLASSES)
            dvc(repo, "add", "-q", "data/raw")
            before, objects = folder_bytes(store), folder_files(store)
            again = timed(repo, "dvc", "push", "-q", env=env)
            delta = folder_bytes(store) - before
            sent = folder_files(store) - objects
            sample = sample_round_trip(tmp, sshd, env)
        finally:
            sshd.stop()
    log.info("remote: push %s s, pull %s s, scp %s s", fmt(push), fmt(pull), fmt(scp))
    mib = 1024 * 1024
    result.figures += [
        Figure(f"`dvc push` of {files:,} images ({raw_bytes / mib:.1f} MiB)", "s", push, scp,
               "`scp -r` of the same tree to the same server"),
        Figure(f"`dvc pull` of {files:,} images into a fresh clone", "s", pull, scp,
               "`scp -r` of the same tree to the same server"),
        Figure("`dvc push` of the bundled sample after a pipeline run", "s", sample["push"], None),
        Figure("`dvc pull` of the bundled sample into a fresh clone", "s", sample["pull"], None),
        Figure("objects sent by a second push after one subclass of 20 changed", "files",
               sent, per_subclass + 1, "that subclass's files + the new data/raw listing",
               goal_on="ratio", goal_op="<=", goal_value=1.0),
    ]  # fmt: skip
    result.notes += [
        f"Remote: DVC's content-addressed store over `dvc-ssh` (SFTP) on Debian's OpenSSH "
        f"sshd at 127.0.0.1, throwaway keys. Tree: {files:,} PNGs of 32x32 px in 2 classes x "
        f"{SUBCLASSES} subclasses; {raw_bytes / mib:.1f} MiB in the workspace, "
        f"{pushed_bytes / mib:.1f} MiB in the store after the first push.",
        f"Second push: {again:.1f} s, {sent} objects and {delta / mib:.2f} MiB, against "
        f"{per_subclass} changed files of {changed / mib:.2f} MiB (the rest is the new `.dir` "
        "listing of data/raw, which names every file of the tree).",
        f"Bundled sample (1,797 digit PNGs, every stage's outputs, the bundle and its "
        f"exports; `train.epochs` 5): {sample['objects']:,} objects, "
        f"{sample['bytes'] / mib:.1f} MiB in the store.",
        "One run each (no repetitions): times on a shared 2-core machine move by tens of "
        "percent between runs; bytes are exact.",
    ]
    return result
