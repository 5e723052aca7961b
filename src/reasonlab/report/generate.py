"""Graded generations across models, checkpoints and datasets, and their report section.

`aggregate_generations` reads every job's graded generations
(`results/generations/<model>/<ckpt>/<dataset>.parquet`) and writes accuracy with 95 % Wilson
intervals (overall and per difficulty level), completion lengths and finish reasons, and a few
traces per job; `section` draws accuracy and lengths over checkpoints and a trace browser.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reasonlab.grading import wilson
from reasonlab.report import charts
from reasonlab.report.html import Html
from reasonlab.report.tables import out_paths

KEY = "generation"
TITLE = "Generation and accuracy"
TABLES: tuple[str, ...] = ("gen_accuracy", "gen_levels", "gen_lengths", "gen_traces")

TRACES_PER_JOB = 3
NO_LEVEL = "(no level)"

STR, INT, FLT, BOOL = "String", "Int64", "Float64", "Boolean"
TAGS = {"model": STR, "ckpt": STR, "ckpt_order": INT, "dataset": STR}
COUNTS = {"n": INT, "correct": INT, "accuracy": FLT, "ci_low": FLT, "ci_high": FLT}
SCHEMAS = {
    "gen_accuracy": TAGS | COUNTS | {"flagged": INT, "finished": INT},
    "gen_levels": TAGS | {"level": STR} | COUNTS,
    "gen_lengths": {
        "id": STR,
        "sample": INT,
        "level": STR,
        "n_completion_tokens": INT,
        "finish_reason": STR,
        "correct": BOOL,
    }
    | TAGS,
    "gen_traces": {
        "id": STR,
        "sample": INT,
        "level": STR,
        "prompt": STR,
        "reasoning": STR,
        "answer": STR,
        "reference": STR,
        "correct": BOOL,
        "grade_flag": STR,
    }
    | TAGS,
}
# the columns each of those tables takes from a graded table (the rest are the job's tags)
FROM_GRADED = {
    name: [c for c in SCHEMAS[name] if c not in TAGS] for name in ("gen_lengths", "gen_traces")
}


@dataclass(frozen=True)
class GenJob:
    """One generation job's graded table and what it belongs to (`ckpt_order`: the checkpoint's
    place in its model's list of checkpoints)."""

    model: str
    ckpt: str
    ckpt_order: int
    dataset: str
    graded: str | Path


def _schema(name: str) -> dict:
    import polars as pl

    return {c: getattr(pl, t) for c, t in SCHEMAS[name].items()}


