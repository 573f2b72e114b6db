"""The web page at ``/`` in real headless Chromium, driven over the DevTools protocol
(:mod:`imgclf.testing.browser`): navigate, put a file into the page's file input
(``DOM.setFileInputFiles``, as a user picking a file), and read the displayed result.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from imgclf.files import file_md5
from imgclf.testing import images as f
from imgclf.testing.browser import open_page
from imgclf.testing.bundles import make_bundle
from imgclf.testing.server import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    srv = ServerProcess(tmp, make_bundle(tmp / "models"), "--reload-poll-seconds", "0")
    yield srv
    assert srv.stop() == 0, srv.log()


async def _drive(devtools: str, url: str, image: Path, bad: Path) -> dict:
    async with open_page(devtools, url) as page:
        await page.wait_for("!!document.getElementById('file')")
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
