"""Interventions (seed 001's causal methodology): steering sweeps and ablations per checkpoint, and
their report section.

`aggregate_interventions` gathers every `intervene` job's per-setting summary into one table;
`section` draws the effect of each steering strength (accuracy with its interval, completion
length, entropy of the generated tokens, first-token KL to the baseline) per checkpoint, and the
table of every setting (ablations included, failed settings with their reason).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from reasonlab.report import charts
from reasonlab.report.html import Html
from reasonlab.report.tables import out_paths

KEY = "interventions"
TITLE = "Interventions: steering and ablation"
TABLES: tuple[str, ...] = ("int_settings",)


def aggregate_interventions(words: list[str], paths: list[str | Path],
                            out: Mapping[str, str | Path]) -> None:  # fmt: skip
    """`words`: one `model/ckpt/order/spec` per job, `paths`: its settings table."""
    import polars as pl

    dest = out_paths(out, TABLES, "aggregate_interventions")
    frames = []
    for word, path in zip(words, paths, strict=True):
        model, ckpt, order, spec = word.split("/")
        df = pl.read_parquet(path)
        frames.append(df.with_columns(model=pl.lit(model), ckpt=pl.lit(ckpt),
                                      ckpt_order=pl.lit(int(order)), spec=pl.lit(spec)))  # fmt: skip
    table = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    table.write_parquet(dest["int_settings"])


def section(tables: dict, context: dict) -> list:
    import polars as pl

    st = charts.usable(tables["int_settings"], "model", "ckpt", "setting")
    if not st.height:
        return [charts.nothing("no intervention was run")]
    palette = context.get("models")
    sel = charts.selectors(KEY, st, set_field="spec", set_label="intervention", palette=palette)
    blocks: list = [
        Html("<p>Each checkpoint generates on the evaluation prompts under every setting of a spec, "
             "the baseline (no intervention) in the same job. Steering adds strength × the "
             "checkpoint's chosen reasoning direction (the raw difference of means) at its layer, "
             "in the prompt and at every generated token; directional ablation projects it out "
             "everywhere; layer ablation removes a layer's contribution (zero) or replaces it by "
             "its mean. Entropy: of the generated tokens under the distribution that produced "
             "them; KL: of the first generated token's distribution, to the baseline's.</p>"),
        charts.selector_bar(sel),
    ]  # fmt: skip
    steer = st.filter(pl.col("kind").is_in(["steer", "baseline"]) & (pl.col("status") == "ok"))
    steer = steer.with_columns(strength=pl.col("strength").fill_null(0.0))
    if steer.filter(pl.col("kind") == "steer").height:
        long = pl.concat([
            steer.select("model", "ckpt", "ckpt_order", "spec", "strength", value=pl.col(c),
                         measure=pl.lit(label))
            for c, label in (("accuracy", "accuracy"), ("mean_tokens", "completion tokens"),
                             ("entropy_mean", "entropy (nats)"), ("first_token_kl", "first-token KL"))
        ])  # fmt: skip
        blocks.append(charts.curve_chart(long, "strength", "value", sel,
                                         title="Steering: effect by strength (0 = the baseline)",
                                         x_title="strength", y_title="", facet="measure", columns=2,
                                         tooltip=("spec",)))  # fmt: skip
    cols = ["model", "ckpt", "spec", "setting", "status", "n", "accuracy", "ci_low", "ci_high",
            "mean_tokens", "share_length", "entropy_mean", "first_token_kl"]  # fmt: skip
    blocks += [Html("<h3>Every setting</h3>"),
               charts.table(st.sort("model", "ckpt_order", "spec", "order").select(
                   [c for c in cols if c in st.columns]), sel)]  # fmt: skip
    return blocks
