"""Interventions (seed 001's causal methodology): steering sweeps, ablations, direction transfer
and activation patching per checkpoint, and their report section.

`aggregate_interventions` gathers every `intervene` and `transfer` job's per-setting summary
(`int_settings`), a few steered completions per job beside the baseline's (`int_examples`), and
every `patch` job's effect per site × position group (`int_patching`) and per site × token for its
first pair (`int_patch_tokens`). `section` draws the effect of each steering strength (accuracy,
completion length, entropy, first-token KL, marker log-odds) per checkpoint, the ablation table,
the patching heatmaps, the transfer matrix, the steered traces and the table of every setting.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

from reasonlab.report import charts
from reasonlab.report.html import Html
from reasonlab.report.tables import out_paths

KEY = "interventions"
TITLE = "Interventions: steering, ablation, transfer and patching"
TABLES: tuple[str, ...] = ("int_settings", "int_examples", "int_patching", "int_patch_tokens")
EXAMPLES_PER_JOB = 3  # prompts whose completions under every setting the report shows
GROUP_ORDER = ["changed", "prompt", "trace changed", "trace", "last"]


def _prefix(path, suffix: str) -> str:
    p = str(path)
    if not p.endswith(suffix):
        raise ValueError(f"{p}: expected a path ending in {suffix}")
    return p[: -len(suffix)]


def aggregate_interventions(words: list[str], paths: list[str | Path],
                            out: Mapping[str, str | Path], patch_words: list[str] = (),
                            patch_paths: list[str | Path] = ()) -> None:  # fmt: skip
    """`words`: one `model/ckpt/order/spec/source-model/source-ckpt` per intervene or transfer job
    (the source is the checkpoint whose direction steers: the job's own, or another's in a
    transfer), `paths`: its settings table (its graded generations beside it, `.table.parquet`);
    `patch_words`: `model/ckpt/order/dataset` per patch job, `patch_paths`: its groups table (its
    pairs and tokens tables beside it)."""
    import polars as pl

    from reasonlab.patching import summarize

    dest = out_paths(out, TABLES, "aggregate_interventions")
    settings, examples = [], []
    for word, path in zip(words, paths, strict=True):
        model, ckpt, order, spec, smodel, sckpt = word.split("/")
        tags = {"model": pl.lit(model), "ckpt": pl.lit(ckpt), "ckpt_order": pl.lit(int(order)),
                "spec": pl.lit(spec), "source_model": pl.lit(smodel), "source_ckpt": pl.lit(sckpt),
                "transfer": pl.lit((smodel, sckpt) != (model, ckpt))}  # fmt: skip
        df = pl.read_parquet(path)
        settings.append(df.drop("spec", "source", strict=False).with_columns(**tags))
        if (smodel, sckpt) != (model, ckpt):
            continue
        graded = pl.read_parquet(_prefix(path, ".settings.parquet") + ".table.parquet")
        if graded.height:
            first = graded["id"].unique(maintain_order=True).head(EXAMPLES_PER_JOB)
            order_of = dict(zip(df["setting"], df["order"], strict=True))
            ex = graded.filter(pl.col("id").is_in(first.implode()) & (pl.col("sample") == 0))
            examples.append(
                ex.select("id", "setting", "prompt", "completion", "answer", "reference", "correct",
                          "n_completion_tokens")
                .with_columns(order=pl.col("setting").replace_strict(order_of, default=None),
                              **{k: v for k, v in tags.items() if k in ("model", "ckpt", "ckpt_order", "spec")})
            )  # fmt: skip
    patching, tokens = [], []
    for word, path in zip(patch_words, patch_paths, strict=True):
        model, ckpt, order, dataset = word.split("/")
        prefix = _prefix(path, ".groups.parquet")
        pairs, groups = pl.read_parquet(prefix + ".pairs.parquet"), pl.read_parquet(path)
        tags = {"model": pl.lit(model), "ckpt": pl.lit(ckpt), "ckpt_order": pl.lit(int(order)),
                "dataset": pl.lit(dataset)}  # fmt: skip
        summary = pl.DataFrame(summarize(pairs, groups), infer_schema_length=None)
        skipped = pairs.filter(pl.col("status") != "ok").height
        patching.append(summary.with_columns(**tags, n_skipped=pl.lit(skipped)))
        tok = pl.read_parquet(prefix + ".tokens.parquet")
        if tok.height:
            first = tok["pair"][0]
            tokens.append(tok.filter(pl.col("pair") == first).with_columns(**tags))
    for name, frames in (("int_settings", settings), ("int_examples", examples),
                         ("int_patching", patching), ("int_patch_tokens", tokens)):  # fmt: skip
        table = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
        table.write_parquet(dest[name])


def _esc(v) -> str:
    return "" if v is None else html.escape(str(v))


def _examples(ex, sel) -> Html:
    """Per job and prompt: the baseline's completion and each setting's, one after another."""
    ex = charts.usable(ex, "model", "ckpt", "id")
    items = []
    for (model, ckpt, spec, pid), g in ex.sort("model", "ckpt_order", "spec", "id", "order").group_by(
        "model", "ckpt", "spec", "id", maintain_order=True
    ):  # fmt: skip
        rows = []
        for r in g.iter_rows(named=True):
            mark = "" if r["correct"] is None else (
                '<span class="ok">correct</span>' if r["correct"] else '<span class="warn">wrong</span>')  # fmt: skip
            rows.append(f"<p><b>{_esc(r['setting'])}</b> · answer <code>{_esc(r['answer'])}</code> "
                        f"{mark} · {r['n_completion_tokens']} tokens</p><pre>{_esc(r['completion'])}</pre>")  # fmt: skip
        first = g.row(0, named=True)
        items.append(
            f"<details{charts.row_tags(sel, {**first, 'spec': spec})}><summary>{_esc(model)}/"
            f"{_esc(ckpt)} · {_esc(spec)} · {_esc(pid)} (reference <code>"
            f"{_esc(first['reference'])}</code>)</summary><pre>{_esc(first['prompt'])}</pre>"
            + "".join(rows)
            + "</details>"
        )
    return Html("".join(items)) if items else charts.nothing("no steered traces")


def _deltas(st):
    """Each ok setting's accuracy and marker log-odds change from the baseline of its own job."""
    import polars as pl

    job = ["model", "ckpt", "spec", "source_model", "source_ckpt"]
    base = st.filter(pl.col("kind") == "baseline").select(
        *job, base_accuracy="accuracy", base_logodds="marker_logodds", base_tokens="mean_tokens"
    )
    return (
        st.filter((pl.col("kind") != "baseline") & (pl.col("status") == "ok"))
        .join(base, on=job, how="left")
        .with_columns(
            d_accuracy=pl.col("accuracy") - pl.col("base_accuracy"),
            d_logodds=pl.col("marker_logodds") - pl.col("base_logodds"),
            d_tokens=pl.col("mean_tokens") - pl.col("base_tokens"),
        )
    )


