"""The files the seeds' users already read (`export.seed_formats`), written beside reasonlab's own
tables so that an existing notebook keeps working. Each format is a pure function from reasonlab's
tables to the seed's structure (tested on tables written by hand) and a thin writer that reads the
tables and writes the files atomically (a temporary file, then `os.replace`).

- Seed 001's `intervention_results.json` per steering job (`seed001_interventions`) and
  `alignment_results.json` per CKA pair (`seed001_alignment`); its `probe_accuracies.json` and
  `reasoning_directions.pt` are written by the `probes` and `directions` rules themselves.
- Seed 002's per-dataset files over every checkpoint's own scored generations
  (`seed002_files`): `{model_name}_token_stats.csv`, `{model_name}_all_tokens_detailed.csv`,
  `prompt_level_results.csv` and `results_summary.json`.
- Seed 003's aggregated dynamics JSON (`evaluate_all_checkpoints.py`): per trained model and
  text set, `{"steps": [...], "results_by_type": {type: {"avg_perplexity": [...],
  "avg_log_likelihood": [...]}}}` over the run's checkpoints in step order (`seed003_dynamics`).
- Seed 004's JSONL with `analysis_result` per problem: `reasonlab.guided.export_seed004`.
- Seed 000's `{model}_embeddings.npy` and `{model}_results.json`: written by the `embed` rule.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from reasonlab.outputs import write_texts

GENERATION_COLUMNS = ("id", "sample", "prompt", "completion", "prompt_ids", "token_ids")
SEED002_TOKEN_COLUMNS = [
    "current_token", "next_token", "entropy", "probability_of_next_token", "generation_step",
]  # fmt: skip


def _num(x) -> float | None:
    """A JSON number: None for a missing or non-finite value."""
    return None if x is None or not math.isfinite(x) else float(x)


# ------------------------------------------------------------------------------ seed 001


def seed001_interventions(table, settings) -> dict[str, list[str]]:
    """Seed 001's `intervention_results.json` of one steering job: `table` and `settings` are the
    `intervene` job's graded generations and its one-row-per-setting table. Returns strength (as
    Python prints the float; the baseline is "0.0") -> every generated text of that setting, in
    the job's order (every swept prompt, not only the original's first five), strengths ascending.
    A setting that produced nothing (it failed: non-finite logits, no chosen direction) has []."""
    import polars as pl

    keyed = []
    for r in settings.filter(pl.col("kind").is_in(["baseline", "steer"])).iter_rows(named=True):
        strength = 0.0 if r["kind"] == "baseline" else float(r["strength"])
        keyed.append((strength + 0.0, r["order"], r["setting"]))  # + 0.0: -0.0 is 0.0
    out: dict[str, list[str]] = {}
    for strength, _, setting in sorted(keyed):
        key = str(strength)
        if key in out:  # a swept strength 0.0 is the baseline again
            continue
        if "setting" not in table.columns:  # a job whose every setting failed wrote no rows
            out[key] = []
            continue
        out[key] = table.filter(pl.col("setting") == setting)["completion"].to_list()
    return out


def export_seed001_interventions(table_path, settings_path, out_path) -> dict[str, int]:
    """Write a steering job's `intervention_results.json`; returns the texts per strength."""
    import polars as pl

    got = seed001_interventions(pl.read_parquet(table_path), pl.read_parquet(settings_path))
    write_texts({out_path: json.dumps(got, indent=2, ensure_ascii=False) + "\n"})
    return {k: len(v) for k, v in got.items()}


