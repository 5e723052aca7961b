"""Fine-tuning with LlamaFactory: training-data selection, the run's files, the run, its curves.

A training run (config `training.<run>`) starts from a model handle, takes the rows of a
configured dataset (all of them, or the n with the highest / lowest log-likelihood under the base
model, or a seeded random n: seed 003's selection), writes them as a LlamaFactory dataset with its
`dataset_info.json`, writes the training YAML from `resources/llamafactory/train.yaml` with the
run's settings, and runs `llamafactory-cli train` in the training environment. Every
`checkpoint-N` the run saves is then a checkpoint `step-N` of the model that names the run
(`models.<m>.run`), and the run's output directory is its checkpoint `final` (that layout lives in
`reasonlab.models`; the runs' aggregation and report section in `reasonlab.report.training`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from reasonlab import ReasonlabError

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parents[2] / "resources" / "llamafactory" / "train.yaml"
TAIL_LINES = 25
SCORE_DECIMALS = 4  # high/low selection: scores equal to this many decimals tie, and ties go by id


class TrainingError(ReasonlabError):
    """A training run cannot be prepared or LlamaFactory failed."""


# ----------------------------------------------------------------------------- selection


def select_rows(data, scores, keep: str, n: int | None, seed: int, by: str = "llh_mean"):
    """Seed 003's selection: the rows to train on, with their scores and a `selected` flag.

    `data`: the prepared dataset (polars; id, question, solution, ...); `scores`: its sequence
    scores under the base model (id and `by`), or None for keep == "all". keep: all | high | low |
    random; `n` rows (all rows when None or larger). Returns every row with `score` and `selected`.
    high/low rank by the score rounded to SCORE_DECIMALS, ties by id, so float rounding from another
    batch composition does not change which rows are chosen.
    """
    import polars as pl

    if keep not in ("all", "high", "low", "random"):
        raise TrainingError(f"select.keep must be all, high, low or random, not {keep!r}")
    df = data.select("id", "question", "solution", "system", "type")
    if scores is not None:
        if by not in scores.columns:
            raise TrainingError(f"select.by: the scores have no column {by!r}")
        df = df.join(scores.select("id", pl.col(by).alias("score")), on="id", how="left")
    else:
        df = df.with_columns(score=pl.lit(None, pl.Float64))
    usable = df.filter(
        pl.col("solution").is_not_null() & (pl.col("solution") != "") | pl.lit(keep == "all")
    )
    count = usable.height if n is None else min(n, usable.height)
    if keep == "all":
        chosen = usable["id"].head(count)
    elif keep == "random":
        chosen = usable.sample(n=count, seed=seed, shuffle=True)["id"]
    else:
        if usable["score"].null_count():
            raise TrainingError("some rows have no log-likelihood score; cannot select by score")
        # scores that differ only by rounding (another batch composition, another GPU) tie, and
        # ties go by id: the selection does not flip when a speed setting changes
        ranked = usable.with_columns(rounded=pl.col("score").round(SCORE_DECIMALS)).sort(
            ["rounded", "id"], descending=[keep == "high", False]
        )
        chosen = ranked["id"].head(count)
    return df.with_columns(selected=pl.col("id").is_in(chosen.to_list()))


def write_llamafactory_dataset(rows, stage: str, data_dir: str | Path, name: str = "train") -> int:
    """Write the selected rows as a LlamaFactory dataset in `data_dir` (data + dataset_info.json).

    Stage pt: `{"text": question (+ "\\n" + solution when there is one)}`; other stages: alpaca
    `{"instruction": question, "output": solution, "system": system}`. Returns the number of rows.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for r in rows.iter_rows(named=True):
        if stage == "pt":
            text = r["question"] if not r["solution"] else f"{r['question']}\n{r['solution']}"
            records.append({"text": text})
        else:
            records.append({"instruction": r["question"], "input": "", "output": r["solution"] or "",
                            "system": r["system"] or ""})  # fmt: skip
    if not records:
        raise TrainingError("no training rows were selected")
    if stage == "pt":
        info = {name: {"file_name": f"{name}.json", "columns": {"prompt": "text"}}}
    else:
        columns = {"prompt": "instruction", "query": "input", "response": "output"}
        if any(r["system"] for r in records):
            columns["system"] = "system"
        else:
            records = [{k: v for k, v in r.items() if k != "system"} for r in records]
        info = {name: {"file_name": f"{name}.json", "columns": columns}}
    with (data_dir / f"{name}.json").open("w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return len(records)


# ----------------------------------------------------------------------------- the run


def train_config(settings: dict, model_path: str, data_dir: str | Path, output_dir: str | Path,
                 revision: str | None = None, template: str | Path | None = None) -> dict:  # fmt: skip
    """The LlamaFactory training config: the template's defaults, then the run's settings, then the
    paths this workflow owns (which a run cannot override)."""
    with open(template or TEMPLATE) as f:
        cfg = yaml.safe_load(f) or {}
    cfg.update(settings)
    owned = {"model_name_or_path": model_path, "dataset": "train", "dataset_dir": str(data_dir),
             "output_dir": str(output_dir), "overwrite_output_dir": True}  # fmt: skip
    clash = sorted(k for k in owned if k in settings)
    if clash:
        raise TrainingError(
            f"llamafactory settings may not set {', '.join(clash)}: the workflow sets them"
        )
    cfg.update(owned)
    if revision:
        cfg["model_revision"] = revision
    return cfg


def run_llamafactory(config: dict, yaml_path: str | Path) -> None:
    """Write `config` to `yaml_path` and run `llamafactory-cli train` on it with this Python's
    environment. Its output is passed through to stdout (the job's log); on failure the error
    quotes the line that says why."""
    from collections import deque

    yaml_path = Path(yaml_path)
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = Path(sys.executable).parent / "llamafactory-cli"
    if not cli.exists():
        raise TrainingError(
            f"llamafactory-cli is not in {cli.parent}; run this in the train environment"
        )
    env = {**os.environ, "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false"}
    gpus = visible_gpus()
    if gpus > 1:  # LlamaFactory's launcher starts one torchrun process per visible GPU
        env.setdefault("NPROC_PER_NODE", str(gpus))
        env.setdefault("FORCE_TORCHRUN", "1")
    print(f"[finetune] {gpus} GPU(s) visible: " + (
        f"{gpus} training processes (torchrun, data parallel)" if gpus > 1
        else "one process" + (" on the GPU" if gpus else " on the CPU")), flush=True)  # fmt: skip
    tail: deque[str] = deque(maxlen=200)
    with subprocess.Popen([str(cli), "train", str(yaml_path)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env) as proc:  # fmt: skip
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line.rstrip("\n"))
    sys.stdout.flush()
    if proc.returncode != 0:
        lines = [ln for ln in tail if ln.strip() and "it/s]" not in ln]
        reason = next(
            (ln for ln in reversed(lines) if re.search(r"(Error|error|Exception)\b", ln)),
            lines[-1] if lines else "",
        )
        raise TrainingError(
            f"llamafactory-cli train {yaml_path} failed (exit {proc.returncode}): {reason.strip()}"
        )


def visible_gpus() -> int:
    """CUDA devices this job may use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def read_loss_curve(output_dir: str | Path, run: str):
    """The run's training log (loss, learning rate per logged step) as a polars DataFrame."""
    import polars as pl

    state = Path(output_dir) / "trainer_state.json"
    if not state.exists():
        raise TrainingError(f"{output_dir}: no trainer_state.json; did the run finish?")
    history = json.loads(state.read_text()).get("log_history", [])
    rows = [{"run": run, "step": h["step"], "epoch": h.get("epoch"), "loss": h["loss"],
             "learning_rate": h.get("learning_rate"), "grad_norm": h.get("grad_norm")}
            for h in history if "loss" in h]  # fmt: skip
    return pl.DataFrame(
        rows, schema_overrides={"grad_norm": pl.Float64, "learning_rate": pl.Float64}
    )
