"""The origin's TCP line protocol (port 1235), as seen in a telnet session::

    <blank><blank>Welcome! Enter image path to scan
    # Path: /srv/data/images/
    > Scanning: /srv/data/images/
    > Result for : /srv/data/images/
    <blank>
    {JSON: path -> {class: probability}, "__decision__", "__errors__", "__time__"}
    <blank>
    # Path: ...

Unlike the origin, whole lines are read (partial writes are buffered; ``\\r\\n`` and telnet
option bytes are stripped), and paths are confined to the scan roots: ``..``, absolute
paths outside the roots and symlinks that escape them are refused with ``> Error: ...``
and the session goes on. ``quit`` or ``exit`` closes it. A folder is scanned
non-recursively: listed off the event loop, classified ``max_batch`` files at a time and
its JSON document written as it is classified (same document, pretty-printed, as if written
at once); when the client goes away, the scan stops.

Every session has deadlines, so none holds its slot without making progress:

- ``idle_timeout``: at the prompt, for a line to start (its first byte), else the session
  is closed with a one-line notice;
- ``line_timeout``: from a line's first byte to its newline, else closed. A line longer than
  :data:`MAX_LINE` is discarded up to its newline (under the same deadline) and answered
  with ``> Error: line longer than ...``; the line after it is answered as usual;
- ``drain_timeout``: for the client to take each part of a reply (the write buffer to
  drain), else the connection is dropped.

At ``max_clients`` sessions a newcomer is still let in when some session sits idle at the
prompt: the one idle the longest is closed with a notice to make room (as nginx reuses its
idle keep-alive connections when it runs out). Only when every session is in the middle of
a line or a reply is the newcomer refused.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from imgclf.config import PATHS
from imgclf.serving.batching import Overloaded
from imgclf.serving.listing import scan
from imgclf.serving.output import TIME_KEY, StreamedDocument
from imgclf.serving.service import InferenceService, NotReady

log = logging.getLogger(__name__)

GREETING = b"\n\nWelcome! Enter image path to scan\n"
PROMPT = b"# Path: "
TELNET_COMMANDS = re.compile(rb"\xff[\xfb-\xfe].|\xff[\xf0-\xfa]", re.DOTALL)
MAX_LINE = 4096  # bytes in a line, without its newline
READ_CHUNK = 65536
TOO_MANY = b"> Error: too many connections, try again later\n"
MADE_ROOM = "\n> Error: closed after being idle the longest, to make room for another client\n"
ESCAPED = {"error": "symlink outside the scan roots"}
BUSY_RETRY = 0.05  # seconds between tries when the service is full in the middle of a folder
BUSY_GIVE_UP = 10.0  # ... and how long to keep trying before answering "server busy"

Entry = tuple[str, Path | None]  # the name to answer under; the real file, None if refused


class PathRefused(ValueError):
    """A path the client may not scan; the message is shown to the client."""


class _Closing(Exception):
    """End the session; ``notice`` is the last line the client gets."""

    def __init__(self, notice: str):
        super().__init__(notice)
        self.notice = notice


class _Stalled(Exception):
    """The client did not take a reply within the drain deadline: drop the connection."""


class _TooLong:
    """What :meth:`_Session.read_line` returns for a line over :data:`MAX_LINE` bytes."""


TOO_LONG = _TooLong()


def within(real: Path, roots: Sequence[Path]) -> bool:
    """Whether a resolved path lies in one of the (resolved) ``roots``."""
    return any(real.is_relative_to(root) for root in roots)


def confine(text: str, roots: Sequence[Path], base: Path = PATHS.root) -> Path:
    """Resolve a client path (relative ones against ``base``), refusing anything outside
    ``roots`` after following symlinks."""
    if not text:
        raise PathRefused("empty path")
    if "\x00" in text:
        raise PathRefused("path contains a NUL byte")
    if ".." in Path(text).parts:
        raise PathRefused("'..' is not allowed in paths")
    try:
        real = (base / Path(text).expanduser()).resolve()  # follows symlinks, even dangling
    except RuntimeError:  # Python < 3.13 on a symlink loop
        raise PathRefused(f"symbolic link loop: {text}") from None
    if not within(real, roots):
        raise PathRefused(f"outside the scan roots: {text}")
    if not real.exists():
        raise PathRefused(f"no such file or directory: {text}")
    return real


class TcpServer:
    """asyncio server speaking the origin's protocol over :class:`InferenceService`.

    The deadlines (seconds) and ``max_clients`` are described in the module's docstring.
    """

    def __init__(
        self,
        service: InferenceService,
        roots: Sequence[Path],
        idle_timeout: float,
        max_clients: int,
        *,
        line_timeout: float,
        drain_timeout: float,
    ):
        self.service = service
        self.roots = [Path(r).resolve() for r in roots]
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        self.line_timeout = line_timeout
        self.drain_timeout = drain_timeout
        self.sessions: set[_Session] = set()

    @property
    def clients(self) -> int:
        """Sessions holding a slot."""
        return len(self.sessions)

    @asynccontextmanager
    async def listening(self, host: str, port: int) -> AsyncIterator[asyncio.Server]:
        """Accept clients on ``host:port`` until the block ends."""
        server = await asyncio.start_server(self.handle, host, port, limit=MAX_LINE)
        try:
            yield server
        finally:
            server.close()
            try:
                await asyncio.wait_for(server.wait_closed(), 2)
            except TimeoutError:
                log.warning("tcp clients still connected at shutdown")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client session: greet, then answer one path per line until EOF."""
        if len(self.sessions) >= self.max_clients and not self._make_room():
            writer.write(TOO_MANY)
            await _close(writer, min(self.drain_timeout, 1.0))
            return
        session = _Session(self, reader, writer)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    def _make_room(self) -> bool:
        """Close the session idle at the prompt for the longest; False when none is idle."""
        idle = [s for s in self.sessions if s.idle_since is not None]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.idle_since or 0.0)
        self.sessions.discard(victim)  # its slot is free now; it says goodbye on its own
        victim.evict()
        return True

    async def answer(self, session: _Session, text: str) -> None:
        """Reply to one path line: header lines, then the JSON document, written as the
        files are classified; or an error line."""
        start = time.perf_counter()
        await session.send(f"> Scanning: {text}\n".encode())
        step = self.service.batcher.max_batch
        try:
            entries, skipped = await asyncio.to_thread(self._entries, text)
            first = await self._classify(entries[:step])
        except PathRefused as exc:
            error = str(exc)
        except (Overloaded, NotReady) as exc:
            error = f"{exc}, try again"
        except OSError as exc:  # e.g. a folder we may not read
            error = f"cannot read {text}: {exc.strerror or exc}"
        except Exception:  # a bug must not end the session
            log.exception("tcp request %r failed", text)
            error = "internal error"
        else:
            error = None
        if error is not None:
            await session.send(f"> Error: {error}\n".encode())
            return
        doc = StreamedDocument()
        await session.send(
            f"> Result for : {text}\n\n{doc.begin()}{doc.add(first)}".encode(),
        )
        for offset in range(step, len(entries), step):
            if session.gone:  # the last write failed: the client has left
                raise ConnectionResetError("client gone")
            answers = await self._classify(entries[offset : offset + step], waiting=True)
            await session.send(doc.add(answers).encode())
        doc.add(skipped.items())
        elapsed = round(time.perf_counter() - start, 6)
        for piece in doc.end({TIME_KEY: elapsed}):
            await session.send(piece.encode())
            await asyncio.sleep(0)  # a big document's tail: let others in between pieces
        await session.send(b"\n\n")

    def _entries(self, text: str) -> tuple[list[Entry], dict[str, dict[str, Any]]]:
        """What a path line names: the file, or the images directly in the folder (those
        whose symlinks escape the scan roots refused), sorted; and every other entry of the
        folder (FIFO, dangling link, link loop...) with the reason it is not classified.
        Blocking (file system calls): run it off the event loop."""
        path = confine(text, self.roots)
        if path.is_file():
            return [(text, path)], {}
        if not path.is_dir():
            raise PathRefused(f"not a file or folder: {text}")
        listing = scan(path)
        if path in listing.skipped:  # the folder itself
            raise PathRefused(f"{listing.skipped[path]}: {text}")
        prefix = text.rstrip("/")
        entries = sorted((f"{prefix}/{file.name}", self._inside(file)) for file in listing.files)
        skipped = {f"{prefix}/{p.name}": {"error": why} for p, why in listing.skipped.items()}
        return entries, skipped

    def _inside(self, path: Path) -> Path | None:
        """The real file behind ``path``; None when it lies outside the scan roots."""
        real = path.resolve()
        return real if within(real, self.roots) else None

    async def _classify(
        self, entries: list[Entry], waiting: bool = False
    ) -> list[tuple[str, dict[str, Any]]]:
        """Answers for ``entries`` (at most ``max_batch``), in their order. ``waiting``: in
        the middle of a folder, a full service is waited for (up to :data:`BUSY_GIVE_UP`
        seconds, then the files are answered "server busy") rather than raising
        :class:`Overloaded`."""
        allowed = [(name, real) for name, real in entries if real is not None]
        answers: dict[str, dict[str, Any]] = {name: ESCAPED for name, real in entries if not real}
        give_up = time.monotonic() + BUSY_GIVE_UP
        while allowed:
            try:
                results, _ = await self.service.classify(allowed)
            except Overloaded as exc:
                if not waiting:
                    raise
                if time.monotonic() < give_up:
                    await asyncio.sleep(BUSY_RETRY)
                    continue
                results = [{"name": name, "error": f"{exc}, not classified"} for name, _ in allowed]
            except Exception:  # in the middle of a folder: these files fail, not the folder
                if not waiting:
                    raise
                log.exception("tcp: classifying %d files failed", len(allowed))
                results = [{"name": name, "error": "internal error"} for name, _ in allowed]
            answers.update((result["name"], result) for result in results)
            break
        return [(name, answers[name]) for name, _ in entries]


