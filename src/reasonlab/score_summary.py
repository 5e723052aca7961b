"""Aggregations of the scoring stage across models, checkpoints and text sets, and their report section.

`aggregate_scores` reads every (model, ckpt, text set) pair of score tables and writes small tidy
tables (seed 002's per-prompt and per-checkpoint statistics, entropy distributions, entropy over
generation steps, extreme tokens; seed 003's log-likelihood dynamics by sample type); the section
`token-scores` draws them.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from reasonlab.report import Html, section

HIST_BINS = 40


@dataclass(frozen=True)
class ScoreJob:
    """Where one score job's tables are and what they belong to."""

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


def aggregate_scores(jobs: list[ScoreJob], out: dict[str, str | Path], sample_prompts: int = 4,
                     extremes: int = 15, detailed: bool = False) -> None:  # fmt: skip
    """Write the scoring stage's aggregated tables: keys of `out` are sequences, checkpoints,
    entropy_hist, steps, extremes, by_type (and tokens when `detailed`)."""
    import numpy as np
    import polars as pl

    seqs, ckpts, steps, ext, detail = [], [], [], [], []
    hist_rows = []
    edges = None
    frames = []
    for j in jobs:
        t = pl.read_parquet(j.tokens).filter(~pl.col("is_prompt"))
        s = pl.read_parquet(j.sequences)
        frames.append((j, t, s))
    max_entropy = max((float(t["entropy"].max()) for _, t, _ in frames if t.height), default=1.0)
    edges = [max_entropy * i / HIST_BINS for i in range(HIST_BINS + 1)]
    agree = []
    for j, t, s in frames:
        label = textset_label(j.textset, j.model, j.ckpt)
        tag = [pl.lit(j.model).alias("model"), pl.lit(j.ckpt).alias("ckpt"),
               pl.lit(j.ckpt_order).alias("ckpt_order"), pl.lit(label).alias("textset")]  # fmt: skip
        if label.endswith("@self") and "gen_logprob" in t.columns:
            agree.append(agreement(t).with_columns(tag))
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
                hist_rows.append({"model": j.model, "ckpt": j.ckpt, "ckpt_order": j.ckpt_order, "textset": label,
                                  "bin_start": edges[b], "bin_end": edges[b + 1], "count": c,
                                  "density": c / total / (edges[b + 1] - edges[b])})  # fmt: skip
        sample_ids = s.filter(pl.col("n_tokens") > 0)["id"].head(sample_prompts).to_list()
        steps.append(
            t.filter(pl.col("id").is_in(sample_ids))
            .select("id", "position", "token", "entropy", "logprob")
            .with_columns(tag)
        )
        for label, desc in (("highest", True), ("lowest", False)):
            picked = t.sort("entropy", descending=desc).head(extremes)
            ext.append(
                _context(t, picked)
                .select("id", "position", "token", "entropy", "prob", "top1_token", "context")
                .with_columns(tag + [pl.lit(label).alias("which")])
            )
        if detailed:
            detail.append(t.with_columns(tag))

    seq = pl.concat(seqs, how="diagonal_relaxed")
    seq.write_parquet(out["sequences"])
    pl.concat(ckpts).write_parquet(out["checkpoints"])
    pl.DataFrame(hist_rows, schema_overrides={"density": pl.Float64}).write_parquet(
        out["entropy_hist"]
    )
    pl.concat(steps).write_parquet(out["steps"])
    pl.concat(ext).write_parquet(out["extremes"])
    empty = pl.DataFrame(schema=_agreement_schema(tagged=True))
    (pl.concat(agree) if agree else empty).write_parquet(out["agreement"])
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
        .write_parquet(out["by_type"])
    )
    if detailed:
        pl.concat(detail).write_parquet(out["tokens"])


AGREEMENT_TOLERANCE = 1e-3  # nats; vLLM in float32 vs the scorer on the same tokens


