"""Reasoning directions: difference of means between two labelled prompt sets per layer and
position, and the choice of the best candidate the way refusal_direction chooses its refusal
direction, adapted to reasoning.

A contrast has a positive side (e.g. reasoning prompts, or correct generations) and a negative side
(control prompts, incorrect generations), each a captured prompt set, optionally restricted to one
`type`. Each side is split into a training part (the means, accumulated in float64) and a held-out
part (the scores). For every candidate (position, layer):

- *induce*: the raw direction added at that layer (every position) on held-out negative prompts:
  the mean rise of the reasoning metric (> 0 passes);
- *bypass*: the direction ablated everywhere (`reasonlab.intervene.ablate_direction`) on held-out
  positive prompts: the mean change of the metric (the lower, the better);
- *KL*: the mean KL divergence of the next-token distribution at the last prompt token on held-out
  negative prompts, ablated against unablated (≤ `kl_max` passes: the ablation must not break the
  model on prompts that do not reason).

Candidates also must sit below `max_layer_fraction` of the depth; of those that pass, the lowest
bypass score wins. The reasoning metric is the log-odds that the first generated token is one of the
marker tokens (the first token of each marker string, e.g. `<think>`, "Step", "Let").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reasonlab import ReasonlabError
from reasonlab.intervene import kl_rows, log_odds, marker_ids
from reasonlab.options import speed


class DirectionError(ReasonlabError):
    """A contrast that cannot be computed (an empty side, no marker token)."""


@dataclass(frozen=True)
class DirectionOptions:
    markers: tuple[str, ...] = ("<think>", "Step", "Let")
    held_out: float = 0.2  # share of each side kept for the scores
    kl_max: float = 0.1
    max_layer_fraction: float = 0.8
    bootstrap: int = 1000  # resamples of the held-out prompts for the chosen candidate's intervals
    seed: int = 0
    max_held_out: int = 64  # held-out prompts per side scored (the scoring's cost)
    batch_size: int = speed(16)


def split_side(n: int, frac: float, seed: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of a side with n texts: a seeded split, at least one each."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    k = min(cap, max(1, int(round(frac * n)))) if n > 1 else 0
    return np.sort(order[k:]), np.sort(order[:k])


def side_mean(index, store, position: str, rows, chunk: int = 256) -> np.ndarray:
    """The float64 mean of a side's activations at one position rule, read in chunks of rows."""
    from reasonlab.activations import load

    total, n = None, 0
    for s in range(0, len(rows), chunk):
        x = load(index, store, position, rows=list(rows[s : s + chunk])).astype(np.float64)
        ok = ~np.isnan(x).reshape(len(x), -1).any(1)  # completion_mean of an empty completion
        part = x[ok].sum(0)
        total = part if total is None else total + part
        n += int(ok.sum())
    if not n:
        raise DirectionError(f"no texts with activations at {position}")
    return total / n


def last_token_logprobs(model, tokenizer, prompts: list[list[int]], batch_size: int = 16):
    """[prompts, vocab] float32 log-probabilities of the next token after each prompt."""
    import torch

    from reasonlab.activations import pad_batch, pad_id
    from reasonlab.models import input_device

    pad = pad_id(tokenizer)
    dev = input_device(model)
    out = []
    for s in range(0, len(prompts), batch_size):
        b = prompts[s : s + batch_size]
        # left padding: the next-token position is the last column
        ids, mask, _ = pad_batch(b, pad, "left", dev)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                           use_cache=False, logits_to_keep=1).logits[:, -1]  # fmt: skip
        out.append(torch.log_softmax(logits.float(), -1).cpu())
    return torch.cat(out)


