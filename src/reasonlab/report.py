"""The HTML report: one self-contained file (Vega, Vega-Lite and Vega-Embed inlined; opens offline).

A report is a list of sections. A section declares the aggregated tables it reads (small tidy
Parquet files, by name) and a function that turns them into blocks: Altair charts, tables or text.
Later stages plug in by writing an aggregated Parquet (registered in the workflow with
`register_report_table` in `common.smk`) and a `@section` function in `reasonlab.sections`.
A section whose tables are not all present is left out.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FOLD_ROWS = 25
Block = Any  # an Altair chart, an `Html` snippet, a polars DataFrame (shown as a table) or a str (a paragraph)


@dataclass(frozen=True)
class Html:
    """A snippet of trusted HTML to place in a section as it is."""

    markup: str


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    order: int
    tables: tuple[str, ...]
    build: Callable[[dict, dict], list[Block]] = field(compare=False)


SECTIONS: dict[str, Section] = {}


def section(key: str, title: str, order: int, tables: tuple[str, ...]):
    """Register `fn(tables: dict[name, polars.DataFrame], context: dict) -> list[Block]` as a report section."""

    def register(fn):
        SECTIONS[key] = Section(key, title, order, tuple(tables), fn)
        return fn

    return register


def table_html(df, max_rows: int = 200, caption: str | None = None) -> str:
    """A polars DataFrame as an HTML table (values escaped, long tables cut with a note)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for row in df.head(max_rows).iter_rows():
        cells = []
        for v in row:
            text = "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
            cls = ' class="num"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = (
        f'<p class="note">showing {max_rows} of {df.height} rows</p>'
        if df.height > max_rows
        else ""
    )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    table = f'<div class="tablewrap"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>{note}'
    if df.height > FOLD_ROWS:  # long tables start folded
        return f"<details><summary>{df.height} rows</summary>{table}</details>"
    return table


def _render_block(block: Block, charts: list[dict]) -> str:
    import polars as pl

    if isinstance(block, Html):
        return block.markup
    if isinstance(block, str):
        return f"<p>{html.escape(block)}</p>"
    if isinstance(block, pl.DataFrame):
        return table_html(block)
    if hasattr(block, "to_dict"):  # an Altair chart
        div = f"chart{len(charts)}"
        charts.append({"id": div, "spec": block.to_dict()})
        return f'<div class="chart" id="{div}"></div>'
    raise TypeError(
        f"a report block must be a chart, Html, DataFrame or str, not {type(block).__name__}"
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
pre{background:#f2f4f7;padding:8px;font-size:12px;white-space:pre-wrap}
"""


def _vega_bundle(vl_version: str) -> str:
    """Vega, Vega-Lite and Vega-Embed as one script (vl-convert bundles them; no network)."""
    import vl_convert

    return vl_convert.javascript_bundle(vl_version=vl_version)


def render(sections: list[tuple[Section, list[Block]]], title: str, subtitle: str = "") -> str:
    """The whole report as one HTML string."""
    import altair as alt

    # sections hand over aggregated tables, and the report must hold its data inline: no row cap
    alt.data_transformers.disable_max_rows()
    charts: list[dict] = []
    nav, parts = [], []
    for sec, blocks in sections:
        nav.append(f'<a href="#{sec.key}">{html.escape(sec.title)}</a>')
        inner = "\n".join(_render_block(b, charts) for b in blocks)
        parts.append(
            f'<section id="{sec.key}"><h2>{html.escape(sec.title)}</h2>\n{inner}\n</section>'
        )
    vl_version = "v" + ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    script = ""
    if charts:
        specs = json.dumps(charts).replace("</", "<\\/")
        script = (
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
        f"<nav>{''.join(nav)}</nav><main>{''.join(parts)}</main>{script}</body></html>\n"
    )


def build_report(tables: dict[str, str | Path], context: dict, out: str | Path) -> list[str]:
    """Read the aggregated tables, build every section whose tables are present, write `out`.

    `context` carries run facts that are not tables (title, config hash, …). Returns the keys of
    the sections written.
    """
    import polars as pl

    import reasonlab.sections  # noqa: F401  (registers the sections)

    frames = {name: pl.read_parquet(path) for name, path in tables.items()}
    built = []
    for sec in sorted(SECTIONS.values(), key=lambda s: (s.order, s.key)):
        if all(t in frames for t in sec.tables):
            built.append((sec, sec.build(frames, context)))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"config {context.get('config_hash', '?')} · built {stamp}"
    doc = render(built, context.get("title", "reasonlab report"), subtitle)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, out)
    return [s.key for s, _ in built]
