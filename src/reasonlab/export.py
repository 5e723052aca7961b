"""The files the seeds' users already read (`export.seed_formats`), written beside reasonlab's own
tables so that an existing notebook keeps working.

- Seed 003's aggregated dynamics JSON (`evaluate_all_checkpoints.py`): per trained model and
  text set, `{"steps": [...], "results_by_type": {type: {"avg_perplexity": [...],
  "avg_log_likelihood": [...]}}}` over the run's checkpoints in step order (`seed003_dynamics`).
- Seed 004's JSONL with `analysis_result` per problem: `reasonlab.guided.export_seed004`.
- Seed 000's `{model}_embeddings.npy` and `{model}_results.json`: written by the `embed` rule.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def seed003_dynamics(by_type, checkpoints, model: str, textset: str) -> dict:
    """Seed 003's dynamics of one model's text set: `by_type` is the aggregated `score_by_type`
    table, `checkpoints` `training_checkpoints` (each run checkpoint's step). Checkpoints without
    a step (not saved by a run) are left out; the lists follow `steps`."""
    import polars as pl

    steps = checkpoints.filter(pl.col("model") == model).drop_nulls("step").sort("step")
    rows = by_type.filter((pl.col("model") == model) & (pl.col("textset") == textset))
    step_of = dict(zip(steps["ckpt"], steps["step"], strict=True))
    rows = rows.filter(pl.col("ckpt").is_in(list(step_of)))
    out: dict = {"steps": [int(step_of[c]) for c in steps["ckpt"]], "results_by_type": {}}
    for t in sorted({str(x) for x in rows["type"].to_list()}):
        part = {
            r["ckpt"]: r
            for r in rows.filter(pl.col("type").cast(pl.String) == t).iter_rows(named=True)
        }
        out["results_by_type"][t] = {
            "avg_perplexity": [part[c]["avg_perplexity"] if c in part else None for c in steps["ckpt"]],
            "avg_log_likelihood": [part[c]["avg_log_likelihood"] if c in part else None for c in steps["ckpt"]],
        }  # fmt: skip
    return out


def export_seed003(by_type_path, checkpoints_path, pairs: list[str], outputs: list[str]) -> None:
    """Write seed 003's dynamics JSON of every `model/textset` pair to its output (atomically)."""
    import polars as pl

    by_type, ckpts = pl.read_parquet(by_type_path), pl.read_parquet(checkpoints_path)
    for pair, path in zip(pairs, outputs, strict=True):
        model, textset = pair.split("/", 1)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(seed003_dynamics(by_type, ckpts, model, textset), indent=1))
        os.replace(tmp, out)
