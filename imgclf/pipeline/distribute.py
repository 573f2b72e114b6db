"""Where ``train`` runs (``train.distribute``) and who writes: strategies, roles, and the
launcher of local workers.

``none``
    TensorFlow's default strategy: one process, its default device.
``mirrored``
    ``MirroredStrategy``: one replica per local GPU (the CPU when there is none), gradients
    summed across them every step.
``multi_worker``
    ``MultiWorkerMirroredStrategy``: one process per worker, described by ``TF_CONFIG``
    (``{"cluster": {"worker": [host:port, ...]}, "task": {"type": "worker", "index": i}}``).
    Without ``TF_CONFIG``, :func:`local_cluster` starts ``train.workers`` processes on this
    machine (loopback ports): this process is worker 0, the others run the same stage
    with their own ``TF_CONFIG``, their output in ``.cache/train-workers/worker-<i>.log``.
    On several machines, set ``TF_CONFIG`` yourself and start the stage on each (see the
    README, "Scaling out").

All three run the same training step (:mod:`imgclf.pipeline.training_loop`). Only the
*chief* (worker 0, or the task of type ``chief``) writes: the candidate, DVCLive's history,
the MLflow run. A worker that dies fails the stage: TensorFlow aborts the collectives of
the others (its heartbeat stops, about 10 s), the stage ends with one ``error:`` line, and
nothing is written.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.config import StageError

log = logging.getLogger(__name__)

TF_CONFIG = "TF_CONFIG"
PARENT_ENV = "IMGCLF_TRAIN_PARENT"  # pid of the launcher, set in the workers it starts
FINISH_SECONDS = 300.0  # how long the chief waits for the other workers to end well
ABORT_SECONDS = 90.0  # after a worker died: time TensorFlow gets to fail the chief's step
STOP_SECONDS = 10.0  # SIGTERM, then SIGKILL


@dataclass(frozen=True)
class Role:
    """This process' place in the training cluster."""

    index: int  # task index among the workers (the chief task counts as 0)
    workers: int  # processes in the cluster
    chief: bool  # the one that writes

    @property
    def name(self) -> str:
        return "chief" if self.chief else f"worker {self.index}"


