"""The audit's review gallery (imgclf.pipeline.audit_gallery): thumbnails and the HTML page,
read back with the standard library's HTML parser."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import pytest
from PIL import Image

from imgclf.pipeline.audit_gallery import (
    gallery_html,
    issue_kinds,
    thumbnail_jpeg,
    thumbnail_size,
)

KINDS = ("label_issue", "near_duplicate_conflict", "outlier", "blank", "near_duplicate")
HOSTILE = 'data/raw/safe/<script>alert("x&y")</script>\'.jpg'
SUMMARY = {
    "images": 1262,
    "by_kind": {"outlier": 2, "label_issue": 57, "mystery": 1},
    "noise_rate": {"safe": 0.03, "sensitive": 0.0512},
    "model": "logistic",
    "folds": 5,
}


def row(rank: int, issues: str, side: str = "train", **fields: str) -> dict[str, str]:
    """One row of label_issues.csv (all values strings), numbered ``rank``."""
    return {
        "rank": str(rank),
        "raw_path": f"data/raw/safe/img{rank}.jpg",
        "path": f"data/processed/safe/img{rank}.jpg",
        "side": side,
        "issues": issues,
        "given_label": "safe",
        "suggested_label": "sensitive",
        "label_quality": "0.0123456",
        "outlier_score": "",
        "group": "",
        **fields,
    }


ROWS = [
    row(1, "label_issue;outlier", outlier_score="0.91"),
    row(2, "label_issue", side="val", raw_path=HOSTILE),
    row(3, "near_duplicate", side="test", group="7", suggested_label="safe"),
    row(4, "outlier;mystery", outlier_score="0.5"),
]
THUMBS = {r["path"]: f"jpeg {r['rank']}".encode() for r in ROWS if r["rank"] != "3"}


class Parsed(HTMLParser):
    """The gallery's cards, buttons, images, texts by class, and all text, as parsed."""

    def __init__(self, page: str):
        super().__init__()
        self.cards: list[dict[str, str | None]] = []
        self.buttons: list[tuple[dict[str, str | None], str]] = []
        self.images: list[tuple[str, dict[str, str | None]]] = []  # (card rank, attrs)
        self.texts: dict[str, list[str]] = {}  # class -> texts of its elements
        self.text: list[str] = []
        self._open: list[tuple[str, str, list[str]]] = []  # (tag, class, text so far)
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "figure":
            self.cards.append(a)
        if tag == "img":
            self.images.append((self.cards[-1]["data-rank"], a))
        elif tag != "meta":
            self._open.append((tag, a.get("class") or "", []))
        if tag == "button":
            self.buttons.append((a, ""))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            open_tag, cls, parts = self._open.pop()
            text = "".join(parts)
            if self._open:
                self._open[-1][2].append(text)
            self.texts.setdefault(cls, []).append(text)
            if open_tag == "button":
                self.buttons[-1] = (self.buttons[-1][0], text)
            if open_tag == tag:
                return

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._open:
            self._open[-1][2].append(data)


def button_texts(page: Parsed, key: str) -> list[str]:
    """The texts of the filter buttons carrying ``data-<key>``, in page order."""
    return [text for attrs, text in page.buttons if f"data-{key}" in attrs]


@pytest.fixture(scope="module")
def page() -> str:
    return gallery_html(ROWS, THUMBS, SUMMARY, KINDS)


def test_one_card_per_row_in_rank_order_with_its_kinds_and_side(page):
    cards = Parsed(page).cards
    assert [(c["class"], c["data-rank"], c["data-issues"], c["data-side"]) for c in cards] == [
        ("card", "1", "label_issue outlier", "train"),
        ("card", "2", "label_issue", "val"),
        ("card", "3", "near_duplicate", "test"),
        ("card", "4", "outlier mystery", "train"),
    ]