def seed001_alignment(cka, directions_a: dict | None = None, directions_b: dict | None = None
                      ) -> dict:  # fmt: skip
    """Seed 001's `alignment_results.json` (`analyze_cross_model_alignment`) of one `cka` job's
    table (`layer_a`, `layer_b`, `cka`: linear CKA): `cka_matrix` ("l1,l2" -> CKA),
    `best_layer_alignments` (l1 -> the l2 of highest CKA and its score), `diagonal_cka` (same
    layer on both sides), `mean_diagonal_cka`; with both sides' directions ({layer: vector} at the
    CKA's position) `direction_similarities` (layer -> cosine, at the layers both have) and
    `mean_direction_similarity`; then `cka_statistics` (mean, std with ddof 0, min, max, median)
    over the matrix. Layers are string keys; a CKA that is NaN (a layer that does not vary over the
    inputs) is null and left out of the best alignments, means and statistics."""
    import numpy as np
    import polars as pl

    rows = cka.sort("layer_a", "layer_b")
    out: dict = {"cka_matrix": {f"{r['layer_a']},{r['layer_b']}": _num(r["cka"])
                                for r in rows.iter_rows(named=True)}}  # fmt: skip
    best = {}
    for la in rows["layer_a"].unique(maintain_order=True).to_list():
        part = rows.filter((pl.col("layer_a") == la) & pl.col("cka").is_not_nan())
        if part.height:
            i = int(np.argmax(part["cka"].to_numpy()))
            best[str(la)] = {"aligned_layer": int(part["layer_b"][i]),
                             "cka_score": float(part["cka"][i])}  # fmt: skip
        else:
            best[str(la)] = {"aligned_layer": None, "cka_score": None}
    out["best_layer_alignments"] = best
    diag = rows.filter(pl.col("layer_a") == pl.col("layer_b"))
    out["diagonal_cka"] = {str(la): _num(v) for la, v in diag.select("layer_a", "cka").iter_rows()}
    finite = [v for v in out["diagonal_cka"].values() if v is not None]
    out["mean_diagonal_cka"] = float(np.mean(finite)) if finite else None
    if directions_a and directions_b:
        sims = {}
        for layer in sorted(set(directions_a) & set(directions_b)):
            a = np.asarray(directions_a[layer], dtype=np.float64)
            b = np.asarray(directions_b[layer], dtype=np.float64)
            norms = np.linalg.norm(a) * np.linalg.norm(b)
            if a.shape == b.shape and norms > 0:
                sims[str(layer)] = float(a @ b / norms)
        if sims:
            out["direction_similarities"] = sims
            out["mean_direction_similarity"] = float(np.mean(list(sims.values())))
    values = np.array([v for v in out["cka_matrix"].values() if v is not None], dtype=np.float64)
    stats = ("mean", "std", "min", "max", "median")
    out["cka_statistics"] = (
        {k: float(getattr(np, k)(values)) for k in stats} if values.size else dict.fromkeys(stats)
    )
    return out


def seed001_directions(pt_path, position: str) -> dict[int, object]:
    """Each layer's candidate direction at `position` from a `directions` job's
    `reasoning_directions.pt` ({layer: float64 array}; empty where that position was not a
    candidate)."""
    import torch

    saved = torch.load(pt_path, map_location="cpu", weights_only=True)
    raw = saved["raw"].double().numpy()
    return {int(layer): raw[i] for i, (p, layer) in enumerate(zip(saved["positions"], saved["layers"], strict=True))
            if p == position}  # fmt: skip


def export_seed001_alignment(table_path, out_path, directions: list | None = None) -> dict:
    """Write a CKA pair's `alignment_results.json` from its `cka` table and, with
    `directions` ([side a's, side b's] `reasoning_directions.pt`), the directions' cosines at the
    CKA's position."""
    import polars as pl

    cka = pl.read_parquet(table_path)
    dirs: tuple = (None, None)
    if directions and cka.height:
        a, b = directions
        position = cka["position"][0]
        dirs = (seed001_directions(a, position), seed001_directions(b, position))
    got = seed001_alignment(cka, *dirs)
    write_texts({out_path: json.dumps(got, indent=2) + "\n"})
    return got


# ------------------------------------------------------------------------------ seed 002


