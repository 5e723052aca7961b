"""Guided inference (seed 004): the aggregation of every `guide` job and its report section.

`aggregate_guided` gathers each job's grid cells (`guided_cells`: accuracy with its Wilson
interval, realised oracle-token fraction against its target), its consultation points
(`guided_points`), the first problems of each cell as interleaved segments (`guided_traces`), and
paired tests (`guided_tests`: McNemar's exact test of every cell against the base alone on the
same problems — oracle-only against base-only is the row with policy `always`). `section` draws
accuracy against the oracle-token fraction (one curve per policy, base-only and oracle-only as its
ends), the accuracy table over the (c, k) grid, the consultation-point statistics by final
correctness and the coloured traces (oracle tokens highlighted, as seed 004's `--verbose`).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path

from reasonlab.report import charts
from reasonlab.report.html import Html, VegaLite
from reasonlab.report.tables import out_paths

KEY = "guided"
TITLE = "Guided inference: a small model consulting an oracle"
TABLES: tuple[str, ...] = ("guided_cells", "guided_points", "guided_traces", "guided_tests")
TRACES_PER_CELL = 3  # problems of each cell whose interleaved trace the report shows
STATS = ("entropy", "varentropy", "top1", "top2_diff", "attn_entropy", "attn_varentropy",
         "attn_agreement", "interaction", "kl", "js")  # fmt: skip
RUN = ["base", "oracle", "dataset"]
POLICY_ORDER = ("never", "always", "entropy", "varentropy", "top1", "random", "structural")


def _prefix(path) -> str:
    p = str(path)
    if not p.endswith(".cells.parquet"):
        raise ValueError(f"{p}: expected a guided job's .cells.parquet")
    return p[: -len(".cells.parquet")]


def aggregate_guided(
    words: list[str], paths: list[str | Path], out: Mapping[str, str | Path]
) -> None:
    """`words`: one `model/ckpt/model2/ckpt2/dataset/policy` per guide job; `paths`: its cells
    table (its problems and points tables beside it)."""
    import polars as pl

    from reasonlab.grading import mcnemar

    dest = out_paths(out, TABLES, "aggregate_guided")
    cells, points, traces, problems = [], [], [], []
    for word, path in zip(words, paths, strict=True):
        *_, dataset, policy = word.split("/")
        prefix = _prefix(path)
        cells.append(pl.read_parquet(path).with_columns(dataset=pl.lit(dataset)))
        points.append(
            pl.read_parquet(prefix + ".points.parquet").with_columns(dataset=pl.lit(dataset))
        )
        pr = pl.read_parquet(prefix + ".problems.parquet").with_columns(dataset=pl.lit(dataset))
        problems.append(pr.select(*RUN, "policy", "cell", "id", "correct"))
        first = pr["id"].unique(maintain_order=True).head(TRACES_PER_CELL)
        traces.append(pr.filter(pl.col("id").is_in(first.implode())).select(
            *RUN, "policy", "cell", "id", "prompt", "segments", "answer", "reference", "correct",
            "n_completion_tokens", "oracle_fraction", "n_consultations"))  # fmt: skip
    tests = []
    if problems:
        pr = pl.concat(problems, how="diagonal_relaxed")
        for key, run in pr.group_by(RUN, maintain_order=True):
            base = run.filter(pl.col("policy") == "never")
            if not base.height:
                continue
            ref = dict(zip(base["id"], base["correct"].fill_null(False), strict=True))
            for (cell, policy), g in run.filter(pl.col("policy") != "never").group_by(
                "cell", "policy", maintain_order=True
            ):
                g = g.filter(pl.col("id").is_in(list(ref)))
                t = mcnemar(g["correct"].fill_null(False).to_list(), [ref[i] for i in g["id"]])
                tests.append(dict(zip(RUN, key, strict=True)) | {
                    "policy": policy, "cell": cell, "accuracy": g["correct"].fill_null(False).mean(),
                    "base_accuracy": sum(ref[i] for i in g["id"]) / max(g.height, 1),
                    "wins": t["only_a"], "losses": t["only_b"], "p_value": t["p_value"], "n": t["n"]})  # fmt: skip
    for name, frames in (("guided_cells", cells), ("guided_points", points),
                         ("guided_traces", traces)):  # fmt: skip
        table = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
        table.write_parquet(dest[name])
    pl.DataFrame(tests, infer_schema_length=None).write_parquet(dest["guided_tests"])


def _esc(v) -> str:
    return "" if v is None else html.escape(str(v))


def _run_label(df):
    import polars as pl

    return df.with_columns(
        run=pl.format("{} → {} · {}", pl.col("base"), pl.col("oracle"), pl.col("dataset"))
    )


def _curve(cells) -> VegaLite:
    """Accuracy against the realised oracle-token fraction: one curve per policy from base-only
    (fraction 0) through its budget cells to oracle-only (1), Wilson intervals as bars."""
    import altair as alt
    import polars as pl

    ends = cells.filter(pl.col("policy").is_in(["never", "always"]))
    mids = cells.filter(~pl.col("policy").is_in(["never", "always"]))
    policies = sorted(set(mids["policy"])) or ["never"]
    rows = [mids]
    for p in policies:  # each policy's curve starts at base-only and ends at oracle-only
        rows.append(ends.with_columns(policy=pl.lit(p)))
    data = pl.concat(rows, how="diagonal_relaxed").select(
        "run", "policy", "cell", "c", "k", "step_size", "target", "oracle_fraction", "accuracy",
        "ci_low", "ci_high", "n", "matched")  # fmt: skip
    base = alt.Chart(data).encode(
        x=alt.X("oracle_fraction:Q", title="oracle-token fraction (realised)", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("policy:N", title="policy"),
    )  # fmt: skip
    tips = [
        "run",
        "cell",
        "target",
        "oracle_fraction",
        "accuracy",
        "ci_low",
        "ci_high",
        "n",
        "matched",
    ]
    line = base.mark_line(point=True).encode(
        y=alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1])),
        order="oracle_fraction:Q", tooltip=tips)  # fmt: skip
    bars = base.mark_rule(opacity=0.5).encode(y="ci_low:Q", y2="ci_high:Q")
    chart = (
        (bars + line)
        .properties(width=360, height=240)
        .facet(facet=alt.Facet("run:N", title=None), columns=2)
        .properties(title=charts._title(
            "Accuracy against the oracle-token fraction (base alone at 0, oracle alone at 1; 95 % Wilson intervals)"))
    )  # fmt: skip
    return VegaLite(charts._spec(chart))


def _grid(cells) -> list:
    """The (c, k) grid per policy and budget, as seed 004's table (and a heatmap when it is 2-D)."""
    import altair as alt
    import polars as pl

    g = cells.filter(~pl.col("policy").is_in(["never", "always"]))
    if not g.height or (g["c"].n_unique() < 2 and g["k"].n_unique() < 2):
        return []
    g = g.with_columns(budget=pl.col("target").cast(pl.String).fill_null("fixed"))
    chart = (
        alt.Chart(g.select("run", "policy", "budget", "c", "k", "accuracy", "oracle_fraction", "n"))
        .mark_rect()
        .encode(x=alt.X("k:O", title="k (oracle tokens per consultation)"),
                y=alt.Y("c:O", title="c (consultations at most)"),
                color=alt.Color("accuracy:Q", scale=alt.Scale(domain=[0, 1], scheme="viridis")),
                tooltip=["run", "policy", "budget", "c", "k", "accuracy", "oracle_fraction", "n"])
        .properties(width=160, height=120)
        .facet(row=alt.Row("policy:N"), column=alt.Column("budget:N", title="target fraction"))
        .properties(title=charts._title("Accuracy over the (c, k) grid"))
    )  # fmt: skip
    return [VegaLite(charts._spec(chart))]


