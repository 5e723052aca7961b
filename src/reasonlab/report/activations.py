"""Activations, reasoning directions, probes, logit lens and CKA across checkpoints (seed 001), and
their report section.

`aggregate_activations` gathers every probe, direction, lens and CKA job's output into small
tables; the direction cosines across checkpoints are computed here (a pair of any two analysed
checkpoints of one width: adding a checkpoint re-runs only this aggregation). `section` draws
probe accuracy by layer beside its shuffled control, the chosen direction's candidate grid, the
lens's answer rank by layer, CKA between consecutive checkpoints and the direction-cosine matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reasonlab.report import charts
from reasonlab.report.html import Html
from reasonlab.report.tables import out_paths

KEY = "activations"
TITLE = "Activations: directions, probes, logit lens, CKA"
TABLES: tuple[str, ...] = (
    "act_probes",
    "act_candidates",
    "act_chosen",
    "act_lens",
    "act_cka",
    "act_cosines",
)


@dataclass(frozen=True)
class Job:
    """One analysis job's output and what it belongs to (`item`: the probe file, the contrast, the
    lens dataset, or for CKA the second checkpoint)."""

    kind: str  # probes, directions, lens or cka
    model: str
    ckpt: str
    ckpt_order: int
    item: str
    path: str | Path


def _concat(frames, schema_hint=None):
    import polars as pl

    frames = [f for f in frames if f.height]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame(schema_hint or {})


def aggregate_activations(jobs: list[Job], out: Mapping[str, str | Path]) -> None:
    """Write the section's tables from every job's output (see TABLES)."""
    import json

    import polars as pl
    import torch

    from reasonlab.cka import direction_cosines

    paths = out_paths(out, TABLES, "aggregate_activations")
    by = {k: [j for j in jobs if j.kind == k] for k in ("probes", "directions", "lens", "cka")}

    def tag(j, df):
        return df.with_columns(
            model=pl.lit(j.model), ckpt=pl.lit(j.ckpt), ckpt_order=pl.lit(j.ckpt_order)
        )

    _concat([tag(j, pl.read_parquet(j.path)) for j in by["probes"]]).write_parquet(
        paths["act_probes"]
    )
    cands, chosen, dirs = [], [], {}
    for j in by["directions"]:
        d = Path(j.path)
        cands.append(
            tag(j, pl.read_parquet(d / "candidates.parquet")).with_columns(contrast=pl.lit(j.item))
        )
        info = json.loads((d / "chosen.json").read_text())
        c = info.get("chosen") or {}
        chosen.append({"model": j.model, "ckpt": j.ckpt, "ckpt_order": j.ckpt_order, "contrast": j.item,
                       "position": c.get("position"), "layer": c.get("layer"), "site": c.get("site"),
                       "induce": c.get("induce"), "bypass": c.get("bypass"), "kl": c.get("kl"),
                       "induce_low": (c.get("induce_ci") or [None, None])[0], "induce_high": (c.get("induce_ci") or [None, None])[1],
                       "bypass_low": (c.get("bypass_ci") or [None, None])[0], "bypass_high": (c.get("bypass_ci") or [None, None])[1],
                       "n_layers": info["n_layers"], "note": info.get("note")})  # fmt: skip
        dirs[(j.item, j.model, j.ckpt, j.ckpt_order)] = torch.load(
            d / "reasoning_directions.pt", weights_only=True
        )
    _concat(cands).write_parquet(paths["act_candidates"])
    schema = {"model": pl.String, "ckpt": pl.String, "ckpt_order": pl.Int64, "contrast": pl.String,
              "position": pl.String, "layer": pl.Int64, "site": pl.String, "induce": pl.Float64,
              "bypass": pl.Float64, "kl": pl.Float64, "induce_low": pl.Float64, "induce_high": pl.Float64,
              "bypass_low": pl.Float64, "bypass_high": pl.Float64, "n_layers": pl.Int64, "note": pl.String}  # fmt: skip
    pl.DataFrame(chosen, schema=schema).write_parquet(paths["act_chosen"])
    # cosines: per contrast, every checkpoint's direction at one reference site (the chosen one of
    # the last checkpoint in config order that has one), between all checkpoints of one width
    rows = []
    for contrast in sorted({k[0] for k in dirs}):
        entries = sorted((k for k in dirs if k[0] == contrast), key=lambda k: (k[1], k[3]))
        ref = next((dirs[k]["chosen"] for k in reversed(entries) if dirs[k]["chosen"]), None)
        if ref is None:
            continue
        vecs = {}
        for k in entries:
            d = dirs[k]
            at = [i for i, (p, ly) in enumerate(zip(d["positions"], d["layers"], strict=True))
                  if p == ref["position"] and ly == ref["layer"]]  # fmt: skip
            if at:
                vecs.setdefault(d["raw"].shape[-1], {})[f"{k[1]}/{k[2]}"] = d["raw"][at[0]].numpy()
        for width, group in vecs.items():
            names, m = direction_cosines(group, key=f"directions.contrasts.{contrast}")
            for i, a in enumerate(names):
                for jx, b in enumerate(names):
                    rows.append({"contrast": contrast, "site": f"{ref['position']} @ layer {ref['layer']}",
                                 "a": a, "b": b, "order_a": i, "order_b": jx, "cosine": float(m[i, jx]),
                                 "width": int(width)})  # fmt: skip
    cschema = {"contrast": pl.String, "site": pl.String, "a": pl.String, "b": pl.String,
               "order_a": pl.Int64, "order_b": pl.Int64, "cosine": pl.Float64, "width": pl.Int64}  # fmt: skip
    pl.DataFrame(rows, schema=cschema).write_parquet(paths["act_cosines"])
    lens = _concat(
        [pl.read_parquet(j.path).with_columns(ckpt_order=pl.lit(j.ckpt_order)) for j in by["lens"]]
    )
    if lens.height:
        lens = (
            lens.group_by("model", "ckpt", "ckpt_order", "dataset", "layer", "site")
            .agg(
                median_rank=pl.col("rank").median(),
                mean_log_rank=pl.col("rank").log(10).mean(),
                mean_prob=pl.col("prob").mean(),
                top1=(pl.col("rank") == 1).mean(),
                n_texts=pl.len(),
                n_skipped=pl.col("n_skipped").first(),
            )  # fmt: skip
            .sort("model", "ckpt_order", "dataset", "layer")
        )
    lens.write_parquet(paths["act_lens"])
    _concat(
        [
            tag(j, pl.read_parquet(j.path)).with_columns(
                ckpt_b=pl.lit(
                    j.item.split(":")[1]
                    if j.item.split(":")[0] == j.model
                    else j.item.replace(":", "/")
                )
            )
            for j in by["cka"]
        ]
    ).write_parquet(paths["act_cka"])


def _summary(probes, chosen, lens, cka):
    """Seed 001's summary, one row per checkpoint: each contrast's chosen site and bypass score,
    each probe's best layer (accuracy, and its shuffled control there), the first layer where the
    lens's median rank of the answer is 1, and the mean same-layer CKA with the next checkpoint."""
    import polars as pl

    rows: dict = {}

    def row(r):
        return rows.setdefault(
            (r["model"], r["ckpt_order"], r["ckpt"]), {"model": r["model"], "ckpt": r["ckpt"]}
        )

    for r in chosen.iter_rows(named=True):
        row(r)[f"{r['contrast']}: chosen site"] = (
            f"{r['site']} ({r['position']}), bypass {r['bypass']:.2f}"
            if r["site"]
            else "none passed"
        )
    if probes.height:
        best = (
            probes.sort("accuracy", descending=True)
            .group_by("model", "ckpt", "ckpt_order", "probe")
            .first()
        )
        for r in best.iter_rows(named=True):
            row(r)[f"probe {r['probe']}: best layer"] = (
                f"{r['site']}: {r['accuracy']:.2f} (control {r['shuffled_accuracy']:.2f}, chance {r['chance']:.2f})"
            )
    if lens.height:
        for r in (
            lens.filter(pl.col("median_rank") <= 1)
            .group_by("model", "ckpt", "ckpt_order", "dataset")
            .agg(pl.col("site").sort_by("layer").first())
            .iter_rows(named=True)
        ):
            row(r)[f"lens {r['dataset']}: answer first at"] = r["site"]
    if cka.height:
        same = (
            cka.filter(pl.col("layer_a") == pl.col("layer_b"))
            .group_by("model", "ckpt", "ckpt_order", "ckpt_b")
            .agg(pl.col("cka").fill_nan(None).mean())  # a layer without CKA is skipped
        )
        for r in same.iter_rows(named=True):
            row(r)["CKA with next (mean over layers)"] = f"{r['cka']:.3f} ({r['ckpt_b']})"
    if not rows:
        return None
    return pl.DataFrame([rows[k] for k in sorted(rows)], infer_schema_length=None)


