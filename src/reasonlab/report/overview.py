"""The report's run overview: models and checkpoints, datasets (rows, rejects), environments, and
how each model-loading job ran (device, dtype, GPUs).

`aggregate_overview` gathers the per-job outputs (model handles, dataset summaries and rejects,
environment descriptions, compute records) into four small tidy tables; `section` shows them.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path

from reasonlab.report import charts
from reasonlab.report.html import Html
from reasonlab.report.tables import out_paths

KEY = "overview"
TITLE = "Run overview"
TABLES: tuple[str, ...] = ("models", "datasets", "environments", "compute")

STR, INT = "String", "Int64"
MODEL_SCHEMA = {
    "model": STR,
    "ckpt": STR,
    "kind": STR,
    "location": STR,
    "revision": STR,
    "content_hash": STR,
    "architecture": STR,
    "num_hidden_layers": INT,
    "hidden_size": INT,
    "vocab_size": INT,
    "dtype": STR,
    "is_adapter": "Boolean",
    "base": STR,
}
DATASET_SCHEMA = {
    "dataset": STR,
    "source": STR,
    "format": STR,
    "n_read": INT,
    "n_rejected": INT,
    "n_rows": INT,
    "n_without_reference": INT,
    "first_rejects": STR,
}
ENV_SCHEMA = {
    "environment": STR,
    "python": STR,
    "package": STR,
    "version": STR,
    "imports_ok": "Boolean",
    "import_errors": STR,
}
COMPUTE_SCHEMA = {
    "stage": STR,
    "model": STR,
    "ckpt": STR,
    "item": STR,
    "device": STR,
    "dtype": STR,
    "device_map": STR,
    "gpus": INT,
    "gpu_name": STR,
    "gpu_memory_gib": "Float64",
    "peak_gpu_memory_gib": "Float64",
    "threads": INT,
    "seconds": "Float64",
}
FIRST_REJECTS = 3


def aggregate_overview(
    handles: list[str | Path],
    summaries: list[str | Path],
    rejects: list[str | Path],
    environments: list[str | Path],
    out: Mapping[str, str | Path],
    compute: list[str | Path] = (),
) -> None:
    """Write the tables `models` (one row per model handle), `datasets` (counts and the first
    rejects of each prepared dataset; `summaries` and `rejects` pair up), `environments` (one
    row per environment x package) and `compute` (one row per model-loading job's record, see
    `reasonlab.compute.record`) to the paths `out` names for them."""
    import polars as pl

    from reasonlab.models import read_handle

    paths = out_paths(out, TABLES, "aggregate_overview")
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
            }
        )
    pl.DataFrame(rows, schema=_schema(MODEL_SCHEMA)).write_parquet(paths["models"])

    drows = []
    for s, r in zip(summaries, rejects, strict=True):
        summary = json.loads(Path(s).read_text())
        first = []
        with open(r, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                first.append(f"row {rec['row']}: {rec['reason']}")
                if len(first) == FIRST_REJECTS:
                    break
        drows.append(
            {
                **{k: summary[k] for k in list(DATASET_SCHEMA)[:-1]},
                "first_rejects": "; ".join(first) or None,
            }
        )
    pl.DataFrame(drows, schema=_schema(DATASET_SCHEMA)).write_parquet(paths["datasets"])

    erows = []
    for p in environments:
        env = json.loads(Path(p).read_text())
        failed = "; ".join(f"{m}: {v['error']}" for m, v in env["imports"].items() if not v["ok"])
        for pkg, version in sorted(env["packages"].items()):
            erows.append(
                {
                    "environment": env["environment"],
                    "python": env["python"],
                    "package": pkg,
                    "version": version,
                    "imports_ok": env["ok"],
                    "import_errors": failed or None,
                }
            )
    pl.DataFrame(erows, schema=_schema(ENV_SCHEMA)).write_parquet(paths["environments"])

    crows = []
    for p in compute:
        rec = json.loads(Path(p).read_text())
        item = rec.get("textset") or rec.get("dataset") or rec.get("item") or Path(p).stem
        crows.append({k: rec.get(k) for k in COMPUTE_SCHEMA} | {"item": item})
    pl.DataFrame(crows, schema=_schema(COMPUTE_SCHEMA)).write_parquet(paths["compute"])


def _schema(names: dict[str, str]) -> dict:
    import polars as pl

    return {col: getattr(pl, dtype) for col, dtype in names.items()}


def section(tables: dict, context: dict) -> list:
    """Handles, datasets (with a kept/rejected chart) and environments (import status, versions)."""
    import polars as pl

    models = charts.usable(tables["models"], "model")
    datasets = charts.usable(tables["datasets"], "dataset")
    envs = charts.usable(tables["environments"], "environment")
    if not (models.height or datasets.height or envs.height):
        return [charts.nothing("no model handles, datasets or environments were recorded")]
    blocks: list = [
        Html(
            f"<p>{models['model'].n_unique()} model(s), {models.height} model × checkpoint "
            f"handle(s), {datasets.height} dataset(s). Config hash "
            f"<code>{html.escape(str(context.get('config_hash', '?')))}</code>; reasonlab "
            f"{html.escape(str(context.get('version', '?')))}.</p>"
        ),
        Html("<h3>Models and checkpoints</h3>"),
    ]
    if models.height:
        shown = models.with_columns(pl.col("content_hash").str.slice(0, 19)).drop("is_adapter")
        blocks.append(charts.table(shown))
    else:
        blocks.append(charts.nothing("no model handles"))
    blocks.append(Html("<h3>Datasets</h3>"))
    if datasets.height:
        blocks.append(charts.table(datasets))
        counts = datasets.select("dataset", kept="n_rows", rejected="n_rejected").unpivot(
            index="dataset", variable_name="rows", value_name="count"
        )
        blocks.append(
            charts.bar_chart(
                counts,
                "count",
                "dataset",
                color="rows",
                colors={"kept": "#4c78a8", "rejected": "#e45756"},
                title="Rows kept and rejected per dataset",
                x_title="rows",
            )
        )
    else:
        blocks.append(charts.nothing("no datasets"))
    blocks.append(Html("<h3>Environments</h3>"))
    if not envs.height:
        blocks.append(charts.nothing("no environments were described"))
        return blocks
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
            Html(f"<p><b>{html.escape(env)}</b> (Python {html.escape(str(python))}): {state}</p>")
        )
    versions = charts.usable(envs, "package")
    if versions.height:
        wide = versions.pivot(
            on="environment", index="package", values="version", aggregate_function="first"
        ).sort("package")
        blocks.append(charts.table(wide))
    blocks += _compute(tables.get("compute"))
    return blocks


def _compute(jobs) -> list:
    """Where the model-loading jobs ran: a line per (stage, device, dtype, GPU) and the jobs."""
    import polars as pl

    blocks: list = [Html("<h3>Devices and precision</h3>")]
    if jobs is None or not charts.usable(jobs, "stage").height:
        return blocks + [charts.nothing("no job that loads a model has run")]
    jobs = charts.usable(jobs, "stage")
    groups = (
        jobs.group_by("stage", "device", "dtype", "gpu_name", "gpus", maintain_order=True)
        .agg(jobs=pl.len(), seconds=pl.col("seconds").sum(), peak=pl.col("peak_gpu_memory_gib").max())
        .sort("stage", "device")
    )  # fmt: skip
    items = []
    for r in groups.iter_rows(named=True):
        where = f"{r['gpus']} × {html.escape(str(r['gpu_name']))}" if r["gpus"] else "the CPU"
        peak = f", peak GPU memory {r['peak']:.1f} GiB" if r["peak"] is not None else ""
        items.append(
            f"<li><b>{html.escape(r['stage'])}</b>: {r['jobs']} job(s) on {where} in "
            f"{html.escape(str(r['dtype']))}, {r['seconds'] or 0:.0f} s in all{peak}</li>"
        )
    blocks.append(Html(f"<ul>{''.join(items)}</ul>"))
    blocks.append(charts.table(jobs.sort("stage", "model", "ckpt", "item")))
    return blocks
