"""The report's chart shapes, with model, checkpoint and data-set selectors shared by a section.

Most of this project's charts are a measure over the checkpoints of one or more models. A section
builds one `Selectors` from its tables (`selectors(...)`), places `selector_bar(sel)` at its top,
and draws with `checkpoint_chart` (a measure over checkpoints: x is the checkpoint in run order or
the training step, colour the model, bars/bands for intervals) or `curve_chart` (one curve per
model x checkpoint over some quantity: colour the model, shade the checkpoint's position in its
run). `table(df, sel)` is a long table folded, whose rows follow the same selectors.

The selectors are plain `<select>` elements; every chart binds its Vega-Lite parameters
(`sel_model`, `sel_ckpt`, `sel_set`) to them (Vega's binding to an existing element), so one choice
changes all of a section's charts and tables. The default view is a readable slice: one model (the
one with most checkpoints), one data set, and for curves a few checkpoints (first, last and evenly
spaced ones between, at most FEW_CHECKPOINTS); every slice is one choice away ("(all)"). A model
has one colour in every chart of the report (`palette`); a checkpoint's name never picks a colour.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass

from reasonlab.report.html import ALL, FEW, Html, VegaLite, table_html

FEW_CHECKPOINTS = 5
STEP_NAME = re.compile(r"^step-(\d+)$")
POS = "_pos"  # helper column: the checkpoint's place in its model's run, 0 first .. 1 last
FEW_FLAG = "_few"  # helper column: the checkpoint is one of those "(few)" shows
MODEL_SCHEME = "tableau10"


@dataclass(frozen=True)
class Selectors:
    """What a section's selectors offer and show first. `set_field` is the column the data-set
    selector filters (dataset or textset); element ids derive from `section`."""

    section: str
    models: tuple[str, ...] = ()
    ckpts: tuple[str, ...] = ()  # in run order
    sets: tuple[str, ...] = ()
    set_field: str = "dataset"
    set_label: str = "data set"
    model: str = ALL
    ckpt: str = FEW
    set: str = ALL
    palette: tuple[str, ...] = ()  # the colour domain of models: every model of the report
    few: int = FEW_CHECKPOINTS  # how many checkpoints per model "a few" shows

    def element(self, key: str) -> str:
        return f"sel-{self.section}-{key}"

    def field(self, key: str) -> str:
        return {"model": "model", "ckpt": "ckpt", "set": self.set_field}[key]

    def default(self, key: str) -> str:
        return {"model": self.model, "ckpt": self.ckpt, "set": self.set}[key]

    def options(self, key: str) -> list[tuple[str, str]]:
        """(value, label) of a selector's options."""
        if key == "model":
            return [(m, m) for m in self.models] + [(ALL, "all models")]
        if key == "ckpt":
            return [(FEW, "a few (first, last, between)"), (ALL, "all")] + [
                (c, c) for c in self.ckpts
            ]
        return [(s, s) for s in self.sets] + [(ALL, f"all {self.set_label}s")]

    @property
    def keys(self) -> tuple[str, ...]:
        have = {"model": self.models, "ckpt": self.ckpts, "set": self.sets}
        return tuple(k for k in ("model", "ckpt", "set") if have[k])


def _step_of(name: str) -> int | None:
    m = STEP_NAME.match(name or "")
    return int(m.group(1)) if m else None


def checkpoint_order(*frames) -> list[str]:
    """Checkpoint names in run order. Within a model: by the config's checkpoint order
    (`ckpt_order`), then the training step (`step`, or N of a name `step-N`), then name. Across
    models, by each name's earliest relative place in a run (0 first .. 1 last), so that the
    union of several runs' checkpoints still reads from first to `final`."""
    inf = float("inf")
    runs: dict[str | None, dict[str, tuple]] = {}
    for df in frames:
        if "ckpt" not in df.columns:
            continue
        cols = [c for c in ("model", "ckpt", "ckpt_order", "step") if c in df.columns]
        for r in df.select(cols).unique().iter_rows(named=True):
            name = r["ckpt"]
            if name is None:
                continue
            step = r.get("step") if r.get("step") is not None else _step_of(name)
            order = r.get("ckpt_order")
            key = (inf if order is None else order, inf if step is None else step, name)
            run = runs.setdefault(r.get("model"), {})
            run[name] = min(run.get(name, key), key)
    places: dict[str, tuple] = {}
    for run in runs.values():
        names = sorted(run, key=run.__getitem__)
        for i, name in enumerate(names):
            place = (i / (len(names) - 1) if len(names) > 1 else 0.0, run[name][1], name)
            places[name] = min(places.get(name, place), place)
    return sorted(places, key=places.__getitem__)


