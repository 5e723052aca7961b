"""HTML rendering of the report: blocks to markup, the page, its CSS and the inlined Vega bundle.

A leaf module (nothing from reasonlab). A block is an `Html` snippet, a str (a paragraph), a
polars DataFrame (a table; long ones folded), a `VegaLite` spec or an Altair chart. Elements that
carry `data-sel-<key>` attributes (table rows, traces) are shown only while they match their
section's selectors (`<select data-sel="<key>">`, see `reasonlab.report.charts`).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Any

FOLD_ROWS = 25  # tables longer than this start folded (<details>)
FILTER_ROWS = (
    10  # tables longer than this get a filter box (every table sorts by a click on a header)
)
MAX_ROWS = 200  # rows of a table written to the page
ALL = "(all)"  # a selector's value that shows every model / checkpoint / data set
FEW = "(few)"  # the checkpoint selector's value for the first, the last and a few between

Block = Any  # Html, str, polars DataFrame, VegaLite or an Altair chart


@dataclass(frozen=True)
class Html:
    """A snippet of trusted HTML to place in a section as it is."""

    markup: str


@dataclass(frozen=True)
class VegaLite:
    """A finished Vega-Lite spec (a dict, data inline) to draw as one chart."""

    spec: dict

    def to_dict(self) -> dict:
        return self.spec


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table_html(
    df,
    max_rows: int = MAX_ROWS,
    caption: str | None = None,
    row_attrs: dict[str, str] | None = None,
) -> str:
    """A polars DataFrame as an HTML table: values escaped, cut at `max_rows` with a note, folded
    when longer than FOLD_ROWS. `row_attrs` (selector key -> column) tags each row with
    `data-sel-<key>` so that the section's selectors show only the matching rows."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    attrs = {k: c for k, c in (row_attrs or {}).items() if c in df.columns}
    tag_cols = [df[c].to_list() for c in attrs.values()]
    body = []
    for i, row in enumerate(df.head(max_rows).iter_rows()):
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{html.escape(_cell(v))}</td>")
        tags = "".join(
            f' data-sel-{k}="{html.escape(str(col[i]))}"'
            for k, col in zip(attrs, tag_cols, strict=True)
            if col[i] is not None
        )
        cls = ' class="rl-row"' if tags else ""
        body.append(f"<tr{cls}{tags}>" + "".join(cells) + "</tr>")
    note = (
        f'<p class="note">showing {max_rows} of {df.height} rows</p>'
        if df.height > max_rows
        else ""
    )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    tools = (
        '<input type="search" class="rl-filter" placeholder="filter rows…" aria-label="filter rows">'
        if df.height > FILTER_ROWS
        else ""
    )
    table = (
        f'<div class="tablewrap">{tools}<table class="rl-sortable">{cap}<thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>{note}"
    )
    if df.height > FOLD_ROWS:
        what = f"{html.escape(caption)}: " if caption else ""
        shown = " (those matching the selectors above)" if attrs else ""
        return f"<details><summary>{what}{df.height} rows{shown}</summary>{table}</details>"
    return table