def score_candidates(model, tokenizer, candidates: list[dict], pos_prompts, neg_prompts,
                     opts: DirectionOptions, n_layers: int, progress: bool = True) -> tuple[list[dict], dict]:  # fmt: skip
    """Score every candidate ({"position", "layer", "direction"}); returns (rows, per-prompt deltas
    of every candidate, for the bootstrap)."""
    import torch

    from reasonlab.intervene import ablate_direction, add_direction

    ids = marker_ids(tokenizer, opts.markers)
    base_neg = last_token_logprobs(model, tokenizer, neg_prompts, opts.batch_size)
    base_pos = log_odds(last_token_logprobs(model, tokenizer, pos_prompts, opts.batch_size), ids)
    base_neg_m = log_odds(base_neg, ids)
    rows, deltas = [], {}
    it = candidates
    if progress:
        from tqdm import tqdm

        it = tqdm(candidates, desc="direction candidates", unit="candidate")
    for c in it:
        d = torch.as_tensor(c["direction"], dtype=torch.float32)
        with add_direction(model, d, [c["layer"]]):
            induce = (
                log_odds(last_token_logprobs(model, tokenizer, neg_prompts, opts.batch_size), ids)
                - base_neg_m
            )
        with ablate_direction(model, d):
            bypass = (
                log_odds(last_token_logprobs(model, tokenizer, pos_prompts, opts.batch_size), ids)
                - base_pos
            )
            abl = last_token_logprobs(model, tokenizer, neg_prompts, opts.batch_size)
        kl = kl_rows(base_neg, abl)
        key = (c["position"], c["layer"])
        deltas[key] = {"induce": induce, "bypass": bypass, "kl": kl}
        reasons = []
        if kl.mean() > opts.kl_max:
            reasons.append("kl")
        if c["layer"] >= opts.max_layer_fraction * n_layers:
            reasons.append("depth")
        if induce.mean() <= 0:
            reasons.append("induce")
        rows.append({"position": c["position"], "layer": c["layer"], "norm": float(np.linalg.norm(c["direction"])),
                     "induce": float(induce.mean()), "bypass": float(bypass.mean()), "kl": float(kl.mean()),
                     "passes": not reasons, "filtered_by": ",".join(reasons) or None})  # fmt: skip
    return rows, deltas


def choose(rows: list[dict]) -> dict | None:
    """The passing candidate with the lowest bypass score (ties: earlier layer), or None."""
    ok = [r for r in rows if r["passes"]]
    return min(ok, key=lambda r: (r["bypass"], r["layer"], r["position"])) if ok else None