def qcut_codes(values, q: int = 10) -> list[int | None]:
    """pandas' `qcut(values, q, labels=False, duplicates="drop")` (pandas 3), without pandas: each
    value's quantile bin 0..q-1 (fewer bins where edges coincide), None for NaN or where no bin is
    left (every value equal)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    codes = np.full(x.shape, -1, dtype=np.int64)
    finite = ~np.isnan(x)
    if finite.any():
        qs = np.linspace(0, 1, q + 1)
        # pandas rounds a quantile that base 2 cannot hold exactly upwards
        qs = np.where(q * qs != np.arange(q + 1), np.nextafter(qs, 1), qs)
        edges = np.quantile(x[finite], qs)
        if len(np.unique(edges)) < len(edges) and len(edges) != 2:
            edges = np.unique(edges)
        ids = np.searchsorted(edges, x, side="left")  # bins closed on the right
        ids[x == edges[0]] = 1  # the lowest edge belongs to the first bin
        ok = finite & (ids > 0) & (ids < len(edges))
        codes[ok] = ids[ok] - 1
    return [int(c) if c >= 0 else None for c in codes]


def _first_sample(generations):
    import polars as pl

    return generations.filter(pl.col("sample") == 0)


def seed002_tokens(tokens, generations, first_inputs: dict[str, str],
                   prompt_index: dict[str, int]):  # fmt: skip
    """One checkpoint's own generations on a dataset as seed 002's per-token rows
    (SEED002_TOKEN_COLUMNS + `prompt_index`, by prompt and step). `tokens` is the score table of the
    text set `<dataset>@<model>@<ckpt>` under that checkpoint, `generations` its graded generations
    (the first sample of each prompt is used), `first_inputs` the text of the token the first step
    reads (the prompt's last token) by generation id, `prompt_index` each generation id's prompt
    number. Only generated tokens are kept: not prompt rows (score.scope all) nor an appended
    end-of-sequence token (score.append_eos). `current_token` is the token at the input position,
    `next_token` the generated token whose distribution's entropy (nats) `entropy` is."""
    import polars as pl

    multi = bool(generations.height) and generations["sample"].max() > 0
    first = _first_sample(generations)
    gen = pl.DataFrame({
        "id": [f"{i}#0" for i in first["id"]] if multi else first["id"].to_list(),
        "n": first["token_ids"].list.len().to_list(),
        "prompt_index": [prompt_index[i] for i in first["id"]],
        "first": [first_inputs.get(i) for i in first["id"]],
    }, schema={"id": pl.String, "n": pl.Int64, "prompt_index": pl.Int64, "first": pl.String})  # fmt: skip
    rows = (
        tokens.filter(~pl.col("is_prompt"))
        .join(gen, on="id", how="inner")
        .filter(pl.col("position") <= pl.col("n"))
    )
    before = rows.select("id", pl.col("position") + 1, previous=pl.col("token"))
    rows = rows.join(before, on=["id", "position"], how="left")
    return rows.sort("prompt_index", "position").select(
        current_token=pl.when(pl.col("position") == 1).then("first").otherwise("previous"),
        next_token=pl.col("token"),
        entropy=pl.col("entropy"),
        probability_of_next_token=pl.col("logprob").exp(),
        generation_step=pl.col("position"),
        prompt_index=pl.col("prompt_index"),
    )


def seed002_files(runs: dict[str, dict], max_new_tokens: int | None) -> dict:
    """Seed 002's files of one dataset (`model_comparison_analysis.py`). `runs`: model name ->
    {"tokens", "generations", "first_inputs"} (see `seed002_tokens`) and "path" (the checkpoint's
    directory or hub id), in the seed's model order. Prompts are numbered in the order their
    generations first appear (the dataset's). Returns {"detailed": {name: frame}, "token_stats":
    {name: frame with `entropy_qcut` over all that model's rows}, "prompt_level": frame,
    "summary": dict}. Standard deviations are pandas' (ddof 1); a statistic of no value is null."""
    import polars as pl

    index: dict[str, int] = {}
    prompts: list[str] = []
    for r in runs.values():
        for gid, prompt in _first_sample(r["generations"]).select("id", "prompt").iter_rows():
            if gid not in index:
                index[gid] = len(index)
                prompts.append(prompt or "")
    detailed = {name: seed002_tokens(r["tokens"], r["generations"], r["first_inputs"], index)
                for name, r in runs.items()}  # fmt: skip
    token_stats = {
        name: d.drop("prompt_index").with_columns(
            entropy_qcut=pl.Series(qcut_codes(d["entropy"].to_numpy()), dtype=pl.Int64)
        )
        for name, d in detailed.items()
    }
    level = pl.DataFrame(
        {"prompt_index": range(len(prompts)), "prompt": [p[:1000] for p in prompts]},
        schema={"prompt_index": pl.Int64, "prompt": pl.String},
    )
    summary: dict = {"model_paths": {name: r["path"] for name, r in runs.items()},
                     "num_examples_processed": len(prompts), "max_new_tokens": max_new_tokens}  # fmt: skip
    for name, r in runs.items():
        first = _first_sample(r["generations"])
        texts = pl.DataFrame(
            {"prompt_index": [index[i] for i in first["id"]], "text": first["completion"]},
            schema={"prompt_index": pl.Int64, "text": pl.String},
        )
        e = pl.col("entropy")
        per = detailed[name].group_by("prompt_index").agg(
            num_tokens=pl.len().cast(pl.Int64), mean_entropy=e.mean(), std_entropy=e.std(),
            median_entropy=e.median(),
        )  # fmt: skip
        part = texts.join(per, on="prompt_index", how="left").with_columns(
            pl.col("num_tokens").fill_null(0), pl.col("^.*_entropy$").fill_nan(None)
        )
        level = level.join(
            part.rename(lambda c, n=name: c if c == "prompt_index" else f"{n}_{c}"),
            on="prompt_index", how="left", maintain_order="left",
        )  # fmt: skip
        ent = detailed[name]["entropy"]
        summary[f"{name}_total_tokens"] = ent.len()
        for stat in ("mean", "std", "median", "min", "max"):
            summary[f"{name}_{stat}_entropy"] = _num(getattr(ent, stat)()) if ent.len() else None
    return {"detailed": detailed, "token_stats": token_stats, "prompt_level": level,
            "summary": summary}  # fmt: skip


def first_inputs(handle, generations) -> dict[str, str]:
    """Generation id -> the text of the token a generation's first step reads: the prompt's last
    token (an encoder–decoder's: the decoder start token), decoded alone as the scorer decodes
    tokens."""
    from reasonlab.models import load_config, load_tokenizer

    first = _first_sample(generations)
    config = load_config(handle)
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None)
        ids = [start] * first.height
    else:
        ids = [p[-1] if p is not None and len(p) else None for p in first["prompt_ids"]]
    known = sorted({i for i in ids if i is not None})
    if not known:
        return {}
    texts = load_tokenizer(handle).batch_decode(
        [[i] for i in known], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    text_of = dict(zip(known, texts, strict=True))
    return {gid: text_of[i] for gid, i in zip(first["id"], ids, strict=True) if i is not None}


def export_seed002(names: list[str], tokens_paths: list[str], generation_paths: list[str],
                   handle_paths: list[str], max_new_tokens: int | None, out_dir) -> dict:  # fmt: skip
    """Write seed 002's files of one dataset to `out_dir`: `names` are the seed's model names,
    aligned with each checkpoint's own scored generations (`tokens_paths`), graded generations
    and handle. Returns the summary."""
    import polars as pl

    from reasonlab.models import read_handle

    runs = {}
    for name, tp, gp, hp in zip(names, tokens_paths, generation_paths, handle_paths, strict=True):
        h = read_handle(hp)
        gens = pl.read_parquet(gp, columns=list(GENERATION_COLUMNS))
        runs[name] = {"tokens": pl.read_parquet(tp), "generations": gens,
                      "first_inputs": first_inputs(h, gens), "path": h.location}  # fmt: skip
    files = seed002_files(runs, max_new_tokens)
    out = Path(out_dir)
    texts = {}
    for name in names:
        texts[out / f"{name}_token_stats.csv"] = files["token_stats"][name].write_csv()
        texts[out / f"{name}_all_tokens_detailed.csv"] = files["detailed"][name].write_csv()
    texts[out / "prompt_level_results.csv"] = files["prompt_level"].write_csv()
    texts[out / "results_summary.json"] = json.dumps(files["summary"], indent=2) + "\n"
    write_texts(texts)
    return files["summary"]


# ------------------------------------------------------------------------------ seed 003


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
        write_texts({path: json.dumps(seed003_dynamics(by_type, ckpts, model, textset), indent=1)})
