"""Benchmark: the server under abuse on loopback (issue 12).

One ``serve/server.py`` process serves a small bundle (the project's ``small_cnn`` at
32 px). A normal client posts a 320x240 JPEG to ``/predict`` at concurrency 4 (httpx,
keep-alive), probes ``/healthz`` every 0.5 s and opens a TCP session every second that
scans one image; first on the quiet server, then while attackers hold the server:

- HTTP: 1,000 connections that connect and send nothing, 100 that trickle a request's
  headers (a byte every 5 s), 100 that send a request's headers with a Content-Length and
  trickle its body (a byte every 5 s);
- TCP: 200 sessions that read the greeting and send nothing, 20 that send an over-long
  line (512 bytes a second, never a newline).

An attacker the server closes reconnects about a second later (it keeps the pressure on). The
attackers run in this process, on their own event loop in a thread (so their sockets do
not queue the normal client's callbacks); they share the machine's cores with the server
and the client. When the attack ends the attackers go silent but keep their sockets open:
the server's open file descriptors must come back to where they were before by its own
deadlines (``serve.yaml``), not because the attackers left. The server's fds and RSS
(psutil) are read before, during (peak) and after; the notes add its sockets by state,
the CPU the server, this process and its attackers' thread used, what the server said as
it closed each kind of attacker, and a py-spy profile of the server under abuse (taken
after the measured window, so it does not slow the measured requests).

``--quick``: a tenth of the attackers, 10 s under attack, and the server's longest
deadlines shortened (flags) so the wait after the attack stays short.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
import re
import resource
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import yaml

from benchmarks.artifact import write_served_bundle
from benchmarks.common import PROJECT, Figure, Result, Settings, fmt, hot_spots, temp_dir
from benchmarks.corpus import Corpus
from imgclf.testing.images import jpeg
from imgclf.testing.server import ServerProcess

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
SIZE = 32  # the bundle's input side: a small model, so the server's own work is small
PAYLOAD_SIZE = (320, 240)  # the normal client's JPEG
CONCURRENCY = 4
REQUEST_TIMEOUT = 30.0  # per normal request; a request that takes longer failed
PROBE_TIMEOUT = 10.0  # per /healthz probe and per TCP session
HEALTH_EVERY = 0.5
TCP_EVERY = 1.0
FAIL_BACKOFF = 0.1  # a normal client pauses this long after a failed request
CONNECT_TIMEOUT = 5.0
RECONNECT_DELAY = 1.0  # an attacker the server closed reconnects after this
TRICKLE_EVERY = 5.0  # seconds between the trickling attackers' bytes
LINE_CHUNK, LINE_EVERY = 512, 1.0  # the over-long-line attackers' bytes per tick
RAMP = 3.0  # attackers' start times are spread over this many seconds
FD_SLACK = 8  # "back to baseline" for the server's fds: at most this many above before
RSS_RATIO = 1.10  # "back to baseline" for its RSS
SAMPLE_EVERY = 0.5  # fds/RSS sampling period
WARM_UP = 3.0  # seconds of normal requests before the quiet phase (not measured)
SETTLE = 2.0  # seconds at least between a phase's end and a "before"/"after release" reading
AFTER_MARGIN = 5.0  # beyond the longest deadline, before "after" gives up
PROMPT = b"# Path: "
JPEG = {"Content-Type": "image/jpeg"}

# The server's deadlines (serve.yaml keys); the wait after the attack is bounded by the
# longest one in effect. Quick runs shorten the long ones (where the server has them).
DEADLINES = (
    "http_idle_timeout",
    "read_timeout",
    "http_body_timeout",
    "tcp_idle_timeout",
    "tcp_line_timeout",
    "tcp_drain_timeout",
)
QUICK_DEADLINES = {"http_body_timeout": 10.0, "tcp_idle_timeout": 5.0, "tcp_drain_timeout": 5.0}


@dataclass(frozen=True)
class Fleet:
    """How many attackers of each kind."""

    http_idle: int = 1000
    http_headers: int = 100
    http_body: int = 100
    tcp_idle: int = 200
    tcp_line: int = 20

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def scaled(self, factor: float) -> Fleet:
        return Fleet(*(max(1, round(n * factor)) for n in dataclasses.astuple(self)))


@dataclass(frozen=True)
class Timings:
    """How long each phase lasts (seconds)."""

    quiet: float
    abuse: float
    profile: float
    after_cap: float  # "after" waits at most this long for the fds to come back


FULL = Timings(quiet=12.0, abuse=60.0, profile=8.0, after_cap=90.0)
QUICK = Timings(quiet=4.0, abuse=10.0, profile=2.0, after_cap=30.0)

KINDS = {  # kind: (port, what it does)
    "http_idle": ("http", "connect, send nothing"),
    "http_headers": ("http", "trickle a request's headers, a byte every 5 s"),
    "http_body": ("http", "send headers with Content-Length, trickle the body"),
    "tcp_idle": ("tcp", "read the greeting, send nothing"),
    "tcp_line": ("tcp", "an over-long line, 512 bytes a second, no newline"),
}


@dataclass
class Tally:
    """What happened to one kind of attacker's connections."""

    opened: int = 0
    connect_failed: int = 0
    closed_attacking: int = 0  # closed by the server while the attack was on
    closed_holding: int = 0  # closed by the server after the attackers went silent
    released: int = 0  # still open at the end: closed by the attacker
    last_words: collections.Counter = field(default_factory=collections.Counter)