def test_filter_buttons_count_the_rows_of_each_kind_and_side(page):
    parsed = Parsed(page)
    # kinds in the given order, absent ones left out, an unknown kind after them
    assert button_texts(parsed, "kind") == [
        "all (4)",
        "label_issue (2)",
        "outlier (2)",
        "near_duplicate (1)",
        "mystery (1)",
    ]
    assert [a["data-kind"] for a, _ in parsed.buttons if "data-kind" in a] == [
        "",
        "label_issue",
        "outlier",
        "near_duplicate",
        "mystery",
    ]
    assert button_texts(parsed, "side") == ["all sides (4)", "train (2)", "val (1)", "test (1)"]
    pressed = [(a.get("class"), a["aria-pressed"]) for a, _ in parsed.buttons]
    on, off = ("active", "true"), (None, "false")
    assert pressed == [on, off, off, off, off, on, off, off, off]
    assert parsed.texts["card"][0].startswith("#1 · train")


def test_hostile_file_name_is_escaped_and_read_back_intact(page):
    assert HOSTILE not in page
    assert "<script>alert" not in page
    assert page.count("<script>") == 1  # the page's own filter script
    assert Parsed(page).texts["raw"] == [
        "data/raw/safe/img1.jpg",
        HOSTILE,
        "data/raw/safe/img3.jpg",
        "data/raw/safe/img4.jpg",
    ]


def test_escapes_every_value_of_rows_and_summary():
    hostile = '<i a="b">&'
    rows = [
        row(
            1,
            f"label_issue;{hostile}",
            side=hostile,
            path=hostile,
            given_label=hostile,
            suggested_label=hostile + "2",
            label_quality=hostile,
            group=hostile,
        )
    ]
    summary = {hostile: hostile, "by_kind": {hostile: 1}, "noise_rate": {hostile: hostile}}
    page = gallery_html(rows, {hostile: b"x"}, summary, KINDS)
    assert "<i " not in page
    parsed = Parsed(page)
    assert parsed.texts["labels"] == [f"{hostile} → {hostile}2"]
    assert parsed.texts["scores"] == [f"label quality {hostile} · group {hostile}"]
    assert parsed.cards[0]["data-issues"] == f"label_issue {hostile}"
    assert parsed.cards[0]["data-side"] == hostile
    assert parsed.images[0][1]["alt"] == hostile
    assert parsed.texts["side"] == [hostile]
    assert parsed.texts["badge"] == ["label_issue", hostile]
    # whole texts: the summary's key and value, by_kind's key, noise_rate's key and value,
    # the side, the group (its first 12 characters: all 10 here) and the badge
    assert sum(t == hostile for t in parsed.text) == 8


def test_thumbnails_are_inline_jpeg_and_a_missing_one_shows_a_placeholder(page):
    parsed = Parsed(page)
    assert [(rank, a["class"], a["src"]) for rank, a in parsed.images] == [
        (
            r["rank"],
            "thumb",
            "data:image/jpeg;base64," + base64.b64encode(THUMBS[r["path"]]).decode(),
        )
        for r in ROWS
        if r["path"] in THUMBS
    ]
    assert parsed.texts["noimg"] == ["no preview"]
    card3 = page[page.index('data-rank="3"') : page.index('data-rank="4"')]
    assert '<div class="noimg">no preview</div>' in card3


def test_no_external_resource(page):
    for needle in ("http://", "https://", 'src="/', "href=", "@import", "url("):
        assert needle not in page


def test_labels_scores_and_badges(page):
    parsed = Parsed(page)
    assert parsed.texts["labels"] == ["safe → sensitive"] * 2 + ["safe", "safe → sensitive"]
    assert parsed.texts["scores"] == [
        "label quality 0.012 · outlier 0.910",
        "label quality 0.012",
        "label quality 0.012 · group 7",
        "label quality 0.012 · outlier 0.500",
    ]
    assert parsed.texts["badge"] == [
        "label_issue",
        "outlier",
        "label_issue",
        "near_duplicate",
        "outlier",
        "mystery",
    ]


def test_summary_tables(page):
    summary = page[page.index('<section class="summary">') : page.index("</section>")]
    assert summary == (
        '<section class="summary">'
        "<table><caption>audit</caption>"
        "<tr><th>images</th><td>1262</td></tr>"
        "<tr><th>model</th><td>logistic</td></tr>"
        "<tr><th>folds</th><td>5</td></tr></table>"
        "<table><caption>suspects by kind</caption>"
        '<tr><th>label_issue</th><td class="num">57</td></tr>'
        '<tr><th>outlier</th><td class="num">2</td></tr>'
        '<tr><th>mystery</th><td class="num">1</td></tr></table>'
        "<table><caption>estimated label noise by class</caption>"
        '<tr><th>safe</th><td class="num">3.0%</td></tr>'
        '<tr><th>sensitive</th><td class="num">5.1%</td></tr></table>'
    )