def _points(points) -> list:
    """Mean of each consultation-point statistic for problems finally right and wrong."""
    import altair as alt
    import polars as pl

    pts = charts.usable(points, "policy", "correct")
    if not pts.height:
        return [charts.nothing("no consultation points (no policy consulted the oracle)")]
    stats = [s for s in STATS if s in pts.columns]
    long = pts.with_columns(pl.col("top1_match").cast(pl.Float64)).unpivot(
        index=["policy", "correct"], on=[*stats, "top1_match"], variable_name="statistic"
    )
    summary = (
        long.drop_nulls("value")
        .group_by("policy", "statistic", "correct")
        .agg(mean=pl.col("value").mean(), sd=pl.col("value").std(), n=pl.len())
        .with_columns(outcome=pl.when(pl.col("correct")).then(pl.lit("right")).otherwise(pl.lit("wrong")))
        .sort("statistic", "policy", "correct")
    )  # fmt: skip
    chart = (
        alt.Chart(summary)
        .mark_bar()
        .encode(x=alt.X("policy:N", title=None), xOffset="outcome:N",
                y=alt.Y("mean:Q", title="mean at the consultation points"),
                color=alt.Color("outcome:N", title="final answer",
                                scale=alt.Scale(domain=["right", "wrong"], range=["#4c78a8", "#e45756"])),
                tooltip=["policy", "statistic", "outcome", "mean", "sd", "n"])
        .properties(width=150, height=120)
        .facet(facet=alt.Facet("statistic:N", title=None), columns=5)
        .resolve_scale(y="independent")
        .properties(title=charts._title("Consultation-point statistics by final correctness"))
    )  # fmt: skip
    return [VegaLite(charts._spec(chart)), charts.table(summary.drop("correct"))]