def _agreement_schema(tagged: bool = False) -> dict:
    import polars as pl

    cols = {"n_tokens": pl.Int64, "n_compared": pl.Int64, "max_abs_diff": pl.Float64,
            "mean_abs_diff": pl.Float64, "p99_abs_diff": pl.Float64, "within_tolerance": pl.Float64}  # fmt: skip
    tags = {"model": pl.String, "ckpt": pl.String, "ckpt_order": pl.Int32, "textset": pl.String}
    return cols | tags if tagged else cols


def textset_label(textset: str, model: str, ckpt: str) -> str:
    """The text set's name in aggregated tables: a checkpoint's own generations
    (`<dataset>@<model>@<ckpt>` scored under that same checkpoint) become `<dataset>@self`, so
    they line up across checkpoints; every other name is kept."""
    dataset, _, generator = textset.partition("@")
    return f"{dataset}@self" if generator == f"{model}@{ckpt}" else textset


def agreement(tokens):
    """How the generator's log-probabilities of its sampled tokens compare with the scorer's on
    the same tokens (one row): counts and absolute differences in nats, and the fraction of tokens
    within AGREEMENT_TOLERANCE. Tokens the generator gave no log-probability for are not compared."""
    import polars as pl

    d = (
        tokens.filter(~pl.col("is_prompt") & pl.col("gen_logprob").is_not_null())
        .select(diff=(pl.col("logprob") - pl.col("gen_logprob")).abs())
        .get_column("diff")
    )
    row = {"n_tokens": tokens.filter(~pl.col("is_prompt")).height, "n_compared": d.len(),
           "max_abs_diff": d.max() if d.len() else None, "mean_abs_diff": d.mean() if d.len() else None,
           "p99_abs_diff": d.quantile(0.99) if d.len() else None,
           "within_tolerance": float((d <= AGREEMENT_TOLERANCE).mean()) if d.len() else None}  # fmt: skip
    return pl.DataFrame([row], schema=_agreement_schema())


def _ckpt_sort(df):
    """Checkpoint names in config order, for chart axes."""
    return df.sort("ckpt_order")["ckpt"].unique(maintain_order=True).to_list()