def test_help_line_says_how_to_act(page):
    help_text = Parsed(page).texts["help"]
    assert help_text == [
        "To act on a suspect, add raw_path,relabel:<class> or raw_path,exclude as a line of "
        "data/labels_override.csv (click a path to select it), then run dvc repro."
    ]


def test_same_input_gives_the_same_bytes(page):
    # fresh copies, keys and thumbnails in another order
    rows = [dict(reversed(list(r.items()))) for r in ROWS]
    thumbs = dict(reversed(list(THUMBS.items())))
    summary = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SUMMARY.items()}
    assert gallery_html(rows, thumbs, summary, list(KINDS)) == page


def test_empty_rows_say_no_suspects_were_found():
    page = gallery_html([], {}, {"images": 10, "by_kind": {}}, KINDS)
    parsed = Parsed(page)
    assert parsed.texts["empty"] == ["No suspects were found."]
    assert parsed.cards == []
    assert parsed.buttons == []
    assert "<script>" not in page
    assert "<title>Data audit: 0 suspects</title>" in page


@pytest.mark.parametrize(
    ("issues", "kinds"),
    [
        ("label_issue;outlier", ["label_issue", "outlier"]),
        (" outlier ;; outlier;blank;", ["outlier", "blank"]),
        ("", []),
    ],
)
def test_issue_kinds(issues, kinds):
    assert issue_kinds({"issues": issues}) == kinds


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((300, 150), 128, (128, 64)),
        ((150, 300), 128, (64, 128)),
        ((32, 32), 128, (32, 32)),
        ((128, 128), 128, (128, 128)),
        ((1000, 3), 100, (100, 1)),
        ((301, 100), 128, (128, 43)),
    ],
)
def test_thumbnail_size(size, max_side, expected):
    assert thumbnail_size(size, max_side) == expected


@pytest.mark.parametrize(
    ("mode", "size", "fmt", "expected"),
    [
        ("RGB", (300, 150), "JPEG", (128, 64)),
        ("RGB", (32, 32), "JPEG", (32, 32)),
        ("RGBA", (100, 200), "PNG", (64, 128)),
        ("L", (40, 30), "PNG", (40, 30)),
        ("P", (256, 256), "GIF", (128, 128)),
    ],
)
def test_thumbnail_jpeg_is_rgb_jpeg_shrunk_never_enlarged(tmp_path, mode, size, fmt, expected):
    path = tmp_path / f"img.{fmt.lower()}"
    Image.new(mode, size, 120).save(path, format=fmt)
    data = thumbnail_jpeg(path, 128)
    with Image.open(io.BytesIO(data)) as thumb:
        assert (thumb.format, thumb.mode, thumb.size) == ("JPEG", "RGB", expected)
    assert thumbnail_jpeg(path, 128) == data


def test_thumbnail_jpeg_keeps_the_colours(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 40)).save(path)
    with Image.open(io.BytesIO(thumbnail_jpeg(path, 16))) as thumb:
        r, g, b = thumb.getpixel((8, 8))
    assert max(abs(r - 200), abs(g - 30), abs(b - 40)) <= 5


def test_thumbnail_jpeg_rejects_a_max_side_below_one(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(ValueError, match="max_side must be at least 1, got 0"):
        thumbnail_jpeg(path, 0)


def test_thumbnail_jpeg_of_a_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.jpg"):
        thumbnail_jpeg(tmp_path / "nothing.jpg", 64)


def test_a_group_is_shown_by_its_first_12_digits_with_the_whole_name_on_hover():
    group = "0123456789abcdef" * 4
    page = gallery_html([row(1, "near_duplicate", group=group)], {}, {}, KINDS)
    assert Parsed(page).texts["scores"] == ["label quality 0.012 · group 0123456789ab"]
    assert f'<span title="{group}">0123456789ab</span>' in page