def _values(frames, field: str) -> list[str]:
    seen = set()
    for df in frames:
        if field in df.columns:
            seen.update(v for v in df[field].cast(str).to_list() if v is not None)
    return sorted(seen)


def selectors(
    section: str,
    *frames,
    set_field: str = "dataset",
    set_label: str = "data set",
    model: str | None = None,
    dataset: str | None = None,
    palette: list[str] | tuple[str, ...] | None = None,
    few: int | None = None,
) -> Selectors:
    """The selectors of a section whose charts draw `frames` (polars DataFrames with model, ckpt
    and `set_field` columns, where they have them). Shown first: `model` (else the model found in
    most of the frames, then with most checkpoints), `dataset` (else the set found in most of the
    frames, then the first by name) and a few checkpoints. `palette`: every model of the report,
    so that a model has the same colour in every section (default: this section's models).
    `few`: how many checkpoints of a model "a few" shows (report.checkpoints_shown; default
    FEW_CHECKPOINTS)."""
    models = _values(frames, "model")
    sets = _values(frames, set_field)
    counts: dict[str, set] = {}
    for df in frames:
        if {"model", "ckpt"} <= set(df.columns):
            for m, c in df.select("model", "ckpt").drop_nulls().unique().iter_rows():
                counts.setdefault(m, set()).add(c)

    def found_in(field: str, value: str) -> int:
        return sum(field in df.columns and value in set(df[field].cast(str)) for df in frames)

    if model not in models and models:
        model = max(
            models,
            key=lambda m: (found_in("model", m), len(counts.get(m, ())), -models.index(m)),
        )
    if dataset not in sets and sets:
        dataset = max(sets, key=lambda s: (found_in(set_field, s), -sets.index(s)))
    colours = tuple(palette or ()) + tuple(m for m in models if m not in (palette or ()))
    return Selectors(
        section,
        tuple(models),
        tuple(checkpoint_order(*frames)),
        tuple(sets),
        set_field,
        set_label,
        model if model in models else ALL,
        FEW,
        dataset if dataset in sets else ALL,
        colours,
        few or FEW_CHECKPOINTS,
    )


def selector_bar(sel: Selectors) -> Html:
    """The section's selectors as a form (sticky at the top of the window while the section is
    read); nothing when the section has nothing to select."""
    if not sel.keys:
        return Html("")
    labels = {"model": "model", "ckpt": "checkpoints", "set": sel.set_label}
    parts = []
    for key in sel.keys:
        opts = "".join(
            f'<option value="{html.escape(v)}"{" selected" if v == sel.default(key) else ""}>'
            f"{html.escape(label)}</option>"
            for v, label in sel.options(key)
        )
        parts.append(
            f'<label>{labels[key]}<select id="{html.escape(sel.element(key))}" '
            f'data-sel="{key}">{opts}</select></label>'
        )
    hint = (
        '<span class="note">checkpoints narrow the curves and tables; charts over checkpoints '
        "show them all</span>"
        if "ckpt" in sel.keys
        else ""
    )
    return Html(f'<form class="selectors" onsubmit="return false">{"".join(parts)}{hint}</form>')


def nothing(what: str) -> Html:
    """The note a section or chart shows when its table has nothing to draw."""
    return Html(f'<p class="empty">Nothing to show: {html.escape(what)}.</p>')


def usable(df, *columns: str):
    """`df` without the rows where any of `columns` is null (or NaN)."""
    import polars as pl

    cols = [c for c in columns if c in df.columns]
    if not cols:
        return df
    out = df.drop_nulls(cols)
    for c in cols:
        if out.schema[c].is_float():
            out = out.filter(pl.col(c).is_not_nan())
    return out