def _render_block(block: Block, charts: list[dict]) -> str:
    import polars as pl

    if isinstance(block, Html):
        return block.markup
    if isinstance(block, str):
        return f"<p>{html.escape(block)}</p>"
    if isinstance(block, pl.DataFrame):
        return table_html(block)
    if hasattr(block, "to_dict"):  # a VegaLite spec or an Altair chart
        div = f"chart{len(charts)}"
        charts.append({"id": div, "spec": block.to_dict()})
        return f'<div class="chart" id="{div}"></div>'
    raise TypeError(
        "a report block must be Html, str, a DataFrame, a VegaLite spec or an Altair chart, "
        f"not {type(block).__name__}"
    )


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#fafbfc}
header{background:#1d2330;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#b8c0cc;font-size:13px}
nav{padding:8px 32px;background:#eef1f5;font-size:14px}nav a{margin-right:16px;color:#2954a3;text-decoration:none}
main{padding:8px 32px 48px;max-width:1200px}section{margin-top:28px}
h2{border-bottom:2px solid #dfe3ea;padding-bottom:4px;font-size:19px}h3{font-size:15px;margin-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}caption{text-align:left;font-weight:600;padding:4px 0}
th,td{border:1px solid #dfe3ea;padding:3px 8px;text-align:left;vertical-align:top}th{background:#eef1f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}.tablewrap{overflow-x:auto}
.note{color:#6b7280;font-size:12px}.chart{margin:12px 0}.warn{color:#a33}.ok{color:#2a7a3a}
.empty{color:#6b7280;font-style:italic}tr.rl-filtered{display:none}
form.selectors{position:sticky;top:0;z-index:5;background:#eef1f5;padding:6px 10px;margin:8px 0;
border-radius:4px;font-size:13px}form.selectors label{margin-right:18px}
form.selectors select{margin-left:4px;max-width:260px}
pre{background:#f2f4f7;padding:8px;font-size:12px;white-space:pre-wrap}
table.rl-sortable th{cursor:pointer;user-select:none}table.rl-sortable th[data-dir=asc]::after{content:" ▲"}
table.rl-sortable th[data-dir=desc]::after{content:" ▼"}input.rl-filter{margin:4px 0;padding:3px 6px;width:260px}
nav details{display:inline}nav ol{margin:6px 0 4px;padding-left:20px;columns:2}nav li{margin:2px 0}
nav li ol{columns:1;font-size:13px;margin:2px 0}
"""

# shows the elements tagged data-sel-<key> that match the selectors above them (tables, traces:
# each follows the nearest selector bar before it, so a section may have several); the charts
# follow the same <select> elements through Vega's own binding
SELECT_JS = (
    "const RL_ANY = " + json.dumps([ALL, FEW]) + ";\n"
    "function rlApply(sec) {\n"
    "  let vals = {};\n"
    "  for (const el of sec.querySelectorAll('form.selectors, .rl-row')) {\n"
    "    if (el.matches('form.selectors')) {\n"
    "      vals = {};\n"
    "      for (const s of el.querySelectorAll('select[data-sel]')) vals[s.dataset.sel] = s.value;\n"
    "      continue;\n"
    "    }\n"
    "    let show = true;\n"
    "    for (const [k, v] of Object.entries(vals)) {\n"
    "      const a = el.getAttribute('data-sel-' + k);\n"
    "      if (a !== null && !RL_ANY.includes(v) && a !== v) { show = false; break; }\n"
    "    }\n"
    "    el.style.display = show ? '' : 'none';\n"
    "  }\n"
    "}\n"
    "for (const sec of document.querySelectorAll('section')) {\n"
    "  for (const s of sec.querySelectorAll('select[data-sel]'))"
    " s.addEventListener('input', () => rlApply(sec));\n"
    "  rlApply(sec);\n"
    "}\n"
)

# a click on a header sorts a table by that column (numbers as numbers; again: the other way); the
# filter box above a long table hides the rows whose text does not contain what is typed (rows a
# selector hides stay hidden)
TABLE_JS = (
    "function rlCell(tr, i) { const td = tr.children[i]; return td ? td.textContent : ''; }\n"
    "for (const table of document.querySelectorAll('table.rl-sortable')) {\n"
    "  const ths = table.tHead ? table.tHead.rows[0].cells : [];\n"
    "  for (let i = 0; i < ths.length; i++) ths[i].addEventListener('click', () => {\n"
    "    const th = ths[i], dir = th.dataset.dir === 'asc' ? 'desc' : 'asc';\n"
    "    for (const h of ths) delete h.dataset.dir;\n"
    "    th.dataset.dir = dir;\n"
    "    const body = table.tBodies[0], rows = Array.from(body.rows), sign = dir === 'asc' ? 1 : -1;\n"
    "    rows.sort((a, b) => {\n"
    "      const x = rlCell(a, i), y = rlCell(b, i), nx = parseFloat(x), ny = parseFloat(y);\n"
    "      if (!isNaN(nx) && !isNaN(ny) && String(nx) !== 'NaN') return sign * (nx - ny);\n"
    "      return sign * x.localeCompare(y, undefined, {numeric: true});\n"
    "    });\n"
    "    for (const r of rows) body.appendChild(r);\n"
    "  });\n"
    "}\n"
    "for (const box of document.querySelectorAll('input.rl-filter')) {\n"
    "  const table = box.parentElement.querySelector('table');\n"
    "  box.addEventListener('input', () => {\n"
    "    const q = box.value.toLowerCase();\n"
    "    for (const r of table.tBodies[0].rows) {\n"
    "      r.classList.toggle('rl-filtered', q !== '' && !r.textContent.toLowerCase().includes(q));\n"
    "    }\n"
    "  });\n"
    "}\n"
)


def _number_headings(markup: str, key: str) -> tuple[str, list[tuple[str, str]]]:
    """Give each `<h3>` of a section an id (`<key>-<n>`) for the table of contents: (markup,
    [(id, heading markup)])."""
    import re

    subs: list[tuple[str, str]] = []

    def tag(m) -> str:
        hid = f"{html.escape(key)}-{len(subs) + 1}"
        subs.append((hid, m.group(1)))
        return f'<h3 id="{hid}">{m.group(1)}</h3>'

    return re.sub(r"<h3>(.*?)</h3>", tag, markup, flags=re.S), subs


def _vega_bundle(vl_version: str) -> str:
    """Vega, Vega-Lite and Vega-Embed as one script (vl-convert bundles them; no network)."""
    import vl_convert

    return vl_convert.javascript_bundle(vl_version=vl_version)


def render(sections: list[tuple[str, str, list[Block]]], title: str, subtitle: str = "") -> str:
    """The whole report as one HTML string: `sections` are (key, title, blocks) in order."""
    import altair as alt

    charts: list[dict] = []
    nav, parts = [], []
    # sections hand over aggregated tables, and the report must hold its data inline: no row cap
    with alt.data_transformers.disable_max_rows():
        for key, heading, blocks in sections:
            inner = "\n".join(_render_block(b, charts) for b in blocks)
            inner, subs = _number_headings(inner, key)
            items = "".join(f'<li><a href="#{i}">{t}</a></li>' for i, t in subs)
            nav.append(f'<li><a href="#{html.escape(key)}">{html.escape(heading)}</a>'
                       + (f"<ol>{items}</ol>" if items else "") + "</li>")  # fmt: skip
            parts.append(
                f'<section id="{html.escape(key)}"><h2>{html.escape(heading)}</h2>\n{inner}\n</section>'
            )
    vl_version = "v" + ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    script = f"<script>{SELECT_JS}{TABLE_JS}</script>\n"
    if charts:
        specs = json.dumps(charts).replace("</", "<\\/")
        script += (
            f"<script>{_vega_bundle(vl_version)}</script>\n"
            f"<script>const charts = {specs};\n"
            'for (const c of charts) { vegaEmbed("#" + c.id, c.spec, {actions: false, renderer: "svg"})'
            '.catch(e => { document.getElementById(c.id).innerHTML = "<pre class=warn>" + e + "</pre>"; }); }'
            "</script>"
        )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
        f"<nav><details open><summary>Contents</summary><ol>{''.join(nav)}</ol></details></nav>"
        f"<main>{''.join(parts)}</main>{script}</body></html>\n"
    )