def bootstrap(values: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the mean of `values` over `n` resamples."""
    if len(values) == 0 or n <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _side(index_path: str, type_: str | None, key: str):
    import polars as pl

    df = pl.read_parquet(index_path)
    if type_ is not None:
        df = df.filter(pl.col("type") == type_)
    if df.height < 2:
        raise DirectionError(
            f"{key}: this side has {df.height} text(s)"
            + (f" of type {type_!r}" if type_ else "")
            + f" in {index_path}; a contrast needs at least 2 per side (capture more texts, or pick another side)"
        )
    return df


def candidate_directions(pos_df, neg_df, store, positions: list[str], layers: list[int],
                         pos_rows, neg_rows) -> list[dict]:  # fmt: skip
    """Difference of means (positive minus negative, float64, training rows only) for every
    position rule and layer; `prompt_tail:K` gives K candidates (offsets -K … -1)."""
    out = []
    for p in positions:
        diff = side_mean(pos_df, store, p, pos_rows) - side_mean(neg_df, store, p, neg_rows)
        if p.startswith("prompt_tail:"):
            k = int(p.split(":")[1])
            # the tail's last token is the last prompt token: one candidate, not two
            for j in range(k - 1 if "last_prompt" in positions else k):
                for li, layer in enumerate(layers):
                    out.append(
                        {"position": f"tail{j - k}", "layer": layer, "direction": diff[li, j]}
                    )
        else:
            for li, layer in enumerate(layers):
                out.append({"position": p, "layer": layer, "direction": diff[li]})
    return out


def compute_contrast(handle, pos_index: str, neg_index: str, meta_path: str, out_dir: str,
                     contrast: dict, name: str, options: dict | None = None,
                     threads: int | None = None, compute=None, record_path=None,
                     progress: bool = True) -> dict:  # fmt: skip
    """One `directions` job: a contrast's candidate directions for one checkpoint, scored and
    chosen; writes `candidates.parquet`, `chosen.json` and seed 001's `reasoning_directions.pt`."""
    import json
    import time
    from dataclasses import asdict
    from pathlib import Path

    import polars as pl
    import torch

    from reasonlab import compute as cp
    from reasonlab.activations import read_meta
    from reasonlab.models import load_placed, read_handle

    if threads:
        torch.set_num_threads(threads)
    opts = DirectionOptions(
        **{k: tuple(v) if k == "markers" else v for k, v in (options or {}).items()}
    )
    key = f"directions.contrasts.{name}"
    pos_df = _side(pos_index, contrast.get("positive_type"), f"{key}.positive")
    neg_df = _side(neg_index, contrast.get("negative_type"), f"{key}.negative")
    meta = read_meta(meta_path)
    positions = [p for p in meta["positions"] if p != "completion_all"]
    if not any(p != "completion_mean" for p in positions):
        raise DirectionError(
            f"{key}: the captured positions {meta['positions']} hold no prompt position; add last_prompt or prompt_tail to activations.positions"
        )
    pos_train, pos_held = split_side(pos_df.height, opts.held_out, opts.seed, opts.max_held_out)
    neg_train, neg_held = split_side(neg_df.height, opts.held_out, opts.seed + 1, opts.max_held_out)
    h = read_handle(handle)
    where = f"{h.model}/{h.ckpt} {name}"
    machine, placement, model, tok = load_placed(h, compute, where)
    t0 = time.perf_counter()
    cands = candidate_directions(
        pos_df, neg_df, meta["store"], positions, meta["layers"], pos_train, neg_train
    )
    # completion means have no prompt counterpart to steer on: they are kept, not scored
    scored = [c for c in cands if c["position"] != "completion_mean"]
    pos_prompts = [list(pos_df["prompt_ids"][int(i)]) for i in pos_held]
    neg_prompts = [list(neg_df["prompt_ids"][int(i)]) for i in neg_held]
    rows, deltas = score_candidates(
        model, tok, scored, pos_prompts, neg_prompts, opts, meta["n_layers"], progress
    )
    best = choose(rows)
    chosen = None
    if best is not None:
        d = deltas[(best["position"], best["layer"])]
        chosen = best | {
            "site": f"resid_pre.{best['layer']}"
            if best["layer"] < meta["n_layers"]
            else "resid_final",
            "induce_ci": bootstrap(d["induce"], opts.bootstrap, opts.seed),
            "bypass_ci": bootstrap(d["bypass"], opts.bootstrap, opts.seed + 1),
            "kl_ci": bootstrap(d["kl"], opts.bootstrap, opts.seed + 2),
        }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_parquet(out / "candidates.parquet")
    info = {
        "model": h.model, "ckpt": h.ckpt, "content_hash": h.content_hash, "contrast": name,
        "spec": contrast, "options": asdict(opts), "n_layers": meta["n_layers"], "layers": meta["layers"],
        "positions": positions, "n_positive": pos_df.height, "n_negative": neg_df.height,
        "n_positive_held_out": len(pos_held), "n_negative_held_out": len(neg_held),
        "marker_ids": marker_ids(tok, opts.markers), "chosen": chosen,
        "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
    if chosen is None:
        info["note"] = "no candidate passed the filters (kl, depth, induce): see candidates.parquet"
    (out / "chosen.json").write_text(json.dumps(info, indent=2, default=float) + "\n")
    torch.save({
        "positions": [c["position"] for c in cands], "layers": [c["layer"] for c in cands],
        "raw": torch.tensor(np.stack([c["direction"] for c in cands])),
        "chosen": None if chosen is None else {
            "position": chosen["position"], "layer": chosen["layer"],
            "direction": torch.tensor(next(c["direction"] for c in cands
                                           if (c["position"], c["layer"]) == (chosen["position"], chosen["layer"]))),
        },
        "model": f"{h.model}/{h.ckpt}", "contrast": name,
    }, out / "reasoning_directions.pt")  # fmt: skip
    rec = cp.record(placement, machine, "directions", model=h.model, ckpt=h.ckpt, item=name,
                    seconds=info["seconds"])  # fmt: skip
    cp.write_record(rec, record_path)
    return info