def _transfer(st, context: dict) -> list:
    import polars as pl

    d = _deltas(st.filter(pl.col("kind").is_in(["steer", "baseline"])))
    moved = d.filter(pl.col("transfer"))
    if not moved.height:
        return []
    # the diagonal: each checkpoint steered by its own direction (the spec's own job)
    specs = moved["spec"].unique().to_list()
    d = d.filter(
        pl.col("spec").is_in(specs) & pl.col("strength").is_in(moved["strength"].unique().implode())
    )
    strengths = sorted(set(d["strength"]))
    d = d.with_columns(
        steered=pl.col("model") + "/" + pl.col("ckpt"),
        direction_from=pl.col("source_model") + "/" + pl.col("source_ckpt"),
        strength=pl.col("strength").map_elements(lambda v: f"strength {v:+g}", return_dtype=pl.String),
    )  # fmt: skip
    facets = [f"strength {v:+g}" for v in strengths]
    order = [f"{m}/{c}" for m, c in d.sort("model", "ckpt_order").select("model", "ckpt").unique(maintain_order=True).iter_rows()]  # fmt: skip
    order += [o for o in d["direction_from"].unique().sort().to_list() if o not in order]
    blocks = [Html(
        "<h3>Direction transfer</h3><p>Each checkpoint (columns) steered with the direction "
        "chosen at another checkpoint (rows: its layer, the same relative strength); the "
        "diagonal is the checkpoint's own direction. A direction that training keeps moves a "
        "later checkpoint as it moves its own (the column looks like the diagonal); a rotated "
        "or rebuilt one does not. Change from the steered checkpoint's baseline, on the same "
        "prompts.</p>")]  # fmt: skip
    for col, label in (("d_accuracy", "accuracy change"), ("d_logodds", "marker log-odds change")):
        m = float(d[col].abs().max() or 0) or 1.0  # a symmetric scale: white = no change
        blocks.append(charts.heatmap(
            d, "steered", "direction_from", col, None, title=f"Transfer: {label}", facet="strength",
            tooltip=("accuracy", "base_accuracy", "marker_logodds", "base_logodds"),
            x_sort=order, y_sort=order, facet_sort=facets, scheme="redblue", columns=4,
            domain=(-m, m)))  # fmt: skip
    return blocks