def _accuracy(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {
        "n": n,
        "correct": k,
        "accuracy": k / n if n else None,
        "ci_low": None if math.isnan(lo) else lo,
        "ci_high": None if math.isnan(hi) else hi,
    }


def aggregate_generations(jobs: list[GenJob], out: Mapping[str, str | Path]) -> None:
    """Write `gen_accuracy` (per model x checkpoint x dataset: n, correct, accuracy with its 95 %
    Wilson interval, flagged and finished counts), `gen_levels` (the same per difficulty `level`,
    for datasets that have levels), `gen_lengths` (one row per completion) and `gen_traces`
    (TRACES_PER_JOB completions per job) to the paths `out` names for them."""
    import polars as pl

    paths = out_paths(out, TABLES, "aggregate_generations")
    acc, levels, lengths, traces = [], [], [], []
    for j in jobs:
        g = pl.read_parquet(j.graded)
        if "level" not in g.columns:  # graded before levels were carried over
            g = g.with_columns(level=pl.lit(None, pl.String))
        tag = {"model": j.model, "ckpt": j.ckpt, "ckpt_order": j.ckpt_order, "dataset": j.dataset}
        acc.append(
            tag
            | _accuracy(int(g["correct"].sum()), g.height)
            | {
                "flagged": int(g["grade_flag"].is_not_null().sum()),
                "finished": int((g["finish_reason"] == "stop").sum()),
            }
        )
        if g["level"].is_not_null().any():
            by_level = g.group_by("level").agg(n=pl.len(), k=pl.col("correct").sum())
            for level, n, k in by_level.iter_rows():
                levels.append(tag | {"level": level} | _accuracy(int(k), int(n)))
        cols = [pl.lit(v).alias(c) for c, v in tag.items()]
        lengths.append(g.select(FROM_GRADED["gen_lengths"]).with_columns(cols))
        traces.append(g.head(TRACES_PER_JOB).select(FROM_GRADED["gen_traces"]).with_columns(cols))
    for name, rows in (("gen_accuracy", acc), ("gen_levels", levels)):
        pl.DataFrame(rows, schema=_schema(name)).write_parquet(paths[name])
    for name, frames in (("gen_lengths", lengths), ("gen_traces", traces)):
        schema = _schema(name)
        frames = [f.cast(schema) for f in frames] or [pl.DataFrame(schema=schema)]
        pl.concat(frames).select(list(schema)).write_parquet(paths[name])


def _length_summary(lengths):
    import polars as pl

    return (
        charts.usable(lengths, "model", "ckpt", "dataset", "n_completion_tokens")
        .group_by("model", "ckpt", "ckpt_order", "dataset")
        .agg(
            n=pl.len(),
            median=pl.col("n_completion_tokens").median(),
            q25=pl.col("n_completion_tokens").quantile(0.25),
            q75=pl.col("n_completion_tokens").quantile(0.75),
            max=pl.col("n_completion_tokens").max(),
            stopped=(pl.col("finish_reason") == "stop").mean(),
        )
        .sort("dataset", "model", "ckpt_order")
    )


def _esc(v) -> str:
    return "" if v is None else html.escape(str(v))


def _traces(traces, sel) -> Html:
    items = []
    shown = charts.usable(traces, "model", "ckpt", "dataset")
    for r in shown.sort("dataset", "model", "ckpt_order", "id").iter_rows(named=True):
        if r["correct"] is None:
            mark = '<span class="warn">not graded</span>'
        else:
            mark = (
                '<span class="ok">correct</span>'
                if r["correct"]
                else '<span class="warn">wrong</span>'
            )
        flag = f" ({_esc(r['grade_flag'])})" if r["grade_flag"] else ""
        items.append(
            f"<details{charts.row_tags(sel, r)}><summary>{_esc(r['model'])}/{_esc(r['ckpt'])} · "
            f"{_esc(r['dataset'])} · {_esc(r['id'])}: answer <code>{_esc(r['answer'])}</code>, "
            f"reference <code>{_esc(r['reference'])}</code> — {mark}{flag}</summary>"
            f"<pre>{_esc(r['prompt'])}</pre><p><b>reasoning</b></p><pre>{_esc(r['reasoning'])}</pre>"
            "</details>"
        )
    return Html("".join(items)) if items else charts.nothing("no traces")


def section(tables: dict, context: dict) -> list:
    """Accuracy (overall and per level) and completion lengths over checkpoints, finish reasons,
    and a browser of a few traces per job; all following the section's selectors."""
    import polars as pl

    acc = charts.usable(tables["gen_accuracy"], "model", "ckpt", "dataset")
    levels = charts.usable(tables["gen_levels"], "model", "ckpt", "dataset")
    lengths = charts.usable(tables["gen_lengths"], "model", "ckpt", "dataset")
    traces = tables["gen_traces"]
    if not (acc.height or lengths.height):
        return [charts.nothing("no graded generations")]
    sel = charts.selectors(
        KEY,
        acc,
        levels,
        lengths,
        set_field="dataset",
        set_label="dataset",
        palette=context.get("models"),
        few=context.get("checkpoints_shown"),
    )
    blocks: list = [
        Html(
            "<p>Completions of each dataset's questions, their extracted answers graded against "
            "the references (GSM8K: numeric; MATH and others: math-verify). Bars are 95 % Wilson "
            "intervals. Charts and tables follow the selectors.</p>"
        ),
        charts.selector_bar(sel),
        Html("<h3>Accuracy by checkpoint</h3>"),
        charts.checkpoint_chart(
            acc,
            "accuracy",
            sel,
            title="Accuracy (95 % Wilson interval)",
            interval=("ci_low", "ci_high"),
            unit_y=True,
            tooltip=("n", "correct"),
        ),
        charts.table(acc.sort("dataset", "model", "ckpt_order").drop("ckpt_order"), sel),
        Html("<h3>Accuracy by difficulty level</h3>"),
    ]
    if levels.height:
        levels = levels.with_columns(pl.col("level").fill_null(NO_LEVEL))
        rank = {v: i for i, v in enumerate(charts.natural_order(levels["level"]))}
        blocks += [
            charts.checkpoint_chart(
                levels,
                "accuracy",
                sel,
                color="level",
                title="Accuracy per level (95 % Wilson interval)",
                interval=("ci_low", "ci_high"),
                unit_y=True,
                tooltip=("n", "correct"),
            ),
            charts.table(
                levels.with_columns(
                    _rank=pl.col("level").replace_strict(rank, return_dtype=pl.Int64)
                )
                .sort("dataset", "model", "ckpt_order", "_rank")
                .drop("ckpt_order", "_rank"),
                sel,
            ),
        ]
    else:
        blocks.append(charts.nothing("no dataset has difficulty levels"))
    blocks.append(Html("<h3>Completion lengths and finish reasons</h3>"))
    if lengths.height:
        summary = _length_summary(lengths)
        blocks += [
            charts.checkpoint_chart(
                summary,
                "median",
                sel,
                title="Completion tokens (median; bars: quartiles)",
                y_title="tokens",
                interval=("q25", "q75"),
                tooltip=("max", "n"),
            ),
            charts.checkpoint_chart(
                summary,
                "stopped",
                sel,
                unit_y=True,
                y_title="share stopped",
                title="Share of completions that stopped (not cut at the token limit)",
            ),
            charts.table(summary.drop("ckpt_order"), sel),
            charts.table(
                lengths.group_by("model", "ckpt", "ckpt_order", "dataset", "finish_reason")
                .agg(count=pl.len())
                .sort("dataset", "model", "ckpt_order", "finish_reason")
                .drop("ckpt_order"),
                sel,
                caption="Finish reasons",
            ),
        ]
    else:
        blocks.append(charts.nothing("no completion lengths"))
    blocks += [Html("<h3>Trace browser</h3>"), _traces(traces, sel)]
    return blocks