def section(tables: dict, context: dict) -> list:
    """Probe accuracy by layer (with the shuffled control), the candidate grids and the chosen
    direction, the logit lens's answer rank by layer, CKA between consecutive checkpoints and the
    direction-cosine matrix; one selector bar per part."""
    import polars as pl

    raw_probes = tables["act_probes"]
    unprobed = (
        raw_probes.filter(pl.col("note").is_not_null()).select("model", "ckpt", "probe", "note")
        if "note" in raw_probes.columns
        else None
    )
    probes = charts.usable(raw_probes, "model", "ckpt", "layer")
    cands = charts.usable(tables["act_candidates"], "model", "ckpt", "layer")
    chosen = charts.usable(tables["act_chosen"], "model", "ckpt")
    lens = charts.usable(tables["act_lens"], "model", "ckpt", "layer")
    cka = charts.usable(tables["act_cka"], "model", "ckpt", "layer_a")
    cos = charts.usable(tables["act_cosines"], "a", "b")
    if not (probes.height or cands.height or lens.height or cka.height):
        return [charts.nothing("no activation analysis was run")]
    palette = context.get("models")
    few = context.get("checkpoints_shown")
    blocks: list = [
        Html(
            "<p>The residual stream of each analysed checkpoint, captured with hooks on the "
            "unmodified model (layer l = the input of decoder layer l; the last layer index = the "
            "last layer's output before the final norm). Each part has its own selectors.</p>"
        )
    ]
    summary = _summary(probes, chosen, lens, cka)
    if summary is not None and summary.height:
        blocks += [Html("<h3>Summary per checkpoint</h3>"), charts.table(summary)]
    blocks.append(Html("<h3>Linear probes by layer</h3>"))
    if probes.height:
        long = pl.concat([
            probes.with_columns(measure=pl.lit("probe")),
            probes.with_columns(accuracy=pl.col("shuffled_accuracy"), measure=pl.lit("shuffled-label control")),
        ], how="diagonal_relaxed")  # fmt: skip
        sel = charts.selectors(
            f"{KEY}-probes", long, set_field="probe", set_label="probe", palette=palette, few=few
        )
        blocks += [
            Html("<p>Held-out accuracy of a logistic-regression probe per layer (left) and of the "
                 "same probe trained on shuffled labels (right: it must sit at chance; the table "
                 "gives the shuffles' 95 % range and the probe's permutation p-value). A probe above "
                 "its control reads the label off that layer.</p>"),
            charts.selector_bar(sel),
            charts.curve_chart(long, "layer", "accuracy", sel, title="Probe accuracy by layer",
                               x_title="layer", y_title="held-out accuracy", facet="measure",
                               columns=2, tooltip=("chance", "n_examples", "ci_low", "ci_high")),
            charts.table(probes.select("model", "ckpt", "probe", "layer", "site", "accuracy", "ci_low",
                                       "ci_high", "shuffled_accuracy", "shuffled_ci_low", "shuffled_ci_high",
                                       *(["p_value"] if "p_value" in probes.columns else []), "chance",
                                       "n_examples", "smallest_class").sort("model", "ckpt", "probe", "layer"), sel),
        ]  # fmt: skip
    else:
        blocks.append(charts.nothing("no probe could be trained"))
    if unprobed is not None and unprobed.height:
        blocks += [Html("<p>Probes not trained (the checkpoint's labels do not allow it):</p>"),
                   charts.table(unprobed)]  # fmt: skip
    blocks.append(Html("<h3>Reasoning directions: candidates and the chosen one</h3>"))
    if cands.height:
        sel = charts.selectors(
            f"{KEY}-dirs",
            cands,
            chosen,
            set_field="contrast",
            set_label="contrast",
            palette=palette,
            few=few,
        )
        blocks += [
            Html("<p>Every (position, layer) candidate: <i>bypass</i> = change of the marker "
                 "log-odds on held-out reasoning prompts when the direction is ablated (lower is "
                 "better), <i>induce</i> = its rise on held-out control prompts when the direction "
                 "is added, <i>KL</i> = how much ablation moves the control prompts' next-token "
                 "distribution. The chosen candidate passes KL, depth and induce filters and has "
                 "the lowest bypass score (refusal_direction's rule).</p>"),
            charts.selector_bar(sel),
            charts.heatmap(cands, "position", "layer", "bypass", sel, title="Bypass score by candidate",
                           facet="ckpt", tooltip=("induce", "kl", "filtered_by")),
            charts.checkpoint_chart(chosen, "bypass", sel, title="Chosen direction's bypass score",
                                    interval=("bypass_low", "bypass_high"), tooltip=("site", "induce", "kl"))
            if chosen["bypass"].drop_nulls().len() else charts.nothing("no candidate passed the filters"),
            charts.table(chosen.drop("ckpt_order"), sel),
        ]  # fmt: skip
    else:
        blocks.append(charts.nothing("no contrast was configured"))
    blocks.append(Html("<h3>Logit lens: the reference answer's rank by layer</h3>"))
    if lens.height:
        sel = charts.selectors(f"{KEY}-lens", lens, set_field="dataset", palette=palette, few=few)
        blocks += [
            charts.selector_bar(sel),
            charts.curve_chart(lens, "layer", "median_rank", sel, log_y=True, x_title="layer",
                               title="Median rank of the answer's first token (1 = the lens's top token)",
                               y_title="median rank", tooltip=("mean_prob", "top1", "n_texts", "n_skipped")),
        ]  # fmt: skip
    else:
        blocks.append(charts.nothing("no logit lens was configured"))
    blocks.append(Html("<h3>CKA between consecutive checkpoints</h3>"))
    if cka.height:
        pairs = cka.with_columns(pair=pl.col("ckpt") + " → " + pl.col("ckpt_b"))
        sel = charts.selectors(
            f"{KEY}-cka",
            pairs,
            set_field="position",
            set_label="position",
            palette=palette,
            few=few,
        )
        blocks += [
            charts.selector_bar(sel),
            charts.heatmap(pairs, "layer_a", "layer_b", "cka", sel, facet="pair", domain=(0, 1),
                           title="Linear CKA of every layer pair", tooltip=("cka_debiased", "n_texts")),
        ]  # fmt: skip
    else:
        blocks.append(charts.nothing("no CKA pair was configured"))
    blocks.append(Html("<h3>How the reasoning direction drifts: cosines across checkpoints</h3>"))
    if cos.height:
        blocks.append(charts.heatmap(cos, "a", "b", "cosine", None, facet="contrast", domain=(-1, 1),
                                     title="Cosine of the directions at one site", tooltip=("site",)))  # fmt: skip
    else:
        blocks.append(charts.nothing("no chosen direction to compare"))
    return blocks