def _patching(tables: dict, context: dict) -> list:
    import polars as pl

    pt = charts.usable(tables.get("int_patching", pl.DataFrame()), "model", "ckpt", "effect")
    if not pt.height:
        return []
    pt = pt.with_columns(checkpoint=pl.col("model") + "/" + pl.col("ckpt"), layer=pl.col("site"))
    order = [g for g in GROUP_ORDER if g in set(pt["group"])]
    ckpts = [f"{m}/{c}" for m, c in pt.sort("model", "ckpt_order").select("model", "ckpt").unique(maintain_order=True).iter_rows()]  # fmt: skip
    n = (
        pt.group_by("checkpoint")
        .agg(pl.col("n_pairs").max(), pl.col("n_skipped").max())
        .sort("checkpoint")
    )
    counts = ", ".join(f"{r['checkpoint']}: {r['n_pairs']} pairs ({r['n_skipped']} skipped)"
                       for r in n.iter_rows(named=True))  # fmt: skip
    sel = charts.selectors(
        f"{KEY}-patching", pt, palette=context.get("models"), few=context.get("checkpoints_shown")
    )
    blocks = [
        Html("<h3>Activation patching</h3><p>The corrupted prompt (one number changed) run with "
             "the clean run's residual stream written in at one site (0 = layer 0's input … L = "
             "the last layer's output) and one group of positions. Metric: log p(clean answer) − "
             "log p(corrupted answer), each answer's tokens teacher-forced after the prompt and "
             "the trace up to the answer; effect = (patched − corrupted) / (clean − corrupted) "
             f"over the pairs: 0 = the corrupted run, 1 = the clean run. {html.escape(counts)}. "
             "Groups: <i>changed</i> the prompt's differing tokens, <i>prompt</i> its other tokens, "
             "<i>trace changed</i> / <i>trace</i> the solution's differing / other tokens, "
             "<i>last</i> the token that predicts the answer.</p>"),
        charts.selector_bar(sel),
        charts.heatmap(pt, "group", "layer", "effect", sel, title="Patching effect by site and position group",
                       facet="checkpoint", x_sort=order, facet_sort=ckpts, domain=(-0.2, 1.0),
                       tooltip=("n_pairs", "n_positions"),
                       columns=3),
    ]  # fmt: skip
    tok = charts.usable(
        tables.get("int_patch_tokens", pl.DataFrame()), "model", "ckpt", "normalised"
    )
    if tok.height:
        tok = tok.with_columns(
            checkpoint=pl.col("model") + "/" + pl.col("ckpt"), layer=pl.col("site"),
            token=pl.format("{} {}", pl.col("position"), pl.col("token")),
        )  # fmt: skip
        blocks.append(charts.heatmap(
            tok, "position", "layer", "normalised", sel, facet="checkpoint", columns=1,
            title=f"One pair ({tok['pair'][0]}) token by token: the effect of patching each "
                  "position (tooltip: the corrupted token and the clean one)",
            tooltip=("token", "clean_token", "group"), domain=(-0.2, 1.0), width=720, height=120,
            facet_sort=ckpts))  # fmt: skip
    return blocks


