"""The data audit's review gallery: one self-contained HTML page (inline CSS and JS, JPEG
thumbnails as ``data:`` URIs, nothing fetched) of the suspects in
``metrics/audit/label_issues.csv``, one card each, filterable by issue kind and by side,
so it reads offline and as an MLflow artifact. Same input, same bytes.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from imgclf.pipeline.stage_outputs import SIDES

THUMBNAIL_QUALITY = 85
# the usual sides, in this order; any other side follows them, sorted
# summary keys with a table of their own; every other key goes into the "audit" table
SUMMARY_TABLES = ("by_kind", "noise_rate")

HELP = (
    "To act on a suspect, add <code>raw_path,relabel:&lt;class&gt;</code> or "
    "<code>raw_path,exclude</code> as a line of <code>data/labels_override.csv</code> "
    "(click a path to select it), then run <code>dvc repro</code>."
)

CSS = """\
:root { font: 14px/1.4 system-ui, sans-serif; color: #222; background: #fafafa; }
body { margin: 0 auto; padding: 1rem; max-width: 1400px; }
h1 { font-size: 1.4rem; margin: 0 0 .5rem; }
code { font-family: ui-monospace, monospace; }
[hidden] { display: none !important; }
.help { background: #fff8e1; border: 1px solid #f0d890; border-radius: 4px; padding: .5rem .75rem; }
.summary { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; margin: 1rem 0; }
.summary table { border-collapse: collapse; }
.summary caption { font-weight: 600; text-align: left; white-space: nowrap; }
.summary th, .summary td { padding: .1rem .6rem; border-bottom: 1px solid #ddd; text-align: left; }
.summary td.num { text-align: right; font-variant-numeric: tabular-nums; }
.filters { position: sticky; top: 0; z-index: 1; display: flex; flex-wrap: wrap;
  gap: .5rem 1.5rem; align-items: center; padding: .5rem 0; background: #fafafa; }
[role=group] { display: flex; flex-wrap: wrap; gap: .3rem; }
.filters button { font: inherit; padding: .15rem .6rem; border: 1px solid #bbb;
  border-radius: 999px; background: #fff; cursor: pointer; }
.filters button.active { background: #234; border-color: #234; color: #fff; }
#shown { color: #666; }
#cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: .75rem; }
.card { display: flex; gap: .6rem; margin: 0; padding: .5rem; background: #fff;
  border: 1px solid #ddd; border-radius: 6px; }
.thumb, .noimg { flex: none; width: 96px; height: 96px; background: #eee; }
.thumb { object-fit: contain; image-rendering: pixelated; }
.noimg { display: flex; align-items: center; justify-content: center; color: #777;
  font-size: 12px; }
figcaption { display: flex; flex-direction: column; gap: .15rem; min-width: 0; font-size: 12px; }
.rank { font-weight: 600; }
.raw { word-break: break-all; user-select: all; cursor: copy; }
.labels { font-size: 14px; }
.labels b { color: #b00020; }
.scores { color: #555; }
.badge { display: inline-block; margin: 0 .2rem .2rem 0; padding: 0 .4rem; border-radius: 3px;
  background: #e4e4e4; max-width: 100%; overflow-wrap: anywhere; }
.badge[data-kind="label_issue"] { background: #fbd5d5; }
.badge[data-kind="near_duplicate_conflict"] { background: #fde2c4; }
.badge[data-kind="outlier"] { background: #dcd5fb; }
.badge[data-kind="blank"] { background: #d5e5fb; }
.badge[data-kind="near_duplicate"] { background: #d9f2d9; }
"""

SCRIPT = """\
(() => {
  const cards = [...document.querySelectorAll('figure.card')];
  const chosen = {kind: '', side: ''};
  function apply() {
    let shown = 0;
    for (const card of cards) {
      const ok = (!chosen.kind || card.dataset.issues.split(' ').includes(chosen.kind))
        && (!chosen.side || card.dataset.side === chosen.side);
      card.hidden = !ok;
      shown += ok ? 1 : 0;
    }
    document.getElementById('shown').textContent = shown + ' of ' + cards.length + ' shown';
    document.getElementById('nothing').hidden = shown > 0;
  }
  for (const key of ['kind', 'side']) {
    const group = document.getElementById(key + '-filter');
    group.addEventListener('click', (event) => {
      const button = event.target.closest('button');
      if (!button) return;
      chosen[key] = button.dataset[key];
      for (const other of group.querySelectorAll('button')) {
        other.classList.toggle('active', other === button);
        other.setAttribute('aria-pressed', String(other === button));
      }
      apply();
    });
  }
  apply();
})();
"""


def thumbnail_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` (width, height) scaled to fit a ``max_side`` square, aspect kept, rounded
    (at least 1 px), never enlarged."""
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def thumbnail_jpeg(path: Path, max_side: int) -> bytes:
    """The image at ``path`` (EXIF orientation applied) shrunk (aspect kept, never enlarged)
    to at most ``max_side`` px, as RGB JPEG bytes (quality 85). ValueError when ``max_side``
    < 1; OSError (FileNotFoundError, PIL.UnidentifiedImageError) when unreadable."""
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    with Image.open(path) as img:
        rgb = ImageOps.exif_transpose(img).convert("RGB")
    size = thumbnail_size(rgb.size, max_side)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


def issue_kinds(row: Mapping[str, str]) -> list[str]:
    """The issue kinds of ``row`` (its ``issues`` split on ";"), in order, without blanks
    or repeats."""
    kinds = (kind.strip() for kind in row["issues"].split(";"))
    return list(dict.fromkeys(kind for kind in kinds if kind))


def ordered(present: Iterable[str], first: Sequence[str]) -> list[str]:
    """The distinct values of ``present``: those in ``first`` in its order, then the others
    sorted."""
    values = set(present)
    return [v for v in first if v in values] + sorted(values - set(first))


def _esc(value: Any) -> str:
    """``value`` as text, escaped for HTML text and quoted attributes."""
    return html.escape(str(value), quote=True)


def _number(value: str, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals when it is a number, as given otherwise."""
    try:
        return f"{float(value):.{digits}f}"
    except ValueError:
        return value


def _cell(value: Any) -> str:
    """A summary value as table-cell text: floats to 4 significant digits, mappings and
    lists as sorted JSON, anything else as ``str``."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _rate(value: Any) -> str:
    """A noise rate (a fraction) as a percentage with one decimal; non-numbers as text."""
    try:
        return f"{float(value):.1%}"
    except (TypeError, ValueError):
        return str(value)


def _table(caption: str, rows: Iterable[tuple[Any, str]], numeric: bool) -> str:
    """A two-column table under ``caption``: key, then value (right-aligned if numeric)."""
    cls = ' class="num"' if numeric else ""
    body = "".join(f"<tr><th>{_esc(k)}</th><td{cls}>{_esc(v)}</td></tr>" for k, v in rows)
    return f"<table><caption>{_esc(caption)}</caption>{body}</table>"


def summary_html(summary: Mapping[str, Any], kinds: Sequence[str]) -> str:
    """The header tables of ``summary``: its plain keys ("audit"), the suspects per kind
    (``by_kind``, in the order of ``kinds``, then the others sorted) and the estimated
    noise rate per class (``noise_rate``, in its own order)."""
    tables = []
    plain = [(k, _cell(v)) for k, v in summary.items() if k not in SUMMARY_TABLES]
    if plain:
        tables.append(_table("audit", plain, numeric=False))
    by_kind = summary.get("by_kind")
    if isinstance(by_kind, Mapping):
        rows = [(k, _cell(by_kind[k])) for k in ordered(by_kind, kinds)]
        tables.append(_table("suspects by kind", rows, numeric=True))
    noise = summary.get("noise_rate")
    if isinstance(noise, Mapping):
        rows = [(k, _rate(v)) for k, v in noise.items()]
        tables.append(_table("estimated label noise by class", rows, numeric=True))
    return f'<section class="summary">{"".join(tables)}</section>'


def card_html(row: Mapping[str, str], thumbnail: bytes | None) -> str:
    """One suspect's card: thumbnail (or a "no preview" box), rank, side, raw path,
    given → suggested label, label quality, outlier score, group, and issue badges."""
    kinds = issue_kinds(row)
    if thumbnail is None:
        image = '<div class="noimg">no preview</div>'
    else:
        data = base64.b64encode(thumbnail).decode("ascii")
        image = f'<img class="thumb" src="data:image/jpeg;base64,{data}" alt="{_esc(row["path"])}">'
    given, suggested = row["given_label"], row["suggested_label"]
    labels = _esc(given)
    if suggested and suggested != given:
        labels += f" → <b>{_esc(suggested)}</b>"
    scores = [f"label quality {_esc(_number(row['label_quality']))}"]
    if row["outlier_score"]:
        scores.append(f"outlier {_esc(_number(row['outlier_score']))}")
    if row["group"]:
        group = row["group"]  # a SHA-256: its first 12 digits name it on screen
        scores.append(f'group <span title="{_esc(group)}">{_esc(group[:12])}</span>')
    badges = "".join(f'<span class="badge" data-kind="{_esc(k)}">{_esc(k)}</span>' for k in kinds)
    return (
        f'<figure class="card" data-rank="{_esc(row["rank"])}" '
        f'data-issues="{_esc(" ".join(kinds))}" data-side="{_esc(row["side"])}">'
        f"{image}<figcaption>"
        f'<div><span class="rank">#{_esc(row["rank"])}</span> · '
        f'<span class="side">{_esc(row["side"])}</span></div>'
        f'<code class="raw" title="raw_path">{_esc(row["raw_path"])}</code>'
        f'<div class="labels">{labels}</div>'
        f'<div class="scores">{" · ".join(scores)}</div>'
        f'<div class="badges">{badges}</div>'
        "</figcaption></figure>"
    )


def _buttons(key: str, label: str, counts: Counter[str], order: Sequence[str], total: int) -> str:
    """A filter group ``#<key>-filter``: "``label`` (total)", active, then one button per
    value of ``order`` with its count; each carries its value in ``data-<key>``."""
    buttons = [
        f'<button type="button" class="active" aria-pressed="true" data-{key}="">'
        f"{_esc(label)} ({total})</button>"
    ] + [
        f'<button type="button" aria-pressed="false" data-{key}="{_esc(v)}">'
        f"{_esc(v)} ({counts[v]})</button>"
        for v in order
    ]
    return f'<div id="{key}-filter" role="group">{"".join(buttons)}</div>'


def filters_html(rows: Sequence[Mapping[str, str]], kinds: Sequence[str]) -> str:
    """The filter bar: all + one button per issue kind present (in the order of ``kinds``,
    others after it, sorted), all sides + one button per side present, and a shown count."""
    by_kind = Counter(k for row in rows for k in issue_kinds(row))
    by_side = Counter(row["side"] for row in rows)
    return (
        '<nav class="filters">'
        f"{_buttons('kind', 'all', by_kind, ordered(by_kind, kinds), len(rows))}"
        f"{_buttons('side', 'all sides', by_side, ordered(by_side, SIDES), len(rows))}"
        f'<span id="shown">{len(rows)} of {len(rows)} shown</span></nav>'
    )


def gallery_html(
    rows: Sequence[Mapping[str, str]],
    thumbnails: Mapping[str, bytes],
    summary: Mapping[str, Any],
    kinds: Sequence[str],
) -> str:
    """A self-contained HTML page for human review of the audit's suspects: a help line on
    acting on one, the ``summary`` tables, filter buttons (issue kind in the order of
    ``kinds``, side) and one ``figure.card`` per row of ``rows`` (ranked rows of
    ``label_issues.csv``) in their order, each with its JPEG from ``thumbnails`` (by
    ``row["path"]``; "no preview" when absent). Every value is HTML-escaped; no timestamp,
    so the same input gives the same page. Empty ``rows``: a page saying no suspects."""
    if rows:
        cards = "\n".join(card_html(row, thumbnails.get(row["path"])) for row in rows)
        body = (
            f'{filters_html(rows, kinds)}\n<main id="cards">\n{cards}\n</main>\n'
            '<p id="nothing" hidden>No suspect matches these filters.</p>\n'
            f"<script>\n{SCRIPT}</script>"
        )
    else:
        body = '<p class="empty">No suspects were found.</p>'
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Data audit: {len(rows)} suspects</title>\n<style>\n{CSS}</style>\n</head>\n"
        f'<body>\n<h1>Data audit: {len(rows)} suspects</h1>\n<p class="help">{HELP}</p>\n'
        f"{summary_html(summary, kinds)}\n{body}\n</body>\n</html>\n"
    )