class Attack:
    """The attackers, on their own event loop in a daemon thread.

    :meth:`start` launches them; :meth:`stop` makes them go silent (no more bytes, no
    reconnects; open sockets stay open); :meth:`release` closes everything and
    :meth:`join` waits for the thread (cancelling what is left after its timeout).
    """

    def __init__(self, fleet: Fleet, ports: dict[str, int], seed: int = 0):
        self.fleet = fleet
        self.ports = ports
        self.tallies = {kind: Tally() for kind in KINDS}
        self.error: BaseException | None = None
        self._rng = random.Random(seed)
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task | None = None
        self._stop: asyncio.Event | None = None
        self._released: asyncio.Future | None = None

    @property
    def thread_id(self) -> int | None:
        """The attackers' thread's native id, once started."""
        return self._thread.native_id if self._thread is not None else None

    @property
    def open(self) -> int:
        """Attacker connections open now."""
        return sum(
            t.opened - t.closed_attacking - t.closed_holding - t.released
            for t in self.tallies.values()
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="attackers", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"attackers did not start: {self.error!r}")

    def _run(self) -> None:
        try:
            asyncio.run(self._all())
        except BaseException as exc:  # reported by join(), never lost in the thread
            self.error = exc
        finally:
            self._ready.set()

    async def _all(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        self._stop = asyncio.Event()
        self._released = self._loop.create_future()
        tasks = [
            asyncio.create_task(self._attacker(kind, self._rng.uniform(0, RAMP)))
            for kind in KINDS
            for _ in range(getattr(self.fleet, kind))
        ]
        self._ready.set()
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _call(self, fn: Callable[[], Any]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop just closed
                self._loop.call_soon_threadsafe(fn)

    def stop(self) -> None:
        """Go silent: no more bytes, no reconnects; open connections stay open."""
        self._call(lambda: self._stop and self._stop.set())

    def release(self) -> None:
        """Close every attacker connection; the attackers end."""

        def release() -> None:
            if self._stop is not None:
                self._stop.set()
            if self._released is not None and not self._released.done():
                self._released.set_result(None)

        self._call(release)

    def join(self, timeout: float) -> None:
        """Wait for the attackers to end; cancel them after ``timeout`` seconds."""
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("abuse: attackers still running after %.0f s; cancelling", timeout)
            self._call(lambda: self._main and self._main.cancel())
            self._thread.join(10)

    # -- in the attackers' loop ------------------------------------------------------

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds``; False at once when the attack stops."""
        assert self._stop is not None
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            return True
        return False

    def _reconnect_delay(self) -> float:
        """:data:`RECONNECT_DELAY` ± 50 %: attackers closed together do not stay in step."""
        return RECONNECT_DELAY * self._rng.uniform(0.5, 1.5)

    async def _attacker(self, kind: str, delay: float) -> None:
        tally = self.tallies[kind]
        port = self.ports[KINDS[kind][0]]
        assert self._stop is not None
        if not await self._pause(delay):
            return
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, port), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError):
                tally.connect_failed += 1
                await self._pause(self._reconnect_delay())
                continue
            tally.opened += 1
            closed, words = await self._session(kind, reader, writer)
            if not closed:
                tally.released += 1
                return
            if not self._stop.is_set():
                tally.closed_attacking += 1
            else:
                tally.closed_holding += 1
            tally.last_words[words] += 1
            await self._pause(self._reconnect_delay())

    async def _session(
        self, kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[bool, str]:
        """(whether the server closed the connection, its last words), once the server
        closed it or the attackers are released."""
        assert self._released is not None
        sender = asyncio.create_task(self._send(kind, writer))
        reading = asyncio.create_task(_last_words(reader))
        try:
            done, _ = await asyncio.wait(
                {reading, self._released}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            sender.cancel()
            reading.cancel()
            writer.transport.abort()
            await asyncio.gather(sender, reading, return_exceptions=True)
        if reading in done:
            return True, reading.result()
        return False, ""

    async def _send(self, kind: str, writer: asyncio.StreamWriter) -> None:
        """What an attacker of ``kind`` writes, until the attack stops."""
        if kind == "http_headers":
            head, unit, every = b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"a", None
        elif kind == "http_body":
            head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            head += b"Content-Length: 65536\r\n\r\n"
            unit, every = b"\xff", None
        elif kind == "tcp_line":
            head, unit, every = b"", b"a" * LINE_CHUNK, LINE_EVERY
        else:
            return  # idle: nothing at all
        every = every or TRICKLE_EVERY
        try:
            writer.write(head)
            wait = self._rng.uniform(0, every)  # not all in step
            while await self._pause(wait) and not writer.is_closing():
                writer.write(unit)
                await writer.drain()
                wait = every
        except (OSError, RuntimeError):  # the server closed it: the reader sees that
            return


HTTP_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


async def _last_words(reader: asyncio.StreamReader) -> str:
    """Read until the server closes; what it said last (an HTTP status, or the last line
    of the TCP protocol)."""
    tail = b""
    try:
        while chunk := await reader.read(4096):
            tail = (tail + chunk)[-512:]
    except OSError:
        return f"reset{' after ' + _summary(tail) if tail else ''}"
    return _summary(tail) if tail else "closed without a word"


def _summary(tail: bytes) -> str:
    statuses = HTTP_STATUS.findall(tail)
    if statuses:
        return f"HTTP {statuses[-1].decode()}"
    lines = [x.removeprefix(PROMPT.strip()).strip() for x in tail.splitlines()]
    lines = [x for x in lines if x]
    return lines[-1].decode(errors="replace")[:80] if lines else "closed without a word"


# -- the normal client ---------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One request of the normal client."""

    at: float  # time.monotonic() at its end
    ms: float
    ok: bool
    what: str  # "HTTP 200", an exception's name, a TCP error line


async def _timed(request: Awaitable[httpx.Response]) -> Sample:
    start = time.perf_counter()
    try:
        response = await request
        ok, what = response.status_code == 200, f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        ok, what = False, type(exc).__name__
    return Sample(time.monotonic(), (time.perf_counter() - start) * 1000, ok, what)


async def predict_load(url: str, body: bytes, seconds: float, out: list[Sample]) -> None:
    """POST ``body`` to /predict at :data:`CONCURRENCY` for ``seconds``."""
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, limits=limits) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                out.append(await _timed(client.post("/predict", content=body, headers=JPEG)))
                if not out[-1].ok:
                    await asyncio.sleep(FAIL_BACKOFF)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def healthz_probes(url: str, seconds: float, out: list[Sample]) -> None:
    """GET /healthz every :data:`HEALTH_EVERY` seconds for ``seconds``."""
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=PROBE_TIMEOUT) as client:
        while time.monotonic() < deadline:
            out.append(await _timed(client.get("/healthz")))
            await asyncio.sleep(max(0.0, HEALTH_EVERY - out[-1].ms / 1000))


