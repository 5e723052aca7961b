"""Aggregations of graded generations across models, checkpoints and datasets, and their report
section: accuracy with 95 % Wilson intervals, completion lengths, finish reasons, a trace browser."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from reasonlab.grading import wilson
from reasonlab.report import Html, section

TRACES_PER_JOB = 3


@dataclass(frozen=True)
class GenJob:
    model: str
    ckpt: str
    ckpt_order: int
    dataset: str
    graded: str | Path


def aggregate_generations(jobs: list[GenJob], out: dict[str, str | Path]) -> None:
    """Write accuracy, lengths (per completion) and traces (a few per job) tables."""
    import polars as pl

    acc, lengths, traces = [], [], []
    for j in jobs:
        g = pl.read_parquet(j.graded)
        tag = [pl.lit(j.model).alias("model"), pl.lit(j.ckpt).alias("ckpt"),
               pl.lit(j.ckpt_order).alias("ckpt_order"), pl.lit(j.dataset).alias("dataset")]  # fmt: skip
        k, n = int(g["correct"].sum()), g.height
        lo, hi = wilson(k, n)
        acc.append({"model": j.model, "ckpt": j.ckpt, "ckpt_order": j.ckpt_order, "dataset": j.dataset,
                    "n": n, "correct": k, "accuracy": k / n if n else None, "ci_low": lo, "ci_high": hi,
                    "flagged": int(g["grade_flag"].is_not_null().sum()),
                    "finished": int((g["finish_reason"] == "stop").sum())})  # fmt: skip
        lengths.append(
            g.select(
                "id", "sample", "n_completion_tokens", "finish_reason", "correct"
            ).with_columns(tag)
        )
        traces.append(
            g.head(TRACES_PER_JOB)
            .select(
                "id",
                "sample",
                "prompt",
                "reasoning",
                "answer",
                "reference",
                "correct",
                "grade_flag",
            )
            .with_columns(tag)
        )
    pl.DataFrame(acc).write_parquet(out["accuracy"])
    pl.concat(lengths).write_parquet(out["lengths"])
    pl.concat(traces).write_parquet(out["traces"])


@section(
    "generation",
    "Generation and accuracy",
    order=10,
    tables=("gen_accuracy", "gen_lengths", "gen_traces"),
)
def generation_section(tables: dict, context: dict) -> list:
    import altair as alt
    import polars as pl

    acc, lengths, traces = tables["gen_accuracy"], tables["gen_lengths"], tables["gen_traces"]
    order = acc.sort("ckpt_order")["ckpt"].unique(maintain_order=True).to_list()
    base = alt.Chart(acc).encode(x=alt.X("ckpt:N", sort=order, title="checkpoint"), color="model:N")
    blocks: list = [
        Html(
            "<p>Completions of each dataset's questions, their extracted answers graded against the "
            "references (GSM8K: numeric; MATH and others: math-verify). Bars are 95 % Wilson intervals.</p>"
            "<h3>Accuracy by checkpoint</h3>"
        ),  # fmt: skip
        (
            base.mark_rule().encode(
                y=alt.Y("ci_low:Q", title="accuracy", scale=alt.Scale(domain=[0, 1])),
                y2="ci_high:Q",
            )
            + base.mark_point(filled=True, size=60).encode(
                y="accuracy:Q",
                tooltip=[
                    "model",
                    "ckpt",
                    "dataset",
                    "n",
                    "correct",
                    "accuracy",
                    "ci_low",
                    "ci_high",
                ],
            )
        )
        .properties(width=320, height=200)
        .facet(column=alt.Column("dataset:N", title=None)),  # fmt: skip
        acc.sort("dataset", "model", "ckpt_order").drop("ckpt_order"),
        Html("<h3>Completion lengths</h3>"),
        alt.Chart(lengths)
        .mark_boxplot(extent="min-max")
        .encode(
            x=alt.X("ckpt:N", sort=order),
            y=alt.Y("n_completion_tokens:Q", title="tokens"),
            color="model:N",
        )
        .properties(width=320, height=200)
        .facet(column=alt.Column("dataset:N", title=None)),
        Html("<h3>Finish reasons</h3>"),
        lengths.group_by("model", "ckpt", "dataset", "finish_reason")
        .agg(count=pl.len())
        .sort("model", "ckpt", "dataset"),
        Html("<h3>Trace browser</h3>"),
    ]
    items = []
    for r in traces.sort("dataset", "model", "ckpt_order", "id").iter_rows(named=True):
        mark = (
            '<span class="ok">correct</span>' if r["correct"] else '<span class="warn">wrong</span>'
        )
        flag = f" ({html.escape(r['grade_flag'])})" if r["grade_flag"] else ""
        items.append(
            f"<details><summary>{html.escape(r['model'])}/{html.escape(r['ckpt'])} · {html.escape(r['dataset'])} · "
            f"{html.escape(r['id'])}: answer <code>{html.escape(str(r['answer']))}</code>, reference "
            f"<code>{html.escape(str(r['reference']))}</code> — {mark}{flag}</summary>"
            f"<pre>{html.escape(r['prompt'])}</pre><p><b>reasoning</b></p><pre>{html.escape(r['reasoning'] or '')}</pre></details>"
        )  # fmt: skip
    blocks.append(Html("".join(items)))
    return blocks
