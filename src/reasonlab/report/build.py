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


def build_report(tables: dict[str, str | Path], context: dict, out: str | Path) -> list[str]:
    """Read the aggregated tables (name -> Parquet path), build every section whose tables are
    all present, in SECTIONS' order, and write one self-contained HTML file to `out` (atomically).

    `context` carries run facts that are not tables (`title`, `config_hash`, `version`; `models`,
    every model of the report in the order of its colours, defaults to the overview's models).
    Returns the keys of the sections written.
    """
    import polars as pl

    frames = {name: pl.read_parquet(path) for name, path in tables.items()}
    if "models" in frames and "models" not in context:  # every model, for the colours of charts
        context = {**context, "models": sorted(frames["models"]["model"].drop_nulls().unique())}
    built = []
    for stage in SECTIONS:
        if all(t in frames for t in reads(stage)):
            blocks = stage.section({t: frames[t] for t in reads(stage)}, context)
            built.append((stage.KEY, stage.TITLE, blocks))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"config {context.get('config_hash', '?')} · built {stamp}"
    doc = render(built, context.get("title", "reasonlab report"), subtitle)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, out)
    return [key for key, _, _ in built]