async def tcp_session(port: int, path: str) -> Sample:
    """One TCP session: greeting, scan ``path``, quit. OK when the result came."""
    start = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(HOST, port)
            await reader.readuntil(PROMPT)
            writer.write(path.encode() + b"\n")
            reply = await reader.readuntil(PROMPT)
            ok = b"> Result for" in reply
            what = "result" if ok else _summary(reply)
            writer.write(b"quit\n")
    except TimeoutError:
        ok, what = False, "timeout"
    except asyncio.IncompleteReadError as exc:
        ok, what = False, _summary(exc.partial) if exc.partial else "closed without a word"
    except (OSError, asyncio.LimitOverrunError) as exc:
        ok, what = False, type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
    return Sample(time.monotonic(), (time.perf_counter() - start) * 1000, ok, what)


async def tcp_probes(port: int, path: str, seconds: float, out: list[Sample]) -> None:
    """A TCP session every :data:`TCP_EVERY` seconds for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out.append(await tcp_session(port, path))
        await asyncio.sleep(max(0.0, TCP_EVERY - out[-1].ms / 1000))


# -- the server's resources -----------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    fds: int
    rss_mib: float


class Watch:
    """The server's fds and RSS; an exited server is an error with its log."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.proc = psutil.Process(server.proc.pid)

    def now(self) -> Usage:
        try:
            with self.proc.oneshot():
                return Usage(self.proc.num_fds(), self.proc.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            raise RuntimeError(f"server exited:\n{self.server.log()[-1500:]}") from None

    async def settled(self, n: int = 3) -> Usage:
        """Median of ``n`` readings :data:`SAMPLE_EVERY` apart."""
        got = []
        for _ in range(n):
            got.append(self.now())
            await asyncio.sleep(SAMPLE_EVERY)
        return Usage(
            round(statistics.median(u.fds for u in got)),
            statistics.median(u.rss_mib for u in got),
        )

    def states(self) -> str:
        """The server's TCP sockets by state (LISTEN, ESTABLISHED, CLOSE_WAIT...)."""
        try:
            counts = collections.Counter(c.status for c in self.proc.net_connections("tcp"))
        except psutil.Error as exc:
            return f"n/a ({type(exc).__name__})"
        return ", ".join(f"{n:,} {state}" for state, n in counts.most_common()) or "none"

    async def sample(self, seconds: float, out: list[Usage]) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            out.append(self.now())
            await asyncio.sleep(SAMPLE_EVERY)


@dataclass
class Phase:
    """What the normal client saw in one phase, and the server's usage meanwhile."""

    seconds: float
    began: float = field(default_factory=time.monotonic)
    predicts: list[Sample] = field(default_factory=list)
    healthz: list[Sample] = field(default_factory=list)
    tcp: list[Sample] = field(default_factory=list)
    usage: list[Usage] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # cores busy, on average

    def ok_ms(self, samples: list[Sample]) -> list[float]:
        return [s.ms for s in samples if s.ok]

    def success(self, samples: list[Sample]) -> float | None:
        """Percent of ``samples`` that succeeded."""
        return 100 * sum(s.ok for s in samples) / len(samples) if samples else None

    def slowest(self, samples: list[Sample], over: float = 100.0, top: int = 5) -> str:
        """The slowest successful samples, with when they ended (s into the phase)."""
        ok = sorted((s for s in samples if s.ok), key=lambda s: -s.ms)
        if not ok:
            return "none succeeded"
        slow = sum(s.ms > over for s in ok)
        when = ", ".join(f"{s.ms:.0f} ms at {s.at - self.began:.1f} s" for s in ok[:top])
        return f"{slow:,} of {len(ok):,} over {over:g} ms; slowest: {when}"

    def failures(self, samples: list[Sample]) -> str:
        counts = collections.Counter(s.what for s in samples if not s.ok)
        return ", ".join(f"{n:,} × {what}" for what, n in counts.most_common(4)) or "none"


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(proc: psutil.Process, thread: int | None = None) -> float:
    """User + system CPU seconds of ``proc``, or of its thread ``thread`` (0 if gone)."""
    if thread is None:
        times = proc.cpu_times()
        return times.user + times.system
    return sum(t.user_time + t.system_time for t in proc.threads() if t.id == thread)


async def run_phase(
    seconds: float,
    url: str,
    body: bytes,
    tcp_port: int,
    scan_path: str,
    watch: Watch,
    attackers: int | None = None,
) -> Phase:
    """The normal client, the probes and the usage sampler for ``seconds``; and the CPU
    the server, this process and its attackers' thread (native id ``attackers``) used."""
    phase = Phase(seconds, time.monotonic())
    me = psutil.Process()
    procs = {"server": (watch.proc, None), "benchmark process": (me, None)}
    if attackers is not None:
        procs["its attackers' thread"] = (me, attackers)
    start = {name: cpu_seconds(*how) for name, how in procs.items()}
    began = time.monotonic()
    work = asyncio.gather(
        predict_load(url, body, seconds, phase.predicts),
        healthz_probes(url, seconds, phase.healthz),
        tcp_probes(tcp_port, scan_path, seconds, phase.tcp),
        watch.sample(seconds, phase.usage),
    )
    await asyncio.wait_for(work, seconds + REQUEST_TIMEOUT + PROBE_TIMEOUT)
    wall = time.monotonic() - began
    with contextlib.suppress(psutil.Error):
        phase.cpu = {n: (cpu_seconds(*how) - start[n]) / wall for n, how in procs.items()}
    return phase


@dataclass
class Run:
    """Everything one abuse run measured."""

    quiet: Phase
    abuse: Phase
    before: Usage
    at_stop: Usage
    after: Usage
    after_release: Usage
    back_after: float | None  # seconds from the end of the attack to fds back; None: never
    after_bound: float
    settle: float  # seconds waited before the "before" and "after release" readings
    at_stop_states: str  # the server's sockets by state when the attack stopped
    after_states: str  # and at the "after" reading
    ramp_open: int  # attacker connections open when the measured window began
    peak_open: int  # most attacker connections open at once (attacker side)
    profile: str
    tallies: dict[str, Tally]


async def abuse_run(
    server: ServerProcess,
    fleet: Fleet,
    timings: Timings,
    after_bound: float,
    body: bytes,
    scan_path: str,
    settle: float = SETTLE,
) -> Run:
    """Quiet phase, abuse phase (+ a profile), then the wait for the server to recover.

    The "before" and "after release" readings come ``settle`` seconds after the clients
    closed their connections (more than the server's keep-alive deadline: a server may
    notice a closed idle connection only then).
    """
    url, tcp_port = server.url, server.tcp_port
    watch = Watch(server)
    warm: list[Sample] = []
    await predict_load(url, body, WARM_UP, warm)
    await tcp_probes(tcp_port, scan_path, 0.1, warm)
    if not all(s.ok for s in warm):
        raise RuntimeError(f"warm-up failed: {Phase(0).failures(warm)}")
    log.info("abuse: quiet phase (%.0f s)", timings.quiet)
    quiet = await run_phase(timings.quiet, url, body, tcp_port, scan_path, watch)
    await asyncio.sleep(settle)  # the quiet client's connections closed
    before = await watch.settled()
    log.info("abuse: before the attack %s", before)
    attack = Attack(fleet, {"http": server.http_port, "tcp": tcp_port})
    try:
        attack.start()
        await asyncio.sleep(RAMP + 1.0)
        ramp_open = attack.open
        log.info("abuse: %d attackers connected; measuring %.0f s", ramp_open, timings.abuse)
        peak = [ramp_open]

        async def count_open(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                peak.append(attack.open)
                await asyncio.sleep(SAMPLE_EVERY)

        abuse, _ = await asyncio.gather(
            run_phase(timings.abuse, url, body, tcp_port, scan_path, watch, attack.thread_id),
            count_open(timings.abuse),
        )
        log.info("abuse: profiling the server for %.0f s", timings.profile)
        profile, _ = await asyncio.wait_for(
            asyncio.gather(
                asyncio.to_thread(
                    hot_spots, PROJECT, pid=server.proc.pid, during=_sleeper(timings.profile)
                ),
                predict_load(url, body, timings.profile + 0.5, []),
            ),
            timings.profile + 120,
        )
        attack.stop()
        stopped = time.monotonic()
        at_stop, at_stop_states = watch.now(), watch.states()
        log.info("abuse: attack stopped (%s); waiting up to %.0f s", at_stop, after_bound)
        back_after = None
        while time.monotonic() - stopped < after_bound:
            if watch.now().fds <= before.fds + FD_SLACK:
                back_after = time.monotonic() - stopped
                break
            await asyncio.sleep(SAMPLE_EVERY)
        after, after_states = await watch.settled(), watch.states()
        log.info("abuse: after %s (back after %s s)", after, fmt(back_after))
        attack.release()
        await asyncio.to_thread(attack.join, 20)
        await asyncio.sleep(settle)
        after_release = await watch.settled()
    finally:
        attack.release()
        await asyncio.to_thread(attack.join, 20)
    if attack.error is not None:
        raise RuntimeError(f"attackers failed: {attack.error!r}")
    return Run(
        quiet=quiet,
        abuse=abuse,
        before=before,
        at_stop=at_stop,
        after=after,
        after_release=after_release,
        back_after=back_after,
        after_bound=after_bound,
        settle=settle,
        at_stop_states=at_stop_states,
        after_states=after_states,
        ramp_open=ramp_open,
        peak_open=max(peak),
        profile=profile,
        tallies=attack.tallies,
    )


def _sleeper(seconds: float) -> Callable[[], None]:
    return lambda: time.sleep(seconds)


@contextlib.contextmanager
def open_files(needed: int) -> Iterator[tuple[int, int]]:
    """This process's RLIMIT_NOFILE soft limit raised to its hard limit (restored
    afterwards); fails when that is below ``needed``. Yields (soft, hard) in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target < needed:
        raise RuntimeError(f"open-file limit {target} < {needed} sockets the attack needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield target, hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def server_deadlines(overrides: dict[str, float]) -> dict[str, float]:
    """The deadlines in ``serve.yaml`` (those the server has), with ``overrides``."""
    settings = yaml.safe_load((PROJECT / "serve.yaml").read_text(encoding="utf-8")) or {}
    found = {k: float(settings[k]) for k in DEADLINES if k in settings}
    return found | {k: v for k, v in overrides.items() if k in found}


def bench(settings: Settings, corpus: Corpus | None = None) -> Result:
    """The normal client's success and latency under abuse against a quiet server."""
    result = Result("abuse", "Serving under abuse")
    if not (PROJECT / "serve" / "server.py").is_file():
        raise FileNotFoundError("serve/server.py does not exist yet")
    fleet = Fleet().scaled(0.1) if settings.quick else Fleet()
    timings = QUICK if settings.quick else FULL
    overrides = QUICK_DEADLINES if settings.quick else {}
    deadlines = server_deadlines(overrides)
    flags = [f"--{k.replace('_', '-')}={v:g}" for k, v in deadlines.items() if k in overrides]
    # a closed keep-alive connection may be noticed only at the HTTP idle deadline (the
    # old server: uvicorn's 5 s keep-alive)
    settle = max(SETTLE, deadlines.get("http_idle_timeout", 5.0) + 1.0)
    after_bound = min(max(deadlines.values(), default=0.0) + AFTER_MARGIN, timings.after_cap)
    body = jpeg(0, PAYLOAD_SIZE)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with temp_dir(settings, "abuse") as tmp:
        bundle = write_served_bundle(tmp / "models" / "bundle.zip", SIZE)
        scan = tmp / "scan"
        scan.mkdir()
        (scan / "probe.jpg").write_bytes(jpeg(1, PAYLOAD_SIZE))
        server = ServerProcess(
            tmp,
            bundle,
            *("--scan-root", str(scan), "--reload-poll-seconds", "0"),
            *("--log-level", "WARNING", *flags),
        )
        try:
            server_limit = psutil.Process(server.proc.pid).rlimit(psutil.RLIMIT_NOFILE)
            with open_files(fleet.total + 256) as ours:
                probe = str(scan / "probe.jpg")
                run = asyncio.run(
                    abuse_run(server, fleet, timings, after_bound, body, probe, settle)
                )
        finally:
            code = server.stop()
    result.figures += figures(run)
    result.notes += notes(run, fleet, timings, deadlines, flags, server_limit, ours, code)
    result.notes.append(f"Payload: one {PAYLOAD_SIZE[0]}x{PAYLOAD_SIZE[1]} JPEG, {len(body)} B.")
    return result


def figures(run: Run) -> list[Figure]:
    quiet, abuse = run.quiet, run.abuse
    base = "the same client on the quiet server, same run"
    out = [
        Figure(
            "/predict success rate under abuse (c=4)",
            "%",
            abuse.success(abuse.predicts),
            quiet.success(quiet.predicts),
            base,
            goal_on="ours",
            goal_value=100.0,
        ),
        Figure(
            "/predict throughput under abuse",
            "requests/s",
            sum(s.ok for s in abuse.predicts) / abuse.seconds,
            sum(s.ok for s in quiet.predicts) / quiet.seconds,
            base,
        ),
    ]
    for q, goal in ((0.5, None), (0.99, 2.0)):
        out.append(
            Figure(
                f"/predict p{round(q * 100)} latency under abuse",
                "ms",
                percentile(abuse.ok_ms(abuse.predicts), q),
                percentile(quiet.ok_ms(quiet.predicts), q),
                base,
                goal_op="<=",
                goal_value=goal,
            )
        )
    out += [
        Figure(
            "/healthz p99 latency under abuse",
            "ms",
            percentile(abuse.ok_ms(abuse.healthz), 0.99),
            percentile(quiet.ok_ms(quiet.healthz), 0.99),
            "/healthz every 0.5 s on the quiet server",
        ),
        Figure(
            "/healthz success rate under abuse",
            "%",
            abuse.success(abuse.healthz),
            quiet.success(quiet.healthz),
            "/healthz every 0.5 s on the quiet server",
        ),
        Figure(
            "TCP session (scan one image) success rate under abuse",
            "%",
            abuse.success(abuse.tcp),
            quiet.success(quiet.tcp),
            "a TCP session every second on the quiet server",
        ),
        Figure(
            "TCP session p99 latency under abuse",
            "ms",
            percentile(abuse.ok_ms(abuse.tcp), 0.99),
            percentile(quiet.ok_ms(quiet.tcp), 0.99),
            "a TCP session every second on the quiet server",
        ),
    ]
    before = "the server before the attack (after the quiet phase)"
    peak_fds = max((u.fds for u in abuse.usage), default=None)
    peak_rss = max((u.rss_mib for u in abuse.usage), default=None)
    out += [
        Figure("server open fds during abuse (peak)", "fds", peak_fds, run.before.fds, before),
        Figure(
            "server open fds after the attack (attackers silent, sockets held)",
            "fds",
            run.after.fds,
            run.before.fds,
            before,
            goal_on="diff",
            goal_op="<=",
            goal_value=FD_SLACK,
        ),
        Figure("server RSS during abuse (peak)", "MiB", peak_rss, run.before.rss_mib, before),
        Figure(
            "server RSS after the attack",
            "MiB",
            run.after.rss_mib,
            run.before.rss_mib,
            before,
            goal_op="<=",
            goal_value=RSS_RATIO,
        ),
    ]
    return out


def notes(
    run: Run,
    fleet: Fleet,
    timings: Timings,
    deadlines: dict[str, float],
    flags: list[str],
    server_limit: tuple[int, int],
    ours: tuple[int, int],
    code: int,
) -> list[str]:
    quiet, abuse = run.quiet, run.abuse
    cpu = (
        ", ".join(
            f"{name} {fmt(quiet.cpu.get(name), 2)} → {fmt(value, 2)}"
            for name, value in abuse.cpu.items()
        )
        or "not measured"
    )
    kinds = ", ".join(f"{getattr(fleet, k):,} × {k} ({KINDS[k][1]})" for k in KINDS)
    out = [
        f"Attack: {fleet.total:,} connections: {kinds}; an attacker the server closes "
        f"reconnects after {RECONNECT_DELAY:g} s ± 50 %. Start times spread over {RAMP:g} s; "
        f"{run.ramp_open:,} were connected when the measured {timings.abuse:g} s began, at "
        f"most {run.peak_open:,} at once. Quiet phase {timings.quiet:g} s before it.",
        f"Normal client: httpx AsyncClient, c={CONCURRENCY}, keep-alive, POST /predict "
        f"(image/jpeg), {REQUEST_TIMEOUT:g} s timeout, {FAIL_BACKOFF:g} s pause after a "
        f"failure; latencies are of successful requests (n/a: none succeeded), after "
        f"{WARM_UP:g} s of unmeasured warm-up. {len(quiet.predicts):,} requests "
        f"quiet (failures: {quiet.failures(quiet.predicts)}), {len(abuse.predicts):,} under "
        f"abuse (failures: {abuse.failures(abuse.predicts)}).",
        f"/healthz probes: {len(abuse.healthz)} under abuse (failures: "
        f"{abuse.failures(abuse.healthz)}). TCP sessions (connect, greeting, scan one image, "
        f"quit; {PROBE_TIMEOUT:g} s limit): {len(abuse.tcp)} under abuse (failures: "
        f"{abuse.failures(abuse.tcp)}).",
        f"Slow requests under abuse: /predict {abuse.slowest(abuse.predicts)}; /healthz "
        f"{abuse.slowest(abuse.healthz)}; TCP sessions {abuse.slowest(abuse.tcp)}. Quiet: "
        f"/predict {quiet.slowest(quiet.predicts, top=2)}; /healthz "
        f"{quiet.slowest(quiet.healthz, top=2)}.",
    ]
    for kind, t in run.tallies.items():
        words = ", ".join(f"{n:,} × {w!r}" for w, n in t.last_words.most_common(3)) or "-"
        out.append(
            f"Attackers {kind}: {t.opened:,} connections opened ({t.connect_failed:,} connects "
            f"failed); the server closed {t.closed_attacking:,} during the attack and "
            f"{t.closed_holding:,} after the attackers went silent; still open at the end: "
            f"{t.released:,}. Server's last words: {words}."
        )
    deadline_text = ", ".join(f"{k} {v:g} s" for k, v in deadlines.items()) or "none found"
    back = (
        f"back within {FD_SLACK} of before after {run.back_after:.1f} s"
        if run.back_after is not None
        else f"not back within {FD_SLACK} of before in {run.after_bound:g} s"
    )
    out += [
        f"After the attack the attackers sent nothing more but kept their sockets open "
        f"({run.at_stop.fds:,} server fds at that moment); the server's fds were {back} "
        f"(the wait is bounded by its longest deadline + {AFTER_MARGIN:g} s, at most "
        f"{timings.after_cap:g} s). Server sockets when the attack stopped: "
        f"{run.at_stop_states}; at the after reading: {run.after_states}. The before reading "
        f"came {run.settle:g} s after the quiet clients closed. Once the attackers closed "
        f"everything (read {run.settle:g} s later): "
        f"{run.after_release.fds} fds, {run.after_release.rss_mib:.0f} MiB RSS.",
        f"Server deadlines in effect (serve.yaml{', ' + ' '.join(flags) if flags else ''}): "
        f"{deadline_text}. Server open-file limit (soft, hard): {server_limit}; this "
        f"process's raised to {ours}. Server exit code after SIGTERM: {code}.",
        "Loopback; attackers, client and server share the machine's cores (the attackers "
        f"on their own event loop thread in the benchmark process). CPU, in cores busy on "
        f"average, quiet → under abuse: {cpu}.",
        f"py-spy of the server under abuse ({timings.profile:g} s after the measured window, "
        f"client still running; all threads, idle ones dropped): {run.profile}.",
    ]
    return out