def cluster_role(tf_config: str | None) -> Role:
    """The :class:`Role` of a process from its ``TF_CONFIG`` (no ``TF_CONFIG``: a single
    chief). A ``chief`` task is the chief; without one, worker 0 is. A ``TF_CONFIG`` that
    cannot be used is a :class:`StageError` naming what is wrong."""
    if not tf_config:
        return Role(0, 1, True)
    try:
        spec = json.loads(tf_config)
        cluster, task = spec["cluster"], spec["task"]
        kind, index = str(task["type"]), int(task["index"])
        sizes = {name: len(hosts) for name, hosts in cluster.items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise StageError(
            f"{TF_CONFIG} is not a usable cluster spec ({exc.__class__.__name__}: {exc}); "
            'expected {"cluster": {"worker": ["host:port", ...]}, '
            '"task": {"type": "worker", "index": 0}}'
        ) from None
    if kind not in sizes or not 0 <= index < sizes[kind]:
        raise StageError(f"{TF_CONFIG}: task {kind}:{index} is not in its cluster {sizes}")
    if set(sizes) - {"chief", "worker"}:
        raise StageError(
            f"{TF_CONFIG}: multi_worker training uses chief and worker tasks only, "
            f"got {sorted(sizes)}"
        )
    workers = sum(sizes.values())
    if "chief" in sizes:
        return Role(0 if kind == "chief" else index + 1, workers, kind == "chief")
    return Role(index, workers, index == 0)


def tf_config(addresses: Sequence[str], index: int) -> str:
    """The ``TF_CONFIG`` of worker ``index`` in a cluster of workers at ``addresses``."""
    return json.dumps(
        {"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}}
    )


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on loopback now (held together while chosen)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def make_strategy(mode: str, role: Role) -> Any:
    """The ``tf.distribute`` strategy of ``train.distribute``. ``multi_worker`` reads
    ``TF_CONFIG`` (create it before any other TensorFlow work)."""
    import tensorflow as tf

    if mode == "none":
        return tf.distribute.get_strategy()
    if mode == "mirrored":
        return tf.distribute.MirroredStrategy()
    if mode == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        log.info(
            "multi_worker: %s of %d workers, %d replicas in sync",
            role.name, role.workers, strategy.num_replicas_in_sync,
        )  # fmt: skip
        return strategy
    raise ValueError(f"train.distribute must be none, mirrored or multi_worker, got {mode!r}")


def lost_worker_error(exc: BaseException) -> bool:
    """Whether ``exc`` is TensorFlow telling that a peer of the cluster is gone (its
    collectives aborted, unreachable or timed out)."""
    import tensorflow as tf

    lost = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError)
    return isinstance(exc, lost)


def exit_description(code: int) -> str:
    """``exited with status 3`` or ``was killed by SIGKILL``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


@dataclass
class Worker:
    """One worker process started by :func:`local_cluster`."""

    index: int
    process: subprocess.Popen
    log_file: Path

    def describe(self) -> str:
        code = self.process.poll()
        state = "is running" if code is None else exit_description(code)
        return f"worker {self.index} (pid {self.process.pid}) {state}; its log: {self.log_file}"


class LocalCluster:
    """The workers :func:`local_cluster` started, watched from a thread: when one ends
    badly while the chief trains, the chief gets :data:`ABORT_SECONDS` for TensorFlow to
    fail its step (the usual end: one ``error:`` line), then the process exits with status
    1 (a collective that never returns must not hang the stage)."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.failed: Worker | None = None
        self._done = threading.Event()
        self._abort_timer = threading.Timer(ABORT_SECONDS, self._abort)
        self._abort_timer.daemon = True
        self._thread = threading.Thread(target=self._watch, name="train-workers", daemon=True)
        self._thread.start()

    def _ended_badly(self) -> Worker | None:
        return next((w for w in self.workers if w.process.poll() not in (None, 0)), None)

    def _watch(self) -> None:
        while self.failed is None and not self._done.wait(0.2):
            self.failed = self._ended_badly()
            if self.failed:
                log.error("training %s", self.failed.describe())
                self._abort_timer.start()

    def dead(self, within: float = 2.0) -> Worker | None:
        """The worker that ended badly (waiting up to ``within`` seconds for one: the
        chief may hear of a lost peer before the process is reaped)."""
        deadline = time.monotonic() + within
        while not (found := self.failed or self._ended_badly()):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        return found

    def _abort(self) -> None:
        if self._done.is_set():
            return
        print(
            f"error: training {self.failed.describe() if self.failed else 'worker'}, and "
            f"the chief did not stop within {ABORT_SECONDS:g} s; stopping (nothing written)",
            file=sys.stderr,
            flush=True,
        )
        self.stop()
        os._exit(1)

    def finish(self, timeout: float = FINISH_SECONDS) -> None:
        """Wait for every worker to end after the chief's training; one that ends badly
        (or not within ``timeout``) is a :class:`StageError`."""
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            with suppress(subprocess.TimeoutExpired):
                worker.process.wait(max(deadline - time.monotonic(), 0.1))
        self._done.set()
        self._abort_timer.cancel()
        bad = [w for w in self.workers if w.process.poll() != 0]
        if bad:
            self.stop()
            raise StageError("training " + "; ".join(w.describe() for w in bad))

    def stop(self) -> None:
        """SIGTERM every worker still running, SIGKILL after :data:`STOP_SECONDS`."""
        self._done.set()
        self._abort_timer.cancel()
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in self.workers:
            try:
                worker.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()


@contextmanager
def local_cluster(
    count: int, command: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None
) -> Iterator[LocalCluster | None]:
    """Run as worker 0 of ``count`` workers on loopback: set this process' ``TF_CONFIG``
    and start ``command`` ``count - 1`` times with the others' (output to
    ``log_dir/worker-<i>.log``). The block trains as the chief; on leaving it, the workers
    must end well (:meth:`LocalCluster.finish`), or are stopped when the block raised.
    ``count`` 1 starts nothing and yields ``None``."""
    if count <= 1:
        yield None
        return
    addresses = [f"127.0.0.1:{port}" for port in free_ports(count)]
    base = dict(os.environ if env is None else env)
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = []
    for index in range(1, count):
        log_file = log_dir / f"worker-{index}.log"
        child_env = base | {TF_CONFIG: tf_config(addresses, index), PARENT_ENV: str(os.getpid())}
        with log_file.open("wb") as out:
            process = subprocess.Popen(
                list(command), env=child_env, stdout=out, stderr=subprocess.STDOUT
            )
        workers.append(Worker(index, process, log_file))
    os.environ[TF_CONFIG] = tf_config(addresses, 0)
    started = [f"worker {w.index} (pid {w.process.pid}) on {addresses[w.index]}" for w in workers]
    log.info(
        "multi_worker: this process is worker 0 of %d on %s; started %s (logs in %s)",
        count, addresses[0], ", ".join(started), log_dir,
    )  # fmt: skip
    cluster = LocalCluster(workers)
    try:
        yield cluster
    except BaseException:
        cluster.stop()
        raise
    finally:
        os.environ.pop(TF_CONFIG, None)
    cluster.finish()


def watch_parent(env: Mapping[str, str] | None = None, interval: float = 1.0) -> None:
    """In a worker started by :func:`local_cluster`: exit (status 1) as soon as the
    launcher is gone, so no worker outlives a killed stage."""
    parent = (os.environ if env is None else env).get(PARENT_ENV)
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(interval)
        print("error: the training launcher is gone; worker stopping", file=sys.stderr)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
