"""The web page at ``/`` in real headless Chromium, driven over the DevTools protocol.

Chromium comes from Debian (``apt-get install chromium``); the page is driven with the
``websockets`` package: navigate, put a file into the page's file input
(``DOM.setFileInputFiles``, as a user picking a file), and read the displayed result.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from imgclf.files import file_md5
from imgclf.testing import images as f
from imgclf.testing.bundles import make_bundle
from imgclf.testing.server import ServerProcess, poll, stop_process

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    srv = ServerProcess(tmp, make_bundle(tmp / "models"), "--reload-poll-seconds", "0")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture
def browser(tmp_path):
    """A fresh headless Chromium; yields the DevTools HTTP endpoint."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = tmp_path / "profile"
    log = (tmp_path / "chromium.log").open("wb")
    proc = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=log,
        stderr=log,
    )
    port_file = profile / "DevToolsActivePort"

    def settled() -> bool:  # exited, or wrote its DevTools port
        exited = proc.poll() is not None
        return exited or (port_file.is_file() and bool(port_file.read_text().strip()))

    if not poll(settled, timeout=30) or proc.poll() is not None:
        stop_process(proc, timeout=10)
        pytest.fail(f"chromium did not start: {(tmp_path / 'chromium.log').read_text()}")
    port = int(port_file.read_text().split()[0])
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc, timeout=10)
        log.close()


class Page:
    """Minimal DevTools client for one page target."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)

    async def command(self, method: str, **params):
        msg_id = next(self.ids)
        await self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), 20))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def js(self, expression: str):
        result = await self.command("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise TimeoutError(f"page never satisfied {expression!r}")

    async def upload(self, selector: str, path: Path) -> None:
        doc = await self.command("DOM.getDocument")
        node = await self.command(
            "DOM.querySelector", nodeId=doc["root"]["nodeId"], selector=selector
        )
        await self.command("DOM.setFileInputFiles", files=[str(path)], nodeId=node["nodeId"])


async def _drive(devtools: str, url: str, image: Path, bad: Path) -> dict:
    import websockets

    targets = httpx.get(f"{devtools}/json/list").json()
    ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    async with websockets.connect(ws_url, max_size=None) as ws:
        page = Page(ws)
        await page.command("Page.enable")
        await page.command("Runtime.enable")
        await page.command("Page.navigate", url=url)
        await page.wait_for(
            "document.readyState === 'complete' && !!document.getElementById('file')"
        )
        model_line = await page.wait_for(
            "document.getElementById('model').textContent.includes('safe') && "
            "document.getElementById('model').textContent"
        )
        await page.upload("#file", image)
        label = await page.wait_for("document.getElementById('decision').dataset.label")
        rows = await page.js(
            "[...document.querySelectorAll('#probs tbody tr')]"
            ".map(r => [r.dataset.cls, parseFloat(r.cells[1].textContent)])"
        )
        shown = {
            "model": model_line,
            "label": label,
            "text": await page.js("document.getElementById('decision').textContent"),
            "rows": rows,
            "status": await page.js("document.getElementById('status').textContent"),
        }
        await page.upload("#file", bad)
        shown["error"] = await page.wait_for("document.getElementById('error').textContent")
        shown["label_after_error"] = await page.js(
            "document.getElementById('decision').dataset.label"
        )
        return shown


def test_upload_through_the_page_shows_probabilities_and_decision(server, browser, tmp_path):
    image = f.write(tmp_path / "cat photo.jpg", f.jpeg(5))
    bad = f.write(tmp_path / "bad.jpg", f.truncated_jpeg())
    shown = asyncio.run(_drive(browser, server.url + "/", image, bad))

    api = httpx.post(
        f"{server.url}/predict", content=image.read_bytes(), headers={"Content-Type": "image/jpeg"}
    ).json()["results"][0]
    assert shown["model"] == f"bundle {file_md5(server.bundle)} · classes safe, sensitive"
    assert shown["label"] == api["decision"]["label"]
    assert "Decision:" in shown["text"] and "0.4" in shown["text"]
    assert {cls for cls, _ in shown["rows"]} == {"safe", "sensitive"}
    for cls, p in shown["rows"]:
        assert p == pytest.approx(api["probabilities"][cls], abs=1e-4)
    assert shown["status"] == "Result for cat photo.jpg"
    assert "truncated" in shown["error"]
    assert shown["label_after_error"] == ""