@section(
    "token-scores",
    "Token entropy and log-likelihood",
    order=20,
    tables=(
        "score_checkpoints",
        "score_sequences",
        "score_entropy_hist",
        "score_steps",
        "score_extremes",
        "score_by_type",
        "score_agreement",
    ),
)
def score_section(tables: dict, context: dict) -> list:
    import altair as alt
    import polars as pl

    ck, hist, steps = (
        tables["score_checkpoints"],
        tables["score_entropy_hist"],
        tables["score_steps"],
    )
    ext, by_type, seqs = (
        tables["score_extremes"],
        tables["score_by_type"],
        tables["score_sequences"],
    )
    order = _ckpt_sort(ck)
    blocks: list = [
        Html(
            "<p>Teacher-forced scoring of each text set's completions under every model × checkpoint: "
            "entropy is over the full vocabulary, log-likelihoods are sums of log-probabilities of the "
            "completion's tokens (perplexity = exp(−mean)).</p><h3>Per checkpoint</h3>"
        ),
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
        ),  # fmt: skip
    ]
    agree = tables["score_agreement"]
    if agree.height:
        worst = agree["max_abs_diff"].max()
        verdict = "agree" if worst is not None and worst <= AGREEMENT_TOLERANCE else "DISAGREE"
        blocks.append(
            Html(
                "<h3>Generator vs scorer log-probabilities</h3><p>Each checkpoint's own generations "
                "(<code>&lt;dataset&gt;@self</code>) scored on their exact tokens: the log-probability the "
                "generator reported for each sampled token against the scorer's. They "
                f"<b>{verdict}</b>: largest difference {worst:.2e} nats (tolerance "
                f"{AGREEMENT_TOLERANCE:g}). A larger difference means the two engines do not run the same "
                "model (dtype, tokenizer or weights).</p>"
            )
        )
        blocks.append(
            agree.sort("model", "textset", "ckpt_order").select(
                "model",
                "ckpt",
                "textset",
                "n_compared",
                "max_abs_diff",
                "mean_abs_diff",
                "p99_abs_diff",
                "within_tolerance",
            )  # fmt: skip
        )
    if hist.height:
        blocks.append(Html("<h3>Entropy distribution</h3>"))
        blocks.append(
            alt.Chart(hist)
            .mark_line(interpolate="step-after")
            .encode(
                x=alt.X("bin_start:Q", title="entropy (nats)"),
                y=alt.Y("density:Q", title="density"),
                color=alt.Color("ckpt:N", sort=order, title="checkpoint"),
                strokeDash=alt.StrokeDash("model:N"),
                tooltip=["model", "ckpt", "textset", "bin_start", "count"],
            )
            .properties(width=320, height=200)
            .facet(column=alt.Column("textset:N", title=None))
        )
    if steps.height:
        blocks.append(Html("<h3>Entropy over generation steps (sample texts)</h3>"))
        blocks.append(
            alt.Chart(steps.with_columns(text=pl.col("textset") + " · " + pl.col("id")))
            .mark_line(point=alt.OverlayMarkDef(size=12))
            .encode(
                x=alt.X("position:Q", title="step"),
                y=alt.Y("entropy:Q", title="entropy (nats)"),
                color=alt.Color("ckpt:N", sort=order, title="checkpoint"),
                strokeDash=alt.StrokeDash("model:N"),
                tooltip=["model", "ckpt", "id", "position", "token", "entropy", "logprob"],
            )
            .properties(width=260, height=150)
            .facet(facet=alt.Facet("text:N", title=None), columns=4)
        )
    if by_type.height:
        blocks.append(
            Html("<h3>Log-likelihood and perplexity by sample type across checkpoints</h3>")
        )
        base = alt.Chart(by_type).encode(
            x=alt.X("ckpt:N", sort=order, title="checkpoint"),
            color=alt.Color("type:N", title="sample type"),
            strokeDash=alt.StrokeDash("model:N"),
            tooltip=[
                "model",
                "ckpt",
                "textset",
                "type",
                "n_texts",
                "avg_log_likelihood",
                "avg_perplexity",
            ],
        )
        blocks.append(
            alt.hconcat(
                base.mark_line(point=True)
                .encode(y=alt.Y("avg_log_likelihood:Q", title="mean log-likelihood (nats)"))
                .properties(width=300, height=200),
                base.mark_line(point=True)
                .encode(
                    y=alt.Y(
                        "avg_perplexity:Q", title="mean perplexity", scale=alt.Scale(type="log")
                    )
                )
                .properties(width=300, height=200),
            )  # fmt: skip
        )
        blocks.append(
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
            )
        )
    if ext.height:
        blocks.append(Html("<h3>Highest- and lowest-entropy tokens</h3>"))
        shown = ext.sort(
            "model",
            "textset",
            "ckpt_order",
            "which",
            "entropy",
            descending=[False, False, False, False, True],
        )
        rows = []
        for r in shown.iter_rows(named=True):
            ctx = html.escape(r["context"] or "")
            rows.append(
                f"<tr><td>{html.escape(r['model'])}</td><td>{html.escape(r['ckpt'])}</td><td>{html.escape(r['textset'])}</td>"
                f"<td>{r['which']}</td><td class='num'>{r['entropy']:.3f}</td><td class='num'>{r['prob']:.3f}</td>"
                f"<td>{html.escape(r['id'])}:{r['position']}</td><td><code>…{ctx}</code><b><code>{html.escape(r['token'])}</code></b></td>"
                f"<td><code>{html.escape(r['top1_token'])}</code></td></tr>"
            )  # fmt: skip
        blocks.append(
            Html(
                "<div class='tablewrap'><table><thead><tr><th>model</th><th>ckpt</th><th>text set</th><th>which</th>"
                "<th>entropy</th><th>p(token)</th><th>text:step</th><th>context + <b>token</b></th><th>top-1</th>"
                f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            )
        )
    if seqs.height:
        blocks.append(Html("<h3>Per-text log-likelihood across checkpoints</h3>"))
        wide = (
            seqs.with_columns(col=pl.col("model") + "/" + pl.col("ckpt"))
            .pivot(on="col", index=["textset", "id"], values="llh_sum")
            .sort("textset", "id")
        )
        blocks.append(wide)
    return blocks