def run_positions(df, few: int = FEW_CHECKPOINTS):
    """`df` with POS (the checkpoint's place in its model's run: 0 first .. 1 last) and FEW_FLAG
    (the checkpoint is one of the `few` first, last and evenly spaced ones between that "(few)"
    shows)."""
    import polars as pl

    if not {"model", "ckpt"} <= set(df.columns):
        return df
    rows = []
    for m in df["model"].unique().to_list():
        names = checkpoint_order(df.filter(pl.col("model") == m))
        n = len(names)
        shown = (
            set(names) if n <= few else {names[round(i * (n - 1) / (few - 1))] for i in range(few)}
        )
        for i, c in enumerate(names):
            rows.append((m, c, i / (n - 1) if n > 1 else 1.0, c in shown))
    pos = pl.DataFrame(
        rows,
        schema={
            "model": df.schema["model"],
            "ckpt": df.schema["ckpt"],
            POS: pl.Float64,
            FEW_FLAG: pl.Boolean,
        },
        orient="row",
    )
    return df.join(pos, on=["model", "ckpt"], how="left")


def _spec(chart) -> dict:
    """The Altair chart's Vega-Lite spec with all its data inline (aggregated tables can be long:
    no row cap)."""
    import altair as alt

    with alt.data_transformers.disable_max_rows():
        return chart.to_dict()


def _filter(sel: Selectors, key: str) -> dict:
    """Keep a row when its selector says "(all)", names the row's value or, for checkpoints,
    says "(few)" and the row's checkpoint is one of them."""
    p, field = f"sel_{key}", json.dumps(sel.field(key))
    terms = [f"{p} == {json.dumps(ALL)}", f"datum[{field}] == {p}"]
    if key == "ckpt":
        terms.insert(1, f"({p} == {json.dumps(FEW)} && datum[{json.dumps(FEW_FLAG)}])")
    return {"filter": " || ".join(terms)}


def _finish(chart, sel: Selectors, keys: list[str]) -> VegaLite:
    """The chart's spec with the section's selector parameters (bound to its <select> elements)
    and their filters applied to its data first."""
    spec = _spec(chart)
    params = [
        {"name": f"sel_{k}", "value": sel.default(k), "bind": {"element": "#" + sel.element(k)}}
        for k in keys
    ]
    spec["params"] = params + spec.get("params", [])
    spec["transform"] = [_filter(sel, k) for k in keys] + spec.get("transform", [])
    return VegaLite(spec)


def _keys(df, sel: Selectors, with_ckpt: bool) -> list[str]:
    keys = [k for k in sel.keys if sel.field(k) in df.columns]
    return [k for k in keys if with_ckpt or k != "ckpt"]


def _default_first(sel: Selectors) -> list[str]:
    """The models with the one shown first at the head (a solid line where dashes tell models apart)."""
    models = list(sel.models)
    return ([sel.model] if sel.model in models else []) + [m for m in models if m != sel.model]


def _model_scale(sel: Selectors, df):
    import altair as alt

    domain = list(sel.palette or sel.models) or sorted(set(df["model"].to_list()))
    return alt.Scale(domain=domain, scheme=MODEL_SCHEME)


def _title(text: str):
    import altair as alt

    return alt.Title(text, anchor="start")


def _facet(chart, df, sel: Selectors, field: str | None, columns: int):
    import altair as alt

    field = field or (sel.set_field if sel.set_field in df.columns else None)
    if field is None:
        return chart
    return chart.facet(facet=alt.Facet(f"{field}:N", title=None), columns=columns)


