"""The origin's TCP line protocol (port 1235), as seen in a telnet session::

    <blank><blank>Welcome! Enter image path to scan
    # Path: /srv/data/images/
    > Scanning: /srv/data/images/
    > Result for : /srv/data/images/
    <blank>
    {JSON: path -> {class: probability}, "__decision__", "__time__"}
    <blank>
    # Path: ...

Unlike the origin, whole lines are read (partial writes are buffered; ``\\r\\n`` and telnet
option bytes are stripped), and paths are confined to the scan roots: ``..``, absolute
paths outside the roots and symlinks that escape them are refused with ``> Error: ...``
and the session goes on. ``quit`` or ``exit`` closes it. A folder is scanned
non-recursively, in batches.
"""

from __future__ import annotations

import asyncio
import json
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
from imgclf.serving.output import TIME_KEY, origin_document
from imgclf.serving.service import InferenceService, NotReady

log = logging.getLogger(__name__)

GREETING = b"\n\nWelcome! Enter image path to scan\n"
PROMPT = b"# Path: "
TELNET_COMMANDS = re.compile(rb"\xff[\xfb-\xfe].|\xff[\xf0-\xfa]", re.DOTALL)
MAX_LINE = 4096
ESCAPED = {"error": "symlink outside the scan roots"}

Entry = tuple[str, Path | None]  # the name to answer under; the real file, None if refused


class PathRefused(ValueError):
    """A path the client may not scan; the message is shown to the client."""


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
    real = (base / Path(text).expanduser()).resolve()  # follows symlinks, even dangling
    if not within(real, roots):
        raise PathRefused(f"outside the scan roots: {text}")
    if not real.exists():
        raise PathRefused(f"no such file or directory: {text}")
    return real


class TcpServer:
    """asyncio server speaking the origin's protocol over :class:`InferenceService`."""

    def __init__(
        self,
        service: InferenceService,
        roots: Sequence[Path],
        idle_timeout: float = 300.0,
        max_clients: int = 32,
    ):
        self.service = service
        self.roots = [Path(r).resolve() for r in roots]
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        self.clients = 0

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
        peer = writer.get_extra_info("peername")
        if self.clients >= self.max_clients:
            writer.write(b"> Error: too many connections, try again later\n")
            await _close(writer)
            return
        self.clients += 1
        log.info("tcp client %s connected", peer)
        try:
            writer.write(GREETING)
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.clients -= 1
            await _close(writer)
            log.info("tcp client %s gone", peer)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Prompt, read a line, reply; until EOF, idle timeout, ``quit`` or ``exit``."""
        while True:
            writer.write(PROMPT)
            await writer.drain()
            line = await self._read_line(reader, writer)
            if line is None:
                return
            if line.lower() in ("quit", "exit"):
                writer.write(b"> Bye\n")
                return
            if line:
                writer.write(await self.reply(line))

    async def _read_line(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> str | None:
        """The next whole line without ``\\r\\n`` and telnet commands; ``None`` at EOF."""
        while True:
            try:
                raw = await asyncio.wait_for(reader.readuntil(b"\n"), self.idle_timeout)
            except TimeoutError:
                writer.write(b"\n> Error: idle timeout, closing\n")
                return None
            except asyncio.IncompleteReadError:
                return None
            except asyncio.LimitOverrunError:
                await _discard_line(reader)
                writer.write(f"> Error: line longer than {MAX_LINE} bytes\n".encode())
                writer.write(PROMPT)
                continue
            raw = TELNET_COMMANDS.sub(b"", raw).rstrip(b"\r\n").strip()
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                writer.write(b"> Error: path is not valid UTF-8\n")
                writer.write(PROMPT)

    async def reply(self, text: str) -> bytes:
        """The full reply to one path line."""
        head = f"> Scanning: {text}\n"
        start = time.perf_counter()
        try:
            entries, skipped = self._entries(text)
            answers = sorted([*await self._classify_all(entries), *skipped.items()])
        except PathRefused as exc:
            return f"{head}> Error: {exc}\n".encode()
        except (Overloaded, NotReady) as exc:
            return f"{head}> Error: {exc}, try again\n".encode()
        except OSError as exc:  # e.g. a folder we may not read
            return f"{head}> Error: cannot read {text}: {exc.strerror or exc}\n".encode()
        except Exception:  # a bug must not end the session
            log.exception("tcp request %r failed", text)
            return f"{head}> Error: internal error\n".encode()
        doc = origin_document(answers)
        doc[TIME_KEY] = round(time.perf_counter() - start, 6)
        body = json.dumps(doc, indent=2)
        return f"{head}> Result for : {text}\n\n{body}\n\n".encode()

    def _entries(self, text: str) -> tuple[list[Entry], dict[str, dict[str, Any]]]:
        """What a path line names: the file, or the images directly in the folder (those
        whose symlinks escape the scan roots refused); and every other entry of the folder
        (FIFO, dangling link, link loop...) with the reason it is not classified."""
        path = confine(text, self.roots)
        if path.is_file():
            return [(text, path)], {}
        if not path.is_dir():
            raise PathRefused(f"not a file or folder: {text}")
        listing = scan(path)
        if path in listing.skipped:  # the folder itself
            raise PathRefused(f"{listing.skipped[path]}: {text}")
        prefix = text.rstrip("/")
        entries = [(f"{prefix}/{file.name}", self._inside(file)) for file in listing.files]
        skipped = {f"{prefix}/{p.name}": {"error": why} for p, why in listing.skipped.items()}
        return entries, skipped

    def _inside(self, path: Path) -> Path | None:
        """The real file behind ``path``; None when it lies outside the scan roots."""
        real = path.resolve()
        return real if within(real, self.roots) else None

    async def _classify_all(self, entries: list[Entry]) -> list[tuple[str, dict[str, Any]]]:
        """Answers in ``entries``' order, classified ``max_batch`` at a time (so a big
        folder never asks for more than the admission limit at once)."""
        answers: dict[str, dict[str, Any]] = {name: ESCAPED for name, real in entries if not real}
        allowed = [(name, real) for name, real in entries if real is not None]
        step = self.service.batcher.max_batch
        for start in range(0, len(allowed), step):
            results, _ = await self.service.classify(allowed[start : start + step])
            answers.update((result["name"], result) for result in results)
        return [(name, answers[name]) for name, _ in entries]


async def _discard_line(reader: asyncio.StreamReader) -> None:
    while True:
        chunk = await reader.read(MAX_LINE)
        if not chunk or b"\n" in chunk:
            return


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass
