"""The trace explorer (seed 000's analysis, across models and checkpoints): its aggregation and
report section.

`aggregate_traces` gathers every `trace_steps` job's steps (per step index, correctness and
cluster; the correlation with per-step ratings where a dataset has them) and every `trace_map`
job's map, phrases, cluster composition, examples and lengths. `section` draws the 2-D map (colour
by cluster, checkpoint or correctness: a selector; tooltips with the trace's start and answer), an
interactive 3-D view (plotly, its JavaScript inlined once per report), cluster composition by
checkpoint, the phrase table, length distributions by checkpoint and correctness, and step-level
uncertainty: by step index per checkpoint and correctness, by cluster, and against ratings.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path

from reasonlab.report import charts
from reasonlab.report.html import Html, VegaLite
from reasonlab.report.tables import out_paths

KEY = "traces"
TITLE = "Trace explorer: maps, clusters, phrases, lengths and step uncertainty"
TABLES: tuple[str, ...] = ("tr_points", "tr_phrases", "tr_clusters", "tr_examples", "tr_maps",
                           "tr_steps", "tr_step_clusters", "tr_ratings")  # fmt: skip
MAX_STEP_INDEX = 12  # steps after this index are pooled into it in the by-index chart


def _tags(model, ckpt, order, **more):
    import polars as pl

    return {"model": pl.lit(model), "ckpt": pl.lit(ckpt), "ckpt_order": pl.lit(int(order)),
            **{k: pl.lit(v) for k, v in more.items()}}  # fmt: skip


def aggregate_traces(
    words: list[str], paths: list[str | Path], out: Mapping[str, str | Path]
) -> None:
    """`words`: `steps/model/ckpt/order/textset` per steps job (`paths`: its steps table, its JSON
    beside it) and `map/group/-/0/dataset` per map (`paths`: its points table; phrases, clusters
    and JSON beside it)."""
    import polars as pl

    dest = out_paths(out, TABLES, "aggregate_traces")
    got: dict[str, list] = {t: [] for t in TABLES}
    steps_all = []
    for word, path in zip(words, paths, strict=True):
        kind, a, b, order, name = word.split("/")
        path = str(path)
        if kind == "steps":
            st = pl.read_parquet(path).with_columns(**_tags(a, b, order, textset=name))
            steps_all.append(st)
            info = json.loads(Path(path[: -len(".parquet")] + ".json").read_text())
            if info.get("ratings"):
                r = info["ratings"]
                got["tr_ratings"].append(pl.DataFrame([{
                    "model": a, "ckpt": b, "ckpt_order": int(order), "textset": name,
                    "n_steps": r["n_steps"], **{f"{c}_spearman": r[c]["spearman"] for c in
                                                 ("entropy_mean", "entropy_max", "forking_share")},
                    **{f"{c}_p": r[c]["p_value"] for c in ("entropy_mean", "entropy_max", "forking_share")},
                }]))  # fmt: skip
            continue
        prefix = path[: -len(".points.parquet")]
        tags = {"group": pl.lit(a), "dataset": pl.lit(name)}
        points = pl.read_parquet(path)
        got["tr_points"].append(points.with_columns(dataset=pl.lit(name)))
        got["tr_phrases"].append(pl.read_parquet(prefix + ".phrases.parquet").with_columns(**tags))
        clusters = pl.read_parquet(prefix + ".clusters.parquet").with_columns(**tags)
        got["tr_clusters"].append(clusters.drop("examples"))
        ex = (
            clusters.select("group", "dataset", "cluster", "examples")
            .explode("examples")
            .drop_nulls("examples")
        )
        if ex.height:
            got["tr_examples"].append(ex.unnest("examples").unique(["cluster", "model", "ckpt", "id", "sample"], maintain_order=True))  # fmt: skip
        info = json.loads(Path(prefix + ".json").read_text())
        got["tr_maps"].append(pl.DataFrame([{"group": a, "dataset": name, "traces": info["traces"],
                                             "k": info["k"], "method": info["method"],
                                             "silhouette": json.dumps(info["silhouette"]),
                                             "notes": "; ".join(info["notes"])}]))  # fmt: skip
    if steps_all:
        steps = pl.concat(steps_all, how="diagonal_relaxed")
        got["tr_steps"].append(
            steps.with_columns(step=pl.col("step").clip(upper_bound=MAX_STEP_INDEX))
            .group_by("model", "ckpt", "ckpt_order", "textset", "step", "correct")
            .agg(n=pl.len(), entropy_mean=pl.col("entropy_mean").mean(),
                 entropy_max=pl.col("entropy_max").mean(), forking_share=pl.col("forking_share").mean(),
                 varentropy_mean=pl.col("varentropy_mean").mean())
            .sort("model", "ckpt_order", "textset", "step", "correct")
        )  # fmt: skip
        if got["tr_points"]:
            pts = pl.concat(got["tr_points"], how="diagonal_relaxed").select(
                "group", "dataset", "model", "ckpt", "id", "sample", "cluster"
            )
            gen = steps.with_columns(dataset=pl.col("textset").str.split("@").list.first())
            joined = gen.join(pts, on=["dataset", "model", "ckpt", "id", "sample"])
            got["tr_step_clusters"].append(
                joined.group_by("group", "dataset", "cluster", "model", "ckpt", "ckpt_order")
                .agg(steps=pl.len(), entropy_mean=pl.col("entropy_mean").mean(),
                     forking_share=pl.col("forking_share").mean(),
                     correct=pl.col("correct").cast(pl.Float64).mean())
                .sort("group", "cluster", "model", "ckpt_order")
            )  # fmt: skip
    for name in TABLES:
        frames = got[name]
        (pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()).write_parquet(
            dest[name]
        )


MAP_POINTS = 2000  # traces drawn per map (a sample spread evenly over its checkpoints)
MAP_SELECT = "sel-traces-map"  # the <select> that picks the map shown


def _map_key(group, dataset):
    """A map's name in the selector: `group · dataset` (strings, or polars expressions)."""
    return group + " · " + dataset


def _sample(points, n: int = MAP_POINTS):
    """At most `n` of a map's traces: every checkpoint's traces in its share, seeded."""
    import polars as pl

    if points.height <= n:
        return points
    by = [c for c in ("model", "ckpt") if c in points.columns]
    return (points.with_columns(_r=pl.int_range(pl.len()).shuffle(seed=0).over(by),
                                _n=pl.len().over(by))
            .filter(pl.col("_r") < (pl.col("_n") * n / points.height).ceil())
            .drop("_r", "_n"))  # fmt: skip


def _map_select(keys: list[str]) -> Html:
    opts = "".join(f'<option value="{html.escape(k)}">{html.escape(k)}</option>' for k in keys)
    return Html(f'<form class="selectors" onsubmit="return false"><label>map<select '
                f'id="{MAP_SELECT}" data-sel="map">{opts}</select></label>'
                f'<span class="note">the maps, the 3-D view, the cluster composition, the lengths '
                f"and the example traces show the chosen map</span></form>")  # fmt: skip


def _map_param(first: str) -> dict:
    return {"name": "sel_map", "value": first, "bind": {"element": "#" + MAP_SELECT}}


def _on_map(spec: dict, first: str) -> VegaLite:
    """A chart whose data has a `map` column, showing the selected map's rows."""
    spec["params"] = [_map_param(first)] + spec.get("params", [])
    spec["transform"] = [{"filter": "datum.map == sel_map"}] + spec.get("transform", [])
    return VegaLite(spec)


def _map_chart(points, first: str):
    """The 2-D map of the chosen group, coloured by a selector (cluster, checkpoint,
    correctness)."""
    import altair as alt
    import polars as pl

    data = points.filter(pl.col("x").is_not_nan()).with_columns(
        checkpoint=pl.col("model") + "/" + pl.col("ckpt"),
        cluster=pl.col("cluster").cast(pl.String),
        correctness=pl.when(pl.col("correct")).then(pl.lit("correct"))
        .when(pl.col("correct").not_()).then(pl.lit("wrong")).otherwise(pl.lit("not graded")),
    ).select("map", "checkpoint", "cluster", "correctness", "x", "y", "id", "start", "answer", "n_tokens")  # fmt: skip
    if not data.height:
        return charts.nothing("no map (see the notes)")
    colour_by = alt.param(name="colour_map", value="cluster",
                          bind=alt.binding_select(options=["cluster", "checkpoint", "correctness"],
                                                  name="colour by "))  # fmt: skip
    chart = (
        alt.Chart(data)
        .add_params(colour_by)
        .transform_calculate(colour=f"datum[{colour_by.name}]")
        .mark_circle(size=36, opacity=0.75)
        .encode(x=alt.X("x:Q", title=None, axis=alt.Axis(labels=False, ticks=False)),
                y=alt.Y("y:Q", title=None, axis=alt.Axis(labels=False, ticks=False)),
                color=alt.Color("colour:N", title=None),
                tooltip=["checkpoint", "cluster", "correctness", "id", "answer", "n_tokens", "start"])
        .properties(width=520, height=420,
                    title=charts._title("Map of the traces (t-SNE of their embeddings): the chosen map"))
    )  # fmt: skip
    return _on_map(charts._spec(chart), first)


def _plotly_3d(points, keys: list[str]) -> Html:
    """One interactive 3-D view (plotly.js, inlined) of the chosen map: each map's figure is stored
    compressed and drawn when chosen (a page holds a few WebGL views at most)."""
    import polars as pl

    from reasonlab.report.html import pack_text

    figures = {}
    for key in keys:
        data = points.filter((pl.col("map") == key) & pl.col("x3").is_not_nan())
        if not data.height:
            continue
        traces = []
        for (ckpt,), g in data.sort("ckpt_order").group_by("ckpt", maintain_order=True):
            text = [f"{r['model']}/{r['ckpt']} · {r['id']} · cluster {r['cluster']} · answer {r['answer']}"
                    f"<br>{html.escape((r['start'] or '')[:80])}" for r in g.iter_rows(named=True)]  # fmt: skip
            traces.append({"type": "scatter3d", "mode": "markers", "name": str(ckpt),
                           "x": g["x3"].round(4).to_list(), "y": g["y3"].round(4).to_list(),
                           "z": g["z3"].round(4).to_list(), "text": text, "hoverinfo": "text",
                           "marker": {"size": 3, "opacity": 0.8}})  # fmt: skip
        layout = {"title": {"text": f"3-D map: {key} (colour: checkpoint; drag to turn)"},
                  "height": 520, "margin": {"l": 0, "r": 0, "t": 40, "b": 0}}  # fmt: skip
        figures[key] = pack_text(json.dumps({"data": traces, "layout": layout}))
    if not figures:
        return Html("")
    from plotly.offline import get_plotlyjs

    script = "<script>" + get_plotlyjs().replace("</script>", "<\\/script>") + "</script>"
    payload = json.dumps(figures).replace("</", "<\\/")
    return Html(
        f'{script}<div id="plot3d" class="plot3d"></div><script>(function(){{var figs={payload};'
        # only the latest choice is drawn (Vega's binding to the same <select> may announce it
        # too), on a purged element (Plotly.react on an emptied one would draw nothing)
        "var shown=null,asked=0;"
        "function draw(){var s=document.getElementById(" + json.dumps(MAP_SELECT) + ");"
        "var key=s.value,z=figs[key],el=document.getElementById('plot3d'),me=++asked;"
        "if(key===shown)return;"
        "if(!z){shown=key;Plotly.purge(el);el.innerHTML='<p class=\"empty\">No 3-D map for this one.</p>';return;}"
        "rlInflate(z).then(function(t){if(me!==asked)return;var f=JSON.parse(t);shown=key;"
        "Plotly.purge(el);el.innerHTML='';Plotly.newPlot(el,f.data,f.layout,{responsive:true});});}"
        "document.addEventListener('DOMContentLoaded',function(){draw();"
        "document.getElementById(" + json.dumps(MAP_SELECT) + ").addEventListener('input',draw);});"
        "})();</script>"
    )


def section(tables: dict, context: dict) -> list:
    import polars as pl

    points, steps = tables["tr_points"], tables["tr_steps"]
    if not points.height and not steps.height:
        return [charts.nothing("no trace was mapped or split into steps")]
    blocks: list = [Html(
        "<p>Each checkpoint's own generations: the reasoning embedded with sentence-transformers "
        "(windows of the model's length mean-pooled), mapped jointly per group (t-SNE; UMAP when "
        "configured) and clustered (K-means; k by silhouette unless set); each trace split into "
        "steps (blank lines, \"Step n\", hesitation words), each step's tokens' entropy from the "
        "scorer (the distribution that produced them).</p>")]  # fmt: skip
    maps = tables["tr_maps"]
    for r in maps.iter_rows(named=True) if maps.height else []:
        if r["notes"]:
            blocks.append(Html(f'<p class="warn">{html.escape(r["group"])} / {html.escape(r["dataset"])}: '
                               f"{html.escape(r['notes'])}</p>"))  # fmt: skip
    if points.height:
        points = points.with_columns(map=_map_key(pl.col("group"), pl.col("dataset")))
        keys = points["map"].unique(maintain_order=True).to_list()
        first = keys[0]
        shown = pl.concat([_sample(g) for _, g in points.group_by("map", maintain_order=True)])
        listing = (points.group_by("map", "group", "dataset", maintain_order=True)
                   .agg(traces=pl.len()).join(shown.group_by("map").agg(drawn=pl.len()), on="map")
                   .join(maps.select("group", "dataset", "k"), on=["group", "dataset"], how="left")
                   .rename({"k": "clusters"}).drop("map"))  # fmt: skip
        blocks.append(Html("<h3>Maps</h3>"))
        blocks.append(_map_select(keys))
        blocks.append(Html(
            f"<p>{len(keys)} map(s); each draws at most {MAP_POINTS} traces, every checkpoint in "
            "its share (all of them: <code>results/traces/&lt;group&gt;/&lt;dataset&gt;"
            ".points.parquet</code>).</p>"))  # fmt: skip
        blocks.append(charts.table(listing))
        blocks.append(_map_chart(shown, first))
        blocks.append(_plotly_3d(shown, keys))
        comp = tables["tr_clusters"]
        if comp.height:
            comp = comp.with_columns(checkpoint=pl.col("model") + "/" + pl.col("ckpt"),
                                     cluster=pl.col("cluster").cast(pl.String),
                                     map=_map_key(pl.col("group"), pl.col("dataset")))  # fmt: skip
            blocks.append(_composition(comp, first))
        ph = tables["tr_phrases"]
        if ph.height:
            blocks += [Html("<h3>Phrases per cluster</h3><p>Top word n-grams (share: of the "
                            "cluster's traces that contain it; lift: over the whole group) and the "
                            "most common step openings.</p>"),
                       charts.table(ph.sort("group", "dataset", "cluster", "kind", "count", descending=[False, False, False, False, True])
                                    .select("group", "dataset", "cluster", "kind", "text", "count", "share", "lift"))]  # fmt: skip
        ex = tables["tr_examples"]
        if ex.height:
            blocks += [Html("<h3>Example traces per cluster</h3>"), _examples(ex)]
        blocks += [_lengths(shown, first)]
    if steps.height:
        blocks += _steps(tables, context)
    return blocks


def _composition(comp, first: str):
    import altair as alt

    chart = (
        alt.Chart(comp)
        .mark_bar()
        .encode(x=alt.X("checkpoint:N", sort=None, title=None), y=alt.Y("n:Q", stack="normalize", title="share of traces"),
                color=alt.Color("cluster:N"),
                tooltip=["group", "dataset", "checkpoint", "cluster", "n", "correct"])
        .properties(width=520, height=200, title=charts._title("Cluster composition by checkpoint (the chosen map)"))
    )  # fmt: skip
    return _on_map(charts._spec(chart), first)


def _examples(ex) -> Html:
    items = []
    for r in ex.sort("group", "dataset", "cluster").iter_rows(named=True):
        mark = "" if r["correct"] is None else ('<span class="ok">correct</span>' if r["correct"]
                                                else '<span class="warn">wrong</span>')  # fmt: skip
        key = html.escape(_map_key(r["group"], r["dataset"]))
        items.append(f'<details class="rl-row" data-sel-map="{key}"><summary>'
                     f"{html.escape(r['group'])} · cluster {r['cluster']} · "
                     f"{html.escape(r['model'])}/{html.escape(r['ckpt'])} · {html.escape(str(r['id']))}: "
                     f"answer <code>{html.escape(str(r['answer']))}</code> {mark}</summary>"
                     f"<pre>{html.escape(r['example'] or '')}</pre></details>")  # fmt: skip
    return Html("".join(items))


def _lengths(points, first: str):
    import altair as alt
    import polars as pl

    data = points.with_columns(
        checkpoint=pl.col("model") + "/" + pl.col("ckpt"),
        correctness=pl.when(pl.col("correct")).then(pl.lit("correct"))
        .when(pl.col("correct").not_()).then(pl.lit("wrong")).otherwise(pl.lit("not graded")),
    ).unique(["map", "model", "ckpt", "id", "sample"]).select("map", "checkpoint", "ckpt_order", "correctness", "n_tokens", "n_words", "n_steps")  # fmt: skip
    long = data.unpivot(index=["map", "checkpoint", "ckpt_order", "correctness"], on=["n_tokens", "n_words", "n_steps"],
                        variable_name="length", value_name="value")  # fmt: skip
    order = data.sort("ckpt_order")["checkpoint"].unique(maintain_order=True).to_list()
    chart = (
        alt.Chart(long)
        .mark_boxplot(extent="min-max", size=14)
        .encode(x=alt.X("checkpoint:N", sort=order, title=None), xOffset="correctness:N",
                y=alt.Y("value:Q", title=None), color=alt.Color("correctness:N"),
                column=alt.Column("length:N", title=None))
        .resolve_scale(y="independent")
        .properties(width=220, height=200, title=charts._title("Lengths (tokens, words, steps) by checkpoint and correctness (the chosen map)"))
    )  # fmt: skip
    return _on_map(charts._spec(chart), first)


def _steps(tables, context: dict) -> list:
    import altair as alt
    import polars as pl

    st = tables["tr_steps"].with_columns(
        dataset=pl.col("textset").str.split("@").list.first(),
        correctness=pl.when(pl.col("correct")).then(pl.lit("correct"))
        .when(pl.col("correct").not_()).then(pl.lit("wrong")).otherwise(pl.lit("not graded")),
    )  # fmt: skip
    sel = charts.selectors(
        f"{KEY}-steps", st, palette=context.get("models"), few=context.get("checkpoints_shown")
    )
    st = charts.run_positions(st, sel.few)
    blocks = [Html("<h3>Step-level uncertainty</h3><p>Mean entropy of a step's tokens by the "
                   f"step's index in its trace (steps after {MAX_STEP_INDEX} pooled), per checkpoint "
                   "(colour: the model, shade: the checkpoint's place in its run, light = early), "
                   "for correct (solid) and wrong (dashed) traces; forking share: the share of a "
                   "step's tokens above the text set's entropy quantile (traces.quantile).</p>"),
              charts.selector_bar(sel)]  # fmt: skip
    for col, label in (("entropy_mean", "mean token entropy of the step (nats)"),
                       ("forking_share", "share of forking tokens")):  # fmt: skip
        chart = (
            alt.Chart(st)
            .mark_line(point=True, strokeWidth=1.5)
            .encode(x=alt.X("step:O", title="step index"), y=alt.Y(f"{col}:Q", title=label),
                    color=alt.Color("model:N", scale=charts._model_scale(sel, st), title="model"),
                    opacity=alt.Opacity(f"{charts.POS}:Q", scale=alt.Scale(domain=[0, 1], range=[0.3, 1]),
                                        title="run position (0 first, 1 last)",
                                        legend=alt.Legend(values=[0, 0.5, 1])),
                    detail="ckpt:N", strokeDash=alt.StrokeDash("correctness:N", title="trace"),
                    tooltip=["model", "ckpt", "textset", "step", "correctness", "n", col])
            .properties(width=320, height=200)
        )  # fmt: skip
        chart = charts._facet(chart, st, sel, None, 3).properties(
            title=charts._title(f"Steps: {label} by step index")
        )
        blocks.append(charts._finish(chart, sel, charts._keys(st, sel, with_ckpt=True)))
    sc = tables["tr_step_clusters"]
    if sc.height:
        blocks += [Html("<p>Step uncertainty by cluster (the trace's cluster on the map):</p>"),
                   charts.table(sc.select("group", "dataset", "cluster", "model", "ckpt", "steps",
                                          "entropy_mean", "forking_share", "correct"))]  # fmt: skip
    rt = tables["tr_ratings"]
    if rt.height:
        blocks += [Html("<p>Step statistics against the dataset's per-step ratings (PRM800K: −1, "
                        "0, 1), Spearman's ρ and its p-value:</p>"), charts.table(rt)]  # fmt: skip
    return blocks
