"""The report's ordered list of sections, and building the HTML file from aggregated tables.

A section is a stage module of `reasonlab.report` with KEY, TITLE, TABLES (the tables its
aggregation writes), optionally NEEDS (other stages' tables it reads) and
`section(tables, context) -> blocks`. A section is built when all its TABLES and NEEDS are given.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

from reasonlab.report import (
    activations,
    generate,
    guided,
    interventions,
    overview,
    score,
    traces,
    training,
)
from reasonlab.report.html import render

SECTIONS: tuple[ModuleType, ...] = (
    overview, generate, score, traces, activations, interventions, guided, training,
)  # fmt: skip


def reads(stage: ModuleType) -> tuple[str, ...]:
    """The tables a section needs: its own and those of other stages it reads."""
    return tuple(stage.TABLES) + tuple(getattr(stage, "NEEDS", ()))


def sections(tables: dict[str, str | Path], context: dict):
    """(key, title, blocks) of every section whose tables are all given, in SECTIONS' order."""
    import polars as pl

    frames = {name: pl.read_parquet(path) for name, path in tables.items()}
    if "models" in frames and "models" not in context:  # every model, for the colours of charts
        context = {**context, "models": sorted(frames["models"]["model"].drop_nulls().unique())}
    for stage in SECTIONS:
        if all(t in frames for t in reads(stage)):
            yield (
                stage.KEY,
                stage.TITLE,
                stage.section({t: frames[t] for t in reads(stage)}, context),
            )


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "chart"


def _chart_title(spec: dict) -> str:
    t = spec.get("title")
    if isinstance(t, dict):
        t = t.get("text")
    if isinstance(t, list):
        t = " ".join(map(str, t))
    return str(t or "")


def export_figures(tables: dict[str, str | Path], context: dict, out_dir: str | Path,
                   formats: tuple[str, ...] = ("svg", "png")) -> list[dict]:  # fmt: skip
    """Every chart of the report as files of its own — `<out_dir>/<section>/<nn>-<title>.<fmt>`,
    drawn by vl-convert in the chart's default view (the selectors' first choices) — and
    `<out_dir>/index.json` listing them (written last: its presence means the set is complete).
    The 3-D trace map (plotly) is interactive only. Returns the index's entries."""
    import json
    import shutil

    import altair as alt
    import polars as pl
    import vl_convert

    out = Path(out_dir)
    index_path = out / "index.json"
    index_path.unlink(missing_ok=True)
    vl_version = "v" + "_".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    entries = []
    for key, title, blocks in sections(tables, context):
        folder = out / key
        shutil.rmtree(folder, ignore_errors=True)  # no figure of an earlier run stays behind
        n = 0
        for block in blocks:
            if isinstance(block, pl.DataFrame) or not hasattr(block, "to_dict"):
                continue  # a table, an HTML snippet, a paragraph: not a chart
            with alt.data_transformers.disable_max_rows():
                spec = block.to_dict()
            for param in spec.get("params", []):
                param.pop("bind", None)  # the page's <select> elements are not here
            n += 1
            name = f"{n:02d}-{_slug(_chart_title(spec))}"
            folder.mkdir(parents=True, exist_ok=True)
            files = []
            for fmt in formats:
                path = folder / f"{name}.{fmt}"
                if fmt == "svg":
                    path.write_text(vl_convert.vegalite_to_svg(spec, vl_version=vl_version))
                elif fmt == "png":
                    path.write_bytes(
                        vl_convert.vegalite_to_png(spec, vl_version=vl_version, scale=2)
                    )
                else:
                    raise ValueError(f"figure format {fmt!r}: svg or png")
                files.append(str(path.relative_to(out)))
            entries.append({"section": key, "section_title": title, "title": _chart_title(spec),
                            "files": files})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    tmp = index_path.with_name("index.json.tmp")
    tmp.write_text(json.dumps(entries, indent=1, ensure_ascii=False))
    os.replace(tmp, index_path)
    return entries


def build_report(tables: dict[str, str | Path], context: dict, out: str | Path) -> list[str]:
    """Read the aggregated tables (name -> Parquet path), build every section whose tables are
    all present, in SECTIONS' order, and write one self-contained HTML file to `out` (atomically).

    `context` carries run facts that are not tables (`title`, `config_hash`, `version`; `models`,
    every model of the report in the order of its colours, defaults to the overview's models).
    Returns the keys of the sections written.
    """

    built = list(sections(tables, context))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"config {context.get('config_hash', '?')} · built {stamp}"
    doc = render(built, context.get("title", "reasonlab report"), subtitle)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, out)
    return [key for key, _, _ in built]