def trace_html(segments: list[dict]) -> str:
    """A trace with its oracle segments highlighted (the report's version of seed 004's view)."""
    return "".join(
        f'<mark class="oracle" title="oracle">{_esc(s["text"])}</mark>' if s["source"] == "oracle"
        else f"<span>{_esc(s['text'])}</span>" for s in segments
    )  # fmt: skip


def _traces(traces, cells) -> Html:

    if not traces.height:
        return charts.nothing("no traces")
    # per run: base alone, oracle alone and each policy's highest-budget cell
    keep = (
        cells.sort("oracle_fraction").group_by("run", "policy", maintain_order=True).last()
        .select("run", "cell")
    )  # fmt: skip
    t = _run_label(traces).join(keep, on=["run", "cell"], how="inner")
    items = []
    for (run, pid), g in t.sort("run", "id").group_by("run", "id", maintain_order=True):
        first = g.row(0, named=True)
        rows = []
        for r in g.sort("oracle_fraction").iter_rows(named=True):
            mark = (
                '<span class="ok">correct</span>'
                if r["correct"]
                else '<span class="warn">wrong</span>'
            )
            rows.append(f"<p><b>{_esc(r['cell'])}</b> · answer <code>{_esc(r['answer'])}</code> {mark} "
                        f"· {r['n_completion_tokens']} tokens, oracle {r['oracle_fraction']:.0%}, "
                        f"{r['n_consultations']} consultations</p>"
                        f"<pre class=\"guided\">{trace_html(json.loads(r['segments']))}</pre>")  # fmt: skip
        items.append(f"<details><summary>{_esc(run)} · {_esc(pid)} (reference <code>"
                     f"{_esc(first['reference'])}</code>)</summary><pre>{_esc(first['prompt'])}</pre>"
                     + "".join(rows) + "</details>")  # fmt: skip
    style = "<style>pre.guided mark.oracle{background:#ffe08a;color:inherit}</style>"
    return Html(style + "".join(items))


