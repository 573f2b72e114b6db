"""The audit's review gallery (imgclf.pipeline.audit_gallery) opened as a ``file://`` page
in real headless Chromium (:mod:`imgclf.testing.browser`): the filter buttons clicked with
the mouse, the thumbnails decoded and shown at 96 px, no console error."""

from __future__ import annotations

import asyncio
from pathlib import Path

from PIL import Image

from imgclf.pipeline.audit_gallery import gallery_html, thumbnail_jpeg
from imgclf.testing.browser import open_page

KINDS = ("label_issue", "near_duplicate_conflict", "outlier", "blank", "near_duplicate")
# rank, issues, side, source image size (None: no thumbnail); thumbnails at most 128 px
CASES = [
    ("1", "label_issue;outlier", "train", (300, 150)),
    ("2", "label_issue", "val", (32, 32)),
    ("3", "outlier", "test", (40, 20)),
    ("4", "near_duplicate;blank", "train", None),
    ("5", "near_duplicate_conflict", "val", (150, 300)),
]
# what the cards show: rank -> thumbnail's natural width (None: the placeholder)
WIDTHS = {"1": 128, "2": 32, "3": 40, "4": None, "5": 64}
# the cards shown, as [rank, natural width, displayed width, displayed height]
VISIBLE = """[...document.querySelectorAll('figure.card')]
  .filter(card => card.getClientRects().length > 0)
  .map(card => {
    const img = card.querySelector('img');
    const box = (img || card.querySelector('.noimg')).getBoundingClientRect();
    return [card.dataset.rank, img ? img.naturalWidth : null, box.width, box.height];
  })"""


def write_gallery(tmp_path: Path) -> Path:
    """The gallery of :data:`CASES` (thumbnails from solid images) as ``index.html``."""
    rows, thumbnails = [], {}
    for rank, issues, side, size in CASES:
        path = tmp_path / "processed" / f"img{rank}.png"
        if size is not None:
            path.parent.mkdir(exist_ok=True)
            Image.new("RGB", size, (40 * int(rank), 90, 160)).save(path)
            thumbnails[str(path)] = thumbnail_jpeg(path, 128)
        rows.append(
            {
                "rank": rank,
                "raw_path": f"data/raw/safe/<b>img{rank}&.jpg",
                "path": str(path),
                "side": side,
                "issues": issues,
                "given_label": "safe",
                "suggested_label": "sensitive",
                "label_quality": "0.1",
                "outlier_score": "",
                "group": "",
            }
        )
    summary = {"images": 50, "by_kind": {"label_issue": 2}, "noise_rate": {"safe": 0.04}}
    page = tmp_path / "index.html"
    page.write_text(gallery_html(rows, thumbnails, summary, KINDS), encoding="utf-8")
    return page


async def _drive(devtools: str, url: str) -> dict:
    async with open_page(devtools, url) as page:
        await page.wait_for("[...document.images].every(img => img.complete)")
        shown = {"all": await page.js(VISIBLE)}
        await page.click('button[data-kind="outlier"]')
        shown["outlier"] = await page.js(VISIBLE)
        shown["active"] = await page.js(
            "[...document.querySelectorAll('.filters button.active')].map(b => b.textContent)"
        )
        await page.click('button[data-side="test"]')
        shown["outlier, test"] = await page.js(VISIBLE)
        await page.click('button[data-kind="blank"]')
        shown["blank, test"] = await page.js(VISIBLE)
        shown["nothing"] = await page.js("document.getElementById('nothing').hidden")
        await page.click('button[data-side=""]')
        shown["blank"] = await page.js(VISIBLE)
        shown["count"] = await page.js("document.getElementById('shown').textContent")
        shown["raw"] = await page.js("document.querySelector('.raw').textContent")
        shown["errors"] = page.console_errors()
        await page.js("console.error('probe', 1)")  # the error check itself sees errors
        shown["probe"] = page.console_errors()
        return shown


def expected(*ranks: str) -> list[list]:
    """:data:`VISIBLE`'s answer when exactly the cards ``ranks`` are shown."""
    return [[rank, WIDTHS[rank], 96, 96] for rank in ranks]


def test_gallery_filters_and_thumbnails_in_chromium(browser, tmp_path):
    page = write_gallery(tmp_path)
    shown = asyncio.run(_drive(browser, page.as_uri()))

    assert shown["all"] == expected("1", "2", "3", "4", "5")
    assert shown["outlier"] == expected("1", "3")
    assert shown["active"] == ["outlier (2)", "all sides (5)"]
    assert shown["outlier, test"] == expected("3")
    assert shown["blank, test"] == []
    assert shown["nothing"] is False
    assert shown["blank"] == expected("4")
    assert shown["count"] == "1 of 5 shown"
    assert shown["raw"] == "data/raw/safe/<b>img1&.jpg"
    assert shown["errors"] == []
    assert shown["probe"] == ["probe 1"]
