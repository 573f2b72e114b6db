"""Real headless Chromium for tests, driven over the DevTools protocol.

Chromium comes from Debian (``apt-get install chromium``); pages are driven with the
``websockets`` package. :func:`chromium` starts a fresh browser and yields its DevTools
HTTP endpoint, :func:`open_page` connects to its page and navigates, and :class:`Page`
speaks the protocol: commands, JavaScript, waiting, file inputs, mouse clicks, and the
page's console errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import websockets

from imgclf.testing.server import poll, stop_process

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "chromium is not installed (apt-get install chromium)"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
]
# seconds to wait for one DevTools answer or event
REPLY_TIMEOUT = 20


@contextlib.contextmanager
def chromium(workdir: Path, timeout: float = 30) -> Iterator[str]:
    """A fresh headless :data:`CHROMIUM` (profile ``workdir/profile``, output in
    ``workdir/chromium.log``); yields its DevTools HTTP endpoint and stops it on exit.
    RuntimeError, with the log, when it exits or names no port within ``timeout`` seconds."""
    if CHROMIUM is None:
        raise RuntimeError(NO_CHROMIUM)
    profile, log_path = workdir / "profile", workdir / "chromium.log"
    port_file = profile / "DevToolsActivePort"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=log,
            stderr=log,
        )
        try:

            def settled() -> bool:  # exited, or wrote its DevTools port
                exited = proc.poll() is not None
                return exited or (port_file.is_file() and bool(port_file.read_text().strip()))

            if not poll(settled, timeout=timeout) or proc.poll() is not None:
                raise RuntimeError(f"chromium did not start: {log_path.read_text()}")
            yield f"http://127.0.0.1:{int(port_file.read_text().split()[0])}"
        finally:
            stop_process(proc, timeout=10)


class Page:
    """Minimal DevTools client for one page target: answers are matched to commands by
    id; every event received on the way is kept in :attr:`events`, in order."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    async def _receive(self) -> dict[str, Any]:
        """The next message; an event is also appended to :attr:`events`."""
        msg = json.loads(await asyncio.wait_for(self.ws.recv(), REPLY_TIMEOUT))
        if "id" not in msg:
            self.events.append(msg)
        return msg

    async def command(self, method: str, **params: Any) -> dict[str, Any]:
        """Send ``method``; its result. RuntimeError when DevTools answers an error."""
        msg_id = next(self.ids)
        await self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = await self._receive()
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def wait_event(self, method: str, since: int = 0) -> dict[str, Any]:
        """The first ``method`` event among :attr:`events` from index ``since`` on, waiting
        for it (each message for at most :data:`REPLY_TIMEOUT` seconds)."""
        seen = since
        while True:
            for event in self.events[seen:]:
                if event["method"] == method:
                    return event
            seen = len(self.events)
            await self._receive()

    async def navigate(self, url: str) -> None:
        """Load ``url`` and wait for its load event. RuntimeError when it cannot load."""
        since = len(self.events)
        result = await self.command("Page.navigate", url=url)
        if result.get("errorText"):
            raise RuntimeError(f"{url}: {result['errorText']}")
        await self.wait_event("Page.loadEventFired", since)

    async def js(self, expression: str) -> Any:
        """The value of the JavaScript ``expression`` (returned by value)."""
        result = await self.command("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20) -> Any:
        """The first truthy value of ``expression``, tried every 0.1 s for ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise TimeoutError(f"page never satisfied {expression!r}")

    async def upload(self, selector: str, path: Path) -> None:
        """Put the file ``path`` into the file input at ``selector`` (as a user would)."""
        doc = await self.command("DOM.getDocument")
        node = await self.command(
            "DOM.querySelector", nodeId=doc["root"]["nodeId"], selector=selector
        )
        await self.command("DOM.setFileInputFiles", files=[str(path)], nodeId=node["nodeId"])

    async def click(self, selector: str) -> None:
        """A real left mouse click at the centre of the first element at ``selector``
        (scrolled into view first). LookupError when no such element is displayed."""
        box = await self.js(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            " if (!el || !el.getClientRects().length) return null;"
            " el.scrollIntoView({block: 'center'}); const r = el.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        if box is None:
            raise LookupError(f"no displayed element at {selector!r}")
        for kind in ("mousePressed", "mouseReleased"):
            await self.command(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )

    def console_errors(self) -> list[str]:
        """The page's errors received so far: uncaught exceptions, ``console.error`` and
        ``console.assert`` calls, and browser log entries of level error (failed loads)."""
        errors = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description", details["text"]))
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                args = (a.get("value", a.get("description")) for a in params["args"])
                errors.append(" ".join(map(str, args)))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(params["entry"]["text"])
        return errors


@contextlib.asynccontextmanager
async def open_page(devtools: str, url: str | None = None) -> AsyncIterator[Page]:
    """The browser's page at the DevTools endpoint ``devtools``, with the Page, Runtime and
    Log domains enabled (so :meth:`Page.console_errors` sees everything from the start),
    navigated to ``url`` and loaded when one is given."""
    targets = httpx.get(f"{devtools}/json/list").json()
    ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    async with websockets.connect(ws_url, max_size=None) as ws:
        page = Page(ws)
        for domain in ("Page", "Runtime", "Log"):
            await page.command(f"{domain}.enable")
        if url is not None:
            await page.navigate(url)
        yield page
