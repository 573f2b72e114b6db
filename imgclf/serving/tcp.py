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
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from imgclf.config import PATHS
from imgclf.serving.batching import NotReady, Overloaded
from imgclf.serving.output import TIME_KEY, origin_document
from imgclf.serving.service import InferenceService

log = logging.getLogger(__name__)

GREETING = b"\n\nWelcome! Enter image path to scan\n"
PROMPT = b"# Path: "
TELNET_COMMANDS = re.compile(rb"\xff[\xfb-\xfe].|\xff[\xf0-\xfa]", re.DOTALL)
MAX_LINE = 4096


class PathRefused(ValueError):
    """A path the client may not scan; the message is shown to the client."""


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
    if not any(real.is_relative_to(root) for root in roots):
        raise PathRefused(f"outside the scan roots: {text}")
    if not real.exists():
        raise PathRefused(f"no such file or directory: {text}")
    return real


def folder_files(folder: Path, roots: Sequence[Path]) -> list[tuple[str, Path | None]]:
    """Regular files directly in ``folder`` (sorted); escaping symlinks map to ``None``."""
    out: list[tuple[str, Path | None]] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        real = Path(entry.path).resolve()
        inside = any(real.is_relative_to(root) for root in roots)
        if inside and real.is_file():
            out.append((entry.name, real))
        elif not inside:
            out.append((entry.name, None))
    return out


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
            while True:
                writer.write(PROMPT)
                await writer.drain()
                line = await self._read_line(reader, writer)
                if line is None:
                    break
                if not line:
                    continue
                if line.lower() in ("quit", "exit"):
                    writer.write(b"> Bye\n")
                    break
                writer.write(await self.answer(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.clients -= 1
            await _close(writer)
            log.info("tcp client %s gone", peer)

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

    async def answer(self, text: str) -> bytes:
        """The full reply to one path line."""
        head = f"> Scanning: {text}\n"
        start = time.perf_counter()
        try:
            path = confine(text, self.roots)
            if path.is_dir():
                entries = folder_files(path, self.roots)
                prefix = text.rstrip("/")
                items = [(f"{prefix}/{name}", real) for name, real in entries]
            elif path.is_file():
                items = [(text, path)]
            else:
                raise PathRefused(f"not a file or folder: {text}")
            answers = await self._classify(items)
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

    async def _classify(self, items: list[tuple[str, Path | None]]) -> list[tuple[str, dict]]:
        refused = {key for key, real in items if real is None}
        todo = [(key, real) for key, real in items if real is not None]
        step = self.service.batcher.max_batch
        escaped = {"error": "symlink outside the scan roots"}
        answers: dict[str, dict] = dict.fromkeys(refused, escaped)
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            results, _ = await self.service.classify(list(chunk))
            for (key, _), res in zip(chunk, results, strict=True):
                answers[key] = res
        return [(key, answers[key]) for key, _ in items]

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self.handle, host, port, limit=MAX_LINE)


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