def checkpoint_chart(
    df,
    y: str,
    sel: Selectors,
    *,
    title: str,
    y_title: str | None = None,
    interval: tuple[str, str] | None = None,
    x: str = "ckpt",
    color: str = "model",
    log_y: bool = False,
    unit_y: bool = False,
    tooltip: tuple[str, ...] = (),
    facet: str | None = None,
    width: int = 320,
    height: int = 200,
) -> VegaLite | Html:
    """A measure `y` over checkpoints: x is the checkpoint in run order (x="ckpt") or the training
    step (x="step"); colour is the model (or `color`, e.g. a sample type, with the model as the
    line's dash); `interval` (low, high columns) draws bars, or a band over steps; one panel per
    data set (or per `facet`). Filtered by the model and data-set selectors."""
    import altair as alt

    need = [x, y, "model", *(interval or ())] + ([color] if color != "model" else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"checkpoint_chart {title!r}: the table has no column {missing}")
    data = usable(df, x, y, "model", color)
    if data.height == 0:
        return nothing(f"{title} (no values)")
    set_field = sel.set_field if sel.set_field in data.columns else None
    tips = [
        c
        for c in ("model", "ckpt", "step", set_field, color, y, *(interval or ()), *tooltip)
        if c and c in data.columns
    ]
    tips = list(dict.fromkeys(tips))
    if x == "ckpt":
        xenc = alt.X("ckpt:N", sort=checkpoint_order(data), title="checkpoint")
    else:
        xenc = alt.X(f"{x}:Q", title="training step" if x == "step" else x)
    yscale = (
        alt.Scale(type="log") if log_y else (alt.Scale(domain=[0, 1]) if unit_y else alt.Undefined)
    )
    yenc = alt.Y(f"{y}:Q", title=y_title or y, scale=yscale)
    if color == "model":
        enc = {"color": alt.Color("model:N", scale=_model_scale(sel, data), title="model")}
    else:
        enc = {
            "color": alt.Color(f"{color}:N", title=color, sort=natural_order(data[color])),
            "strokeDash": alt.StrokeDash(
                "model:N", scale=alt.Scale(domain=_default_first(sel)), title="model"
            ),
        }
    base = alt.Chart(data).encode(x=xenc, **enc)
    layers = []
    if interval:
        lo, hi = interval
        if x == "ckpt":
            layers.append(
                base.mark_rule(opacity=0.6).encode(
                    y=alt.Y(f"{lo}:Q", title=y_title or y, scale=yscale), y2=f"{hi}:Q"
                )
            )
        else:
            layers.append(
                base.mark_area(opacity=0.15).encode(
                    y=alt.Y(f"{lo}:Q", title=y_title or y, scale=yscale), y2=f"{hi}:Q"
                )
            )
    layers.append(base.mark_line().encode(y=yenc))
    layers.append(base.mark_point(filled=True, size=40).encode(y=yenc, tooltip=tips))
    chart = alt.layer(*layers).properties(width=width, height=height)
    chart = _facet(chart, data, sel, facet, columns=3).properties(title=_title(title))
    return _finish(chart, sel, _keys(data, sel, with_ckpt=False))


def curve_chart(
    df,
    x: str,
    y: str,
    sel: Selectors,
    *,
    title: str,
    x_title: str | None = None,
    y_title: str | None = None,
    facet: str | None = None,
    columns: int = 3,
    step: bool = False,
    log_y: bool = False,
    tooltip: tuple[str, ...] = (),
    width: int = 300,
    height: int = 180,
    independent_y: bool = False,
) -> VegaLite | Html:
    """One curve of `y` over `x` per model x checkpoint (a distribution, a quantity over
    generation steps, a loss over training steps): colour is the model, the shade the
    checkpoint's position in its run (light = early); one panel per data set (or per `facet`;
    `independent_y`: each panel its own y scale, for panels of different measures).
    `step` draws a histogram's steps. Filtered by all three selectors; a few checkpoints first."""
    import altair as alt

    missing = [c for c in (x, y, "model") if c not in df.columns]
    if missing:
        raise ValueError(f"curve_chart {title!r}: the table has no column {missing}")
    has_ckpt = "ckpt" in df.columns
    data = usable(df, x, y, "model", *(["ckpt"] if has_ckpt else []))
    if data.height == 0:
        return nothing(f"{title} (no values)")
    data = run_positions(data, sel.few)
    set_field = sel.set_field if sel.set_field in data.columns else None
    tips = [
        c for c in ("model", "ckpt", set_field, facet, x, y, *tooltip) if c and c in data.columns
    ]
    tips = list(dict.fromkeys(tips))
    enc = {"color": alt.Color("model:N", scale=_model_scale(sel, data), title="model")}
    if has_ckpt:
        enc["opacity"] = alt.Opacity(
            f"{POS}:Q",
            scale=alt.Scale(domain=[0, 1], range=[0.3, 1]),
            title="run position (0 first, 1 last)",
            legend=alt.Legend(values=[0, 0.5, 1]),
        )
        enc["detail"] = alt.Detail("ckpt:N")
    yscale = alt.Scale(type="log") if log_y else alt.Undefined
    chart = (
        alt.Chart(data)
        .mark_line(interpolate="step-after" if step else "linear", strokeWidth=1.5)
        .encode(
            x=alt.X(f"{x}:Q", title=x_title or x),
            y=alt.Y(f"{y}:Q", title=y_title or y, scale=yscale),
            tooltip=tips,
            **enc,
        )
        .properties(width=width, height=height)
    )
    chart = _facet(chart, data, sel, facet, columns).properties(title=_title(title))
    if independent_y:
        chart = chart.resolve_scale(y="independent")
    return _finish(chart, sel, _keys(data, sel, with_ckpt=True))


DIVERGING = ("redblue", "blueorange", "purpleorange", "redyellowblue", "spectral")


