"""HTML rendering of the report: blocks to markup, the page, its CSS and the inlined Vega bundle.

A leaf module (nothing from reasonlab). A block is an `Html` snippet, a str (a paragraph), a
polars DataFrame (a table; long ones folded), a `VegaLite` spec or an Altair chart. Elements that
carry `data-sel-<key>` attributes (table rows, traces) are shown only while they match their
section's selectors (`<select data-sel="<key>">`, see `reasonlab.report.charts`).
"""

from __future__ import annotations

import html
import json
import re
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
    markup = _markup(block, charts)
    if len(markup) > PACK_BYTES and "<script" not in markup:
        return f"<!--rl-pack-->{markup}<!--/rl-pack-->"
    return markup


def _markup(block: Block, charts: list[dict]) -> str:
    import polars as pl

    if isinstance(block, Html):
        return block.markup
    if isinstance(block, str):
        return f"<p>{html.escape(block)}</p>"
    if isinstance(block, pl.DataFrame):
        return table_html(block)
    if hasattr(block, "to_dict"):  # a VegaLite spec or an Altair chart
        div = f"chart{len(charts)}"
        charts.append({"id": div, "spec": dict(block.to_dict())})  # (its data is moved out)
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


# every chart's data is stored once, by column, gzip-compressed (see `hoist_data`); the page
# inflates it with the browser's own DecompressionStream, turns it back into rows (Vega's inline
# data) and draws the charts
CHART_JS = (
    "function rlRows(t) {\n"
    "  const cols = Object.keys(t), first = cols.length ? t[cols[0]] : [];\n"
    "  const n = Array.isArray(first) ? first.length : first.codes.length, rows = new Array(n);\n"
    "  const get = cols.map(c => Array.isArray(t[c]) ? (i => t[c][i]) : (i => t[c].values[t[c].codes[i]]));\n"
    "  for (let i = 0; i < n; i++) {\n"
    "    const r = {};\n"
    "    for (let k = 0; k < cols.length; k++) r[cols[k]] = get[k](i);\n"
    "    rows[i] = r;\n"
    "  }\n"
    "  return rows;\n"
    "}\n"
    "rlInflate(RL_DATA).then(JSON.parse).then(store => {\n"
    "  const cache = {};\n"
    "  for (const c of charts) {\n"
    "    c.spec.datasets = {};\n"
    "    for (const n of c.data) c.spec.datasets[n] = cache[n] || (cache[n] = rlRows(store[n]));\n"
    '    vegaEmbed("#" + c.id, c.spec, {actions: false, renderer: "svg"}).catch(e => {\n'
    '      document.getElementById(c.id).innerHTML = "<pre class=warn>" + e + "</pre>"; });\n'
    "  }\n"
    "});\n"
)

SIGNIFICANT = 5  # digits a chart's numbers keep in the page


def _compact(v):
    if isinstance(v, float) and v == v and v not in (float("inf"), float("-inf")):
        return float(f"{v:.{SIGNIFICANT}g}")
    return v