def section(tables: dict, context: dict) -> list:
    import polars as pl

    st = charts.usable(tables["int_settings"], "model", "ckpt", "setting")
    if not st.height and not tables.get("int_patching", pl.DataFrame()).height:
        return [charts.nothing("no intervention was run")]
    blocks: list = []
    if st.height:
        if "transfer" not in st.columns:
            st = st.with_columns(transfer=pl.lit(False), source_model=pl.col("model"),
                                 source_ckpt=pl.col("ckpt"))  # fmt: skip
        own = st.filter(~pl.col("transfer"))
        steer_specs = sorted(set(own.filter(pl.col("kind") == "steer")["spec"]))
        sel = charts.selectors(KEY, own, set_field="spec", set_label="intervention",
                               dataset=(steer_specs or [None])[0], palette=context.get("models"), few=context.get("checkpoints_shown"))  # fmt: skip
        blocks += [
            Html("<p>Each checkpoint generates on the evaluation prompts under every setting of a "
                 "spec, the baseline (no intervention) in the same job. Steering adds strength × "
                 "the checkpoint's chosen reasoning direction at its layer, in the prompt and at "
                 "every generated token; a relative strength (the default) is a multiple of the "
                 "mean residual norm at that layer on the same prompts, so sweeps compare across "
                 "layers and checkpoints. Directional ablation projects the direction out "
                 "everywhere; layer ablation removes a layer's contribution (zero) or replaces it "
                 "by its mean. Entropy: of the generated tokens under the distribution that "
                 "produced them; KL: of the first generated token's distribution, to the "
                 "baseline's; marker log-odds: that the first generated token is a reasoning "
                 "marker (directions.markers).</p>"),
            charts.selector_bar(sel),
        ]  # fmt: skip
        steer = own.filter(pl.col("kind").is_in(["steer", "baseline"]) & (pl.col("status") == "ok"))
        steer = steer.with_columns(strength=pl.col("strength").fill_null(0.0))
        steer = steer.filter(pl.col("spec").is_in(steer_specs))
        if steer.height:
            long = pl.concat([
                steer.select("model", "ckpt", "ckpt_order", "spec", "strength", value=pl.col(c),
                             measure=pl.lit(label))
                for c, label in (("accuracy", "accuracy"), ("mean_tokens", "completion tokens"),
                                 ("entropy_mean", "entropy (nats)"), ("first_token_kl", "first-token KL"),
                                 ("marker_logodds", "marker log-odds"))
                if c in steer.columns
            ])  # fmt: skip
            blocks.append(charts.curve_chart(long, "strength", "value", sel,
                                             title="Steering: effect by strength (0 = the baseline)",
                                             x_title="strength", y_title="", facet="measure", columns=3,
                                             tooltip=("spec",), independent_y=True))  # fmt: skip
        abl = _deltas(
            own.filter(pl.col("kind").is_in(["ablate_direction", "ablate_layer", "baseline"]))
        )
        if abl.height:
            cols = ["model", "ckpt", "spec", "setting", "layers", "method", "accuracy", "ci_low",
                    "ci_high", "d_accuracy", "mean_tokens", "d_tokens", "marker_logodds", "d_logodds",
                    "first_token_kl"]  # fmt: skip
            blocks += [Html("<h3>Ablations</h3><p>Each ablation beside its baseline: the change "
                            "in accuracy, completion length and marker log-odds.</p>"),
                       charts.table(abl.sort("model", "ckpt_order", "spec", "order").select(
                           [c for c in cols if c in abl.columns]))]  # fmt: skip
        ex = tables.get("int_examples", pl.DataFrame())
        if ex.height:
            blocks += [Html("<h3>Steered traces beside the baseline</h3>"), _examples(ex, sel)]
        blocks += _transfer(st, context)
    blocks += _patching(tables, context)
    if st.height:
        cols = ["model", "ckpt", "spec", "source_model", "source_ckpt", "setting", "status", "n",
                "accuracy", "ci_low", "ci_high", "mean_tokens", "tokens_ci_low", "tokens_ci_high",
                "share_length", "entropy_mean", "first_token_kl", "marker_logodds",
                "logodds_ci_low", "logodds_ci_high", "norm"]  # fmt: skip
        blocks += [Html("<h3>Every setting</h3>"),
                   charts.table(st.sort("model", "ckpt_order", "spec", "source_ckpt", "order").select(
                       [c for c in cols if c in st.columns]))]  # fmt: skip
    return blocks
