"""The report's run overview: models and checkpoints, datasets (rows, rejects), environments.

`aggregate_overview` gathers the per-job outputs (handles, dataset summaries and rejects, environment
descriptions) into three small tidy tables; the `overview` section shows them.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from reasonlab.report import Html, section

MODEL_COLUMNS = ["model", "ckpt", "kind", "location", "revision", "content_hash", "architecture",
                 "num_hidden_layers", "hidden_size", "vocab_size", "dtype", "is_adapter", "base"]  # fmt: skip


def aggregate_overview(
    handles: list[str | Path],
    summaries: list[str | Path],
    rejects: list[str | Path],
    environments: list[str | Path],
    out_models: str | Path,
    out_datasets: str | Path,
    out_envs: str | Path,
) -> None:
    """Write models.parquet, datasets.parquet and environments.parquet for the overview section."""
    import polars as pl

    from reasonlab.models import read_handle

    rows = []
    for p in handles:
        h = read_handle(p)
        rows.append(
            {
                "model": h.model,
                "ckpt": h.ckpt,
                "kind": h.kind,
                "location": h.location,
                "revision": h.commit or h.revision,
                "content_hash": h.content_hash,
                "architecture": h.architecture,
                "num_hidden_layers": h.num_hidden_layers,
                "hidden_size": h.hidden_size,
                "vocab_size": h.vocab_size,
                "dtype": h.dtype,
                "is_adapter": h.is_adapter,
                "base": f"{h.base['model']}/{h.base['ckpt']}" if h.base else None,
            }  # fmt: skip
        )
    pl.DataFrame(rows, schema_overrides={"revision": pl.String, "base": pl.String}).select(
        MODEL_COLUMNS
    ).write_parquet(out_models)

    drows = []
    for s, r in zip(summaries, rejects, strict=True):
        summary = json.loads(Path(s).read_text())
        first = []
        with open(r, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                first.append(f"row {rec['row']}: {rec['reason']}")
                if len(first) == 3:
                    break
        drows.append({**{k: summary[k] for k in ("dataset", "source", "format", "n_read", "n_rejected", "n_rows", "n_without_reference")},
                      "first_rejects": "; ".join(first) or None})  # fmt: skip
    pl.DataFrame(drows, schema_overrides={"first_rejects": pl.String}).write_parquet(out_datasets)

    erows = []
    for p in environments:
        env = json.loads(Path(p).read_text())
        failed = "; ".join(f"{m}: {v['error']}" for m, v in env["imports"].items() if not v["ok"])
        for pkg, version in sorted(env["packages"].items()):
            erows.append({"environment": env["environment"], "python": env["python"], "package": pkg,
                          "version": version, "imports_ok": env["ok"], "import_errors": failed or None})  # fmt: skip
    pl.DataFrame(erows, schema_overrides={"import_errors": pl.String}).write_parquet(out_envs)


@section("overview", "Run overview", order=0, tables=("models", "datasets", "environments"))
def overview_section(tables: dict, context: dict) -> list:
    import altair as alt
    import polars as pl

    models, datasets, envs = tables["models"], tables["datasets"], tables["environments"]
    shown = models.with_columns(pl.col("content_hash").str.slice(0, 19)).drop("is_adapter")
    blocks: list = [
        Html(
            f"<p>{models['model'].n_unique()} model(s), {models.height} model × checkpoint handle(s), "
            f"{datasets.height} dataset(s). Config hash <code>{html.escape(str(context.get('config_hash', '?')))}</code>; "
            f"reasonlab {html.escape(str(context.get('version', '?')))}.</p>"
        ),
        Html("<h3>Models and checkpoints</h3>"),
        shown,
        Html("<h3>Datasets</h3>"),
        datasets,
    ]
    counts = datasets.select("dataset", kept="n_rows", rejected="n_rejected").unpivot(
        index="dataset", variable_name="rows", value_name="count"
    )
    blocks.append(
        alt.Chart(counts)
        .mark_bar()
        .encode(
            y=alt.Y("dataset:N", title=None),
            x=alt.X("count:Q", title="rows"),
            color=alt.Color(
                "rows:N", scale=alt.Scale(domain=["kept", "rejected"], range=["#4c78a8", "#e45756"])
            ),
            tooltip=["dataset", "rows", "count"],
        )
        .properties(width=480, height=alt.Step(22), title="Rows kept and rejected per dataset")
    )
    blocks.append(Html("<h3>Environments</h3>"))
    status = envs.group_by("environment", maintain_order=True).agg(
        pl.first("python"), pl.first("imports_ok"), pl.first("import_errors")
    )
    for env, python, ok, errors in status.iter_rows():
        state = (
            '<span class="ok">imports ok</span>'
            if ok
            else f'<span class="warn">import failed: {html.escape(errors or "")}</span>'
        )
        blocks.append(
            Html(f"<p><b>{html.escape(env)}</b> (Python {html.escape(python)}): {state}</p>")
        )
    versions = envs.pivot(on="environment", index="package", values="version").sort("package")
    blocks.append(versions)
    return blocks