def _strings(obj, out: set[str]) -> set[str]:
    if isinstance(obj, str):
        out.add(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.add(k)
            _strings(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _strings(v, out)
    return out


def _used(column: str, strings: set[str], text: str) -> bool:
    """Whether a spec (its strings, and their text joined) names a data column: as a field, or
    in an expression (`datum["c"]`, `datum.c`)."""
    return column in strings or any(
        f in text for f in (f'datum["{column}"]', f"datum['{column}']", f"datum.{column}")
    )


def _column(values: list):
    """A column as a list, or, when few distinct values repeat (names, flags), as
    {"values": distinct, "codes": index of each}."""
    try:
        distinct = list(dict.fromkeys(values))
    except TypeError:
        return values
    if len(distinct) * 2 > len(values) or all(isinstance(v, int | float) and not isinstance(v, bool)
                                              for v in distinct):  # fmt: skip
        return values
    index = {v: i for i, v in enumerate(distinct)}
    return {"values": distinct, "codes": [index[v] for v in values]}


def hoist_data(charts: list[dict]) -> dict[str, dict]:
    """Move each chart's inline data sets (`spec["datasets"]`: name -> rows) into one store of the
    page: by column (a field's name once, not once per row; repeated values such as names coded),
    only the columns some chart that draws the data set names, numbers to SIGNIFICANT digits; a
    data set that several charts draw (Altair names a data set by its content's hash) is stored
    once. Each chart keeps the names of its data sets in `data`. Returns the store."""
    rows_of: dict[str, list] = {}
    used: dict[str, set[str]] = {}
    for c in charts:
        sets = c["spec"].pop("datasets", {}) or {}
        c["data"] = list(sets)
        strings = _strings(c["spec"], set())
        text = "\n".join(strings)
        for name, rows in sets.items():
            rows_of.setdefault(name, rows)
            cols = dict.fromkeys(k for r in rows for k in r)
            used.setdefault(name, set()).update(k for k in cols if _used(k, strings, text))
    store: dict[str, dict] = {}
    for name, rows in rows_of.items():
        every = list(dict.fromkeys(k for r in rows for k in r))
        cols = [k for k in every if k in used[name]] or every  # (a chart counting rows only)
        store[name] = {k: _column([_compact(r.get(k)) for r in rows]) for k in cols}
    return store


RL_STORE = r'const RL_DATA = "([A-Za-z0-9+/=]*)";'  # the page's chart data (`pack`)


def pack_text(text: str) -> str:
    """Text as the page holds what it stores compressed: gzip, base64."""
    import base64
    import gzip

    return base64.b64encode(gzip.compress(text.encode(), compresslevel=9, mtime=0)).decode("ascii")


def unpack_text(b64: str) -> str:
    import base64
    import gzip

    return gzip.decompress(base64.b64decode(b64)).decode()


def pack(store: dict) -> str:
    """The chart data store as the page holds it: JSON, gzip, base64."""
    return pack_text(json.dumps(store, separators=(",", ":"), ensure_ascii=False))


def unpack(b64: str) -> dict:
    return json.loads(unpack_text(b64))


def unpacked(doc: str) -> str:
    """The page with its compressed blocks put back in place (what the browser shows)."""

    return re.sub(r'<div class="rl-packed" data-z="([A-Za-z0-9+/=]*)"></div>',
                  lambda m: unpack_text(m.group(1)), doc)  # fmt: skip


def chart_specs(doc: str) -> list[dict]:
    """The Vega-Lite specs of a page `render` wrote, with their data sets as rows again (tests,
    tools): the inverse of `hoist_data`."""

    m = re.search(RL_STORE, doc)
    store = unpack(m.group(1)) if m else {}
    m = re.search(r"const charts = (.*?);\n", doc, re.S)
    charts = json.loads(m.group(1).replace("<\\/", "</")) if m else []
    specs = []
    for c in charts:
        spec = c["spec"]
        spec["datasets"] = {}
        for n in c.get("data", []):
            t = {k: v if isinstance(v, list) else [v["values"][i] for i in v["codes"]]
                 for k, v in store[n].items()}  # fmt: skip
            cols = list(t)
            spec["datasets"][n] = [dict(zip(cols, vals, strict=True))
                                   for vals in zip(*(t[k] for k in cols), strict=True)]  # fmt: skip
        specs.append(spec)
    return specs


PACK_BYTES = 20_000  # a block of more markup than this is stored compressed in the page

# long blocks (tables, trace lists) are stored gzip-compressed in the page (`pack`) and put back
# in place when it opens; then the selectors and tables get their behaviour
PACK_JS = (
    "async function rlInflate(b64) {\n"
    "  const bytes = Uint8Array.from(atob(b64), ch => ch.charCodeAt(0));\n"
    "  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));\n"
    "  return await new Response(stream).text();\n"
    "}\n"
    "async function rlUnpack() {\n"
    "  for (const el of Array.from(document.querySelectorAll('div.rl-packed'))) {\n"
    "    el.outerHTML = await rlInflate(el.dataset.z);\n"
    "  }\n"
    "}\n"
)


def _packed(markup: str) -> str:
    return f'<div class="rl-packed" data-z="{pack_text(markup)}"></div>'


def _number_headings(markup: str, key: str) -> tuple[str, list[tuple[str, str]]]:
    """Give each `<h3>` of a section an id (`<key>-<n>`) for the table of contents: (markup,
    [(id, heading markup)])."""

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
            inner = re.sub(r"<!--rl-pack-->(.*?)<!--/rl-pack-->", lambda m: _packed(m.group(1)),
                           inner, flags=re.S)  # fmt: skip
            items = "".join(f'<li><a href="#{i}">{t}</a></li>' for i, t in subs)
            nav.append(f'<li><a href="#{html.escape(key)}">{html.escape(heading)}</a>'
                       + (f"<ol>{items}</ol>" if items else "") + "</li>")  # fmt: skip
            parts.append(
                f'<section id="{html.escape(key)}"><h2>{html.escape(heading)}</h2>\n{inner}\n</section>'
            )
    vl_version = "v" + ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    script = f"<script>{PACK_JS}rlUnpack().then(() => {{\n{SELECT_JS}{TABLE_JS}}});</script>\n"
    if charts:
        store = hoist_data(charts)
        data = json.dumps(pack(store))
        specs = json.dumps(charts, separators=(",", ":")).replace("</", "<\\/")
        script += (
            f"<script>{_vega_bundle(vl_version)}</script>\n"
            f"<script>const RL_DATA = {data};\nconst charts = {specs};\n{CHART_JS}</script>"
        )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
        f"<nav><details open><summary>Contents</summary><ol>{''.join(nav)}</ol></details></nav>"
        f"<main>{''.join(parts)}</main>{script}</body></html>\n"
    )