def heatmap(
    df,
    x: str,
    y: str,
    color: str,
    sel: Selectors | None,
    *,
    title: str,
    facet: str | None = None,
    domain: tuple[float, float] | None = None,
    tooltip: tuple[str, ...] = (),
    columns: int = 3,
    width: int = 200,
    height: int = 180,
    x_sort: list | None = None,
    y_sort: list | None = None,
    facet_sort: list | None = None,
    scheme: str = "viridis",
) -> VegaLite | Html:
    """A grid of `color` over (x, y) — candidates by layer and position, CKA by layer pair, cosines
    between checkpoints — one panel per `facet`; filtered by the section's selectors (`sel`; None:
    unfiltered). Layers (a `y` whose name starts with "layer") grow upwards; `x_sort`/`y_sort`/
    `facet_sort`: the categories' order; `scheme`: a Vega colour scheme (a diverging one, such as "redblue",
    is centred on 0)."""
    import altair as alt

    data = usable(df, x, y, color)
    if data.height == 0:
        return nothing(f"{title} (no values)")
    if sel is not None:
        data = run_positions(data, sel.few)
    scale = alt.Scale(scheme=scheme, **({"domain": list(domain)} if domain else {}),
                      **({"domainMid": 0} if scheme in DIVERGING else {}))  # fmt: skip
    y_order = y_sort or ("descending" if y.startswith("layer") else "ascending")
    tips = [c for c in ("model", "ckpt", facet, x, y, color, *tooltip) if c and c in data.columns]
    chart = (
        alt.Chart(data)
        .mark_rect()
        .encode(
            x=alt.X(f"{x}:O", title=x, sort=x_sort or "ascending"),
            y=alt.Y(f"{y}:O", title=y, sort=y_order),
            color=alt.Color(f"{color}:Q", scale=scale, title=color),
            tooltip=list(dict.fromkeys(tips)),
        )
        .properties(width=width, height=height)
    )
    if facet:
        chart = chart.facet(
            facet=alt.Facet(f"{facet}:N", title=None, sort=facet_sort or "ascending"),
            columns=columns,
        )
    chart = chart.properties(title=_title(title))
    if sel is None:
        return VegaLite(_spec(chart))
    return _finish(chart, sel, _keys(data, sel, with_ckpt=True))


def bar_chart(
    df,
    x: str,
    y: str,
    *,
    color: str | None = None,
    colors: dict | None = None,
    title: str,
    x_title: str | None = None,
) -> VegaLite | Html:
    """Horizontal bars of `x` per `y` category (stacked by `color`); no selectors."""
    import altair as alt

    data = usable(df, x, y)
    if data.height == 0:
        return nothing(f"{title} (no values)")
    enc = {}
    if color:
        scale = (
            alt.Scale(domain=list(colors), range=list(colors.values())) if colors else alt.Undefined
        )
        enc["color"] = alt.Color(f"{color}:N", scale=scale)
    chart = (
        alt.Chart(data)
        .mark_bar()
        .encode(
            y=alt.Y(f"{y}:N", title=None),
            x=alt.X(f"{x}:Q", title=x_title or x),
            tooltip=[c for c in (y, color, x) if c],
            **enc,
        )
        .properties(width=480, height=alt.Step(22), title=_title(title))
    )
    return VegaLite(_spec(chart))


def table(
    df, sel: Selectors | None = None, *, caption: str | None = None, max_rows: int = 2000
) -> Html:
    """A table whose rows follow the section's model, checkpoint and data-set selectors (all
    rows are in the page; longer than FOLD_ROWS it starts folded)."""
    attrs = {k: sel.field(k) for k in sel.keys} if sel else None
    return Html(table_html(df, max_rows=max_rows, caption=caption, row_attrs=attrs))


def row_tags(sel: Selectors, row: dict) -> str:
    """The attributes that make any element (a trace, a list item) follow the selectors."""
    tags = "".join(
        f' data-sel-{k}="{html.escape(str(row[sel.field(k)]))}"'
        for k in sel.keys
        if row.get(sel.field(k)) is not None
    )
    return f' class="rl-row"{tags}' if tags else ""


def natural_order(values) -> list[str]:
    """Distinct values in natural order ('Level 2' before 'Level 10'), placeholders such as
    '(none)' last, nulls dropped."""

    def key(v: str):
        return v.startswith("("), [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", v)]

    return sorted({str(v) for v in values if v is not None}, key=key)