def section(tables: dict, context: dict) -> list:
    import polars as pl

    cells = charts.usable(tables["guided_cells"], "policy", "accuracy")
    if not cells.height:
        return [charts.nothing("no guided-inference job was run")]
    cells = _run_label(cells)
    blocks: list = [Html(
        "<p>The base model generates <i>step</i> tokens at a time and consults the oracle (which "
        "writes <i>k</i> tokens) when its policy fires, at most <i>c</i> times per problem. Entropy, "
        "varentropy and top-1 triggers are evaluated at every base token; the random (probability "
        "rising with position) and structural (a blank line then a hesitation word) triggers at step "
        "boundaries. <b>Budget matching</b>: each statistic policy's threshold is a quantile of the "
        "base's own statistic on a base-only run of the same problems, and the random policy's rate "
        "a multiple of its schedule, searched until the realised oracle-token fraction (a trace's "
        "oracle tokens ÷ its generated tokens, averaged) is within the tolerance of the target; "
        "<i>matched</i> says whether it got there. Tokens pass between the models as token ids; "
        "each keeps its own KV cache.</p>")]  # fmt: skip
    tests = tables.get("guided_tests", pl.DataFrame())
    if tests.height:
        tests = _run_label(tests)
        ends = tests.filter(pl.col("policy") == "always")
        if ends.height:
            lines = "; ".join(
                f"{_esc(r['run'])}: base alone {r['base_accuracy']:.2f}, oracle alone "
                f"{r['accuracy']:.2f} ({r['wins']} problems only the oracle solves, {r['losses']} "
                f"only the base; McNemar p = {r['p_value']:.2g})" for r in ends.iter_rows(named=True))  # fmt: skip
            blocks.append(Html(f"<p><b>Does the oracle help?</b> {lines}.</p>"))
    blocks.append(_curve(cells))
    cols = ["run", "cell", "target", "oracle_fraction", "matched", "calibration_runs",
            "threshold", "rate", "n", "accuracy", "ci_low", "ci_high", "mean_tokens",
            "consultations", "oracle_tokens"]  # fmt: skip
    if cells["run"].n_unique() == 1:  # one run: named in the charts' titles, not on every row
        cols.remove("run")
    rank = {p: i for i, p in enumerate(POLICY_ORDER)}
    cells = cells.with_columns(_rank=pl.col("policy").replace_strict(rank, default=len(rank)))
    blocks += [Html("<h3>Every cell</h3><p>Accuracy with its 95 % Wilson interval per policy and "
                    "(c, k, step) cell (named <i>policy c= k= s=</i> and <i>@target</i>); the "
                    "target and realised oracle-token fraction; the threshold (statistic "
                    "policies) or schedule multiple (random) the budget search settled on.</p>"),
               charts.table(cells.sort("run", "_rank", "order").select([c for c in cols if c in cells.columns]))]  # fmt: skip
    blocks += _grid(cells)
    if tests.height:
        blocks += [Html("<h3>Paired tests against the base alone</h3><p>McNemar's exact test on "
                        "the same problems: <i>wins</i> = problems the cell solves and the base "
                        "alone does not, <i>losses</i> the reverse.</p>"),
                   charts.table(tests.select("run", "cell", "accuracy", "base_accuracy", "wins",
                                             "losses", "p_value", "n"))]  # fmt: skip
    points = tables.get("guided_points", pl.DataFrame())
    blocks += [Html("<h3>At the consultation points</h3><p>The base's next-token entropy, "
                    "varentropy, top-1 probability and top-1 − top-2 difference where it consulted; "
                    "its attention entropy at the configured layer (each head's over the valid "
                    "context only, ÷ log of the context length; mean and variance over heads) and "
                    "interaction strength (mean |pre-softmax score|); the base–oracle agreement "
                    "there (top-1 match, KL(base ‖ oracle), Jensen–Shannon), for problems whose final "
                    "answer was right and wrong.</p>")] + _points(points)  # fmt: skip
    blocks += [Html("<h3>Traces</h3><p>Oracle tokens highlighted; per run, the base alone, the "
                    "oracle alone and each policy's largest budget.</p>"),
               _traces(tables.get("guided_traces", pl.DataFrame()), cells)]  # fmt: skip
    return blocks
