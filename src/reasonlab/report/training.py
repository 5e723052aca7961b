"""Fine-tuning runs: their loss curves, checkpoints and training-data selections, and their report
section with seed 003's dynamics (log-likelihood by sample type over a run's training steps).

`aggregate_training` reads each run's LlamaFactory output (`trainer_state.json`), its selection
table and the handles of the run checkpoints that are analysed; `section` draws the loss, the
selection and the dynamics (from the score stage's `score_by_type`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from reasonlab.report import charts
from reasonlab.report.html import Html
from reasonlab.report.tables import out_paths

KEY = "training"
TITLE = "Training runs and dynamics"
TABLES: tuple[str, ...] = ("training_loss", "training_checkpoints", "training_selection")
NEEDS: tuple[str, ...] = ("score_by_type",)


def aggregate_training(
    runs: list[str],
    outputs: list[str | Path],
    selections: list[str | Path],
    handles: list[str | Path],
    out: Mapping[str, str | Path],
) -> None:
    """Write `training_loss` (each run's loss per logged step), `training_checkpoints` (model,
    ckpt, run and training step of every analysed run checkpoint: `step-N` is N, `final` the
    run's last step) and `training_selection` (every run's selection table with its `run`) to the
    paths `out` names for them. `runs`, `outputs` (LlamaFactory output directories) and
    `selections` pair up; `handles` are the analysed run checkpoints' model handles."""
    import polars as pl

    from reasonlab.models import STEP, read_handle
    from reasonlab.training import TrainingError, read_loss_curve

    paths = out_paths(out, TABLES, "aggregate_training")
    if not runs:
        raise ValueError("aggregate_training: no training runs to aggregate")
    pairs = list(zip(runs, outputs, strict=True))
    pl.concat([read_loss_curve(o, r) for r, o in pairs], how="diagonal_relaxed").write_parquet(
        paths["training_loss"]
    )
    finals = {
        r: json.loads((Path(o) / "trainer_state.json").read_text())["global_step"] for r, o in pairs
    }
    rows = []
    for h in map(read_handle, handles):
        where = Path(h.path or "").resolve()
        run = next((r for r, o in pairs if where.is_relative_to(Path(o).resolve())), None)
        if run is None:
            raise TrainingError(
                f"{h.model}/{h.ckpt}: its weights ({h.path}) are in none of the runs' output "
                f"directories ({', '.join(str(o) for _, o in pairs)})"
            )
        step = finals[run] if h.ckpt == "final" else int(STEP.match(h.ckpt).group(1))
        rows.append({"model": h.model, "ckpt": h.ckpt, "run": run, "step": step})
    schema = {"model": pl.String, "ckpt": pl.String, "run": pl.String, "step": pl.Int64}
    pl.DataFrame(rows, schema=schema).write_parquet(paths["training_checkpoints"])
    pl.concat(
        [
            pl.read_parquet(s).with_columns(run=pl.lit(r))
            for r, s in zip(runs, selections, strict=True)
        ],
        how="diagonal_relaxed",
    ).write_parquet(paths["training_selection"])


def _loss_by_model(loss, ckpts):
    """The loss curves with the model each run trained (a run no analysed model names keeps its
    run name as the model)."""
    import polars as pl

    names = ckpts.select("run", "model").unique()
    return (
        loss.join(names, on="run", how="left")
        .with_columns(model=pl.coalesce("model", "run"))
        .sort("model", "step")
    )


def section(tables: dict, context: dict) -> list:
    """Loss per training step, the training-data selection per sample type, and the
    log-likelihood of each text set's sample types over the run's checkpoints (training steps)."""
    import polars as pl

    loss = charts.usable(tables["training_loss"], "run", "step", "loss")
    ckpts = charts.usable(tables["training_checkpoints"], "model", "ckpt", "run", "step")
    selection = charts.usable(tables["training_selection"], "run")
    by_type = charts.usable(tables["score_by_type"], "model", "ckpt", "textset")
    dyn = by_type.join(ckpts, on=["model", "ckpt"])
    if not (loss.height or selection.height or dyn.height):
        return [charts.nothing("no training run was recorded")]
    loss = _loss_by_model(loss, ckpts)
    # shown first: the text set with most sample types (seed 003's pool), where the dynamics
    # by type have something to compare
    first = None
    if dyn.height and "type" in dyn.columns:
        kinds = dyn.group_by("textset").agg(pl.col("type").n_unique()).sort("type", "textset",
                                                                           descending=[True, False])  # fmt: skip
        first = kinds["textset"][0]
    sel = charts.selectors(
        KEY,
        dyn,
        loss,
        set_field="textset",
        set_label="text set",
        dataset=first,
        palette=context.get("models"),
        few=context.get("checkpoints_shown"),
    )
    blocks: list = [
        Html(
            "<p>LlamaFactory runs: the training loss per logged step, which rows each run trained "
            "on, and how the log-likelihood of each text set's sample types moves over the run's "
            "checkpoints (seed 003's dynamics). A run is shown under the model that names it; "
            "charts and tables follow the selectors.</p>"
        ),
        charts.selector_bar(sel),
        Html("<h3>Training loss</h3>"),
        charts.curve_chart(
            loss,
            "step",
            "loss",
            sel,
            log_y=True,
            title="Training loss",
            x_title="training step",
            tooltip=("run", "learning_rate"),
            width=420,
            height=220,
        )
        if loss.height
        else charts.nothing("no logged loss"),
        Html("<h3>Training data selection</h3>"),
    ]
    if selection.height:
        if "score" not in selection.columns:
            selection = selection.with_columns(score=pl.lit(None, pl.Float64))
        summary = (
            selection.group_by("run", "type")
            .agg(
                rows=pl.len(),
                selected=pl.col("selected").sum(),
                mean_score=pl.col("score").mean(),
                mean_score_selected=pl.col("score").filter(pl.col("selected")).mean(),
            )
            .sort("run", "type", nulls_last=True)
        )
        blocks.append(charts.table(summary))
    else:
        blocks.append(charts.nothing("no selection table"))
    blocks.append(Html("<h3>Log-likelihood by sample type over training steps</h3>"))
    if dyn.height:
        blocks += [
            charts.checkpoint_chart(
                dyn,
                "avg_llh_per_token",
                sel,
                x="step",
                color="type",
                title="Mean log-probability per token, by sample type",
                y_title="log-probability per token (nats)",
                tooltip=("run", "n_texts", "avg_log_likelihood", "avg_perplexity"),
            ),
            charts.table(
                dyn.select(
                    "run",
                    "model",
                    "ckpt",
                    "step",
                    "textset",
                    "type",
                    "n_texts",
                    "avg_log_likelihood",
                    "avg_llh_per_token",
                    "avg_perplexity",
                ).sort("run", "textset", "type", "step"),
                sel,
            ),
        ]
    else:
        blocks.append(charts.nothing("no scored checkpoint of a training run"))
    return blocks