class _Session:
    """One client: its read buffer, its state (idle at the prompt or not) and its
    deadlines."""

    def __init__(
        self, server: TcpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = writer.get_extra_info("peername")
        self.task = asyncio.current_task()
        self.buffer = bytearray()
        self.idle_since: float | None = None  # loop time it went idle at the prompt
        self.evicted = False

    @property
    def gone(self) -> bool:
        """Whether the connection is closing (a write failed: the client has left)."""
        return self.writer.transport.is_closing()

    def evict(self) -> None:
        """Close this idle session to make room for another (it writes the notice)."""
        log.info("tcp client %s idle the longest: closed to make room", self.peer)
        self.evicted = True
        if self.task is not None:
            self.task.cancel()

    async def run(self) -> None:
        """Greet, then prompt, read a line, reply; until EOF, ``quit``, a deadline or
        eviction. Always closes the connection."""
        log.info("tcp client %s connected", self.peer)
        grace = self.server.drain_timeout
        try:
            await self.send(GREETING)
            await self._converse()
        except _Closing as exc:
            log.info("tcp client %s: %s", self.peer, exc.notice.strip())
            self.writer.write(exc.notice.encode())
        except _Stalled:
            log.info("tcp client %s did not read its reply: dropped", self.peer)
            grace = 0.0
        except (ConnectionError, OSError):
            grace = 0.0
        finally:
            self.server.sessions.discard(self)  # closing holds no slot
            await _close(self.writer, grace)
            log.info("tcp client %s gone", self.peer)

    async def _converse(self) -> None:
        while True:
            await self.send(PROMPT)
            raw = await self.read_line()
            if raw is None:
                return
            if raw is TOO_LONG:
                await self.send(f"> Error: line longer than {MAX_LINE} bytes\n".encode())
                continue
            assert isinstance(raw, bytes)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                await self.send(b"> Error: path is not valid UTF-8\n")
                continue
            if line.lower() in ("quit", "exit"):
                await self.send(b"> Bye\n")
                return
            if line:
                await self.server.answer(self, line)

    async def send(self, data: bytes) -> None:
        """Write ``data``; raises :class:`_Stalled` when the client does not take it (the
        write buffer back under its low-water mark) within the drain deadline."""
        self.writer.write(data)
        try:
            await asyncio.wait_for(self.writer.drain(), self.server.drain_timeout)
        except TimeoutError:
            raise _Stalled from None

    def _started(self) -> bool:
        """Whether a line has started (anything but telnet commands is buffered)."""
        return len(self.buffer) > MAX_LINE or bool(TELNET_COMMANDS.sub(b"", self.buffer))

    async def read_line(self) -> bytes | _TooLong | None:
        """The next line without telnet commands, ``\\r\\n`` and surrounding blanks;
        :data:`TOO_LONG` for a line over :data:`MAX_LINE` bytes (discarded up to its
        newline); ``None`` at EOF. Raises :class:`_Closing` past the idle deadline (or when
        evicted) and past the line deadline."""
        loop = asyncio.get_running_loop()
        if not self._started():
            self.idle_since = loop.time()
            try:
                while not self._started():
                    if not await self._fill(self.idle_since + self.server.idle_timeout):
                        return None
            except TimeoutError:
                raise _Closing(
                    f"\n> Error: idle for {self.server.idle_timeout:g} s, closing\n"
                ) from None
            except asyncio.CancelledError:
                if not self.evicted:
                    raise
            finally:
                self.idle_since = None
            if self.evicted:  # (a line may have come just as it was evicted: too late)
                if self.task is not None and self.task.cancelling():
                    self.task.uncancel()
                raise _Closing(MADE_ROOM)
        deadline = loop.time() + self.server.line_timeout
        too_long = False
        try:
            while (end := self.buffer.find(b"\n")) < 0:
                if len(self.buffer) > MAX_LINE:  # discard, but keep looking for its end
                    too_long = True
                    self.buffer.clear()
                if not await self._fill(deadline):
                    return None
        except TimeoutError:
            raise _Closing(
                f"\n> Error: line not finished within {self.server.line_timeout:g} s, closing\n"
            ) from None
        raw = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        if too_long or end > MAX_LINE:
            return TOO_LONG
        return TELNET_COMMANDS.sub(b"", raw).strip()

    async def _fill(self, deadline: float) -> bool:
        """Read what the client sent next into the buffer, by ``deadline`` (loop time, else
        TimeoutError); False at EOF."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError
        chunk = await asyncio.wait_for(self.reader.read(READ_CHUNK), remaining)
        self.buffer += chunk
        return bool(chunk)


async def _close(writer: asyncio.StreamWriter, grace: float) -> None:
    """Close the connection, giving what is still buffered ``grace`` seconds to reach the
    client; then drop it."""
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), grace)
    except TimeoutError:
        writer.transport.abort()
    except (ConnectionError, OSError):
        pass
