"""Activation patching from clean into corrupted prompts (seed 001 calls it "path patching").

A pair is two rows of a dataset that share a `pair` value and have `role` clean and corrupted: the
same problem with one number changed (the demo's `pairs.jsonl`). Each run reads a context — the
prompt rendered as generation renders it, then (context "trace") the row's reference solution up
to its final answer — and the metric of a run is

    log p(clean answer | context) - log p(corrupted answer | context),

each answer's whole token sequence teacher-forced after the context. The corrupted run is patched
with the clean run's residual stream at one site (0 = layer 0's input … L = the last layer's
output) and one position group or token, and the result is normalised per pair set as

    (metric_patched - metric_corrupted) / (metric_clean - metric_corrupted)

(means over pairs: 0 = the corrupted run, 1 = the clean run). Clean and corrupted contexts must
have the same number of tokens (a pair that does not is recorded as skipped). Position groups:
`changed` (tokens that differ between the two prompts), `prompt` (the prompt's other tokens),
`trace changed`, `trace` (the trace's tokens, those that differ and the others) and `last` (the
context's last token, which predicts the answer). The first `token_pairs` pairs are also patched
one token at a time.

This is activation patching of the residual stream (a node, not an edge, of the computational
graph): path patching proper restricts the effect to chosen paths between components.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from reasonlab import ReasonlabError

log = logging.getLogger(__name__)

GROUPS = ("changed", "prompt", "trace changed", "trace", "last")


class PatchingError(ReasonlabError):
    """Bad pairs data or options for a patching experiment."""


@dataclass
class Pair:
    """One clean/corrupted pair, tokenized: context ids (equal lengths), answer ids, the prompt's
    length in tokens and each context position's group."""

    pair: str
    clean_id: str
    corrupted_id: str
    clean: list[int]
    corrupted: list[int]
    clean_answer: list[int]
    corrupted_answer: list[int]
    prompt_len: int
    groups: list[str]


def pair_rows(data, where: str = "") -> list[tuple[str, dict, dict]]:
    """(pair, clean row, corrupted row) in the order pairs first appear; `pair` and `role` are read
    from the rows' own fields (the prepared table's `meta`). One error naming the row or pair when a
    row lacks them, a role is not clean/corrupted, or a pair has not exactly one of each."""
    pairs: dict[str, dict] = {}
    for r in data.to_dicts():
        meta = json.loads(r.get("meta") or "{}")
        if "pair" not in meta or "role" not in meta:
            raise PatchingError(
                f"{where}: row {r['id']!r} has no `pair` and `role` fields; a patching dataset's "
                "rows carry pair (shared by a clean and a corrupted row) and role (clean or "
                "corrupted)"
            )
        role = str(meta["role"])
        if role not in ("clean", "corrupted"):
            raise PatchingError(
                f"{where}: row {r['id']!r} has role {role!r}; expected clean or corrupted"
            )
        key = str(meta["pair"])
        slot = pairs.setdefault(key, {})
        if role in slot:
            raise PatchingError(f"{where}: pair {key!r} has two {role} rows "
                                f"({slot[role]['id']!r}, {r['id']!r})")  # fmt: skip
        slot[role] = r
    out = []
    for k, slot in pairs.items():
        if len(slot) != 2:
            raise PatchingError(
                f"{where}: pair {k!r} has only a {next(iter(slot))} row; each pair needs both"
            )
        out.append((k, slot["clean"], slot["corrupted"]))
    return out


def trace_prefix(solution: str | None, answer: str) -> str | None:
    """The reference solution up to its final answer: before the last \\boxed{…}'s content, else
    before the answer's last occurrence; None when neither is found."""
    if not solution:
        return None
    i = solution.rfind("\\boxed{")
    if i >= 0:
        return solution[: i + len("\\boxed{")]
    j = solution.rfind(answer)
    return solution[:j] if j >= 0 else None


def tokenize_pair(tok, key: str, clean: dict, corrupted: dict, prompts: tuple[str, str],
                  context: str) -> Pair | str:  # fmt: skip
    """A `Pair`, or why the pair is skipped (a string)."""
    ctx, ans = [], []
    for row, prompt in ((clean, prompts[0]), (corrupted, prompts[1])):
        answer = row.get("reference")
        if not answer:
            return f"row {row['id']!r} has no reference answer"
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        n_prompt = len(ids)
        if context == "trace":
            prefix = trace_prefix(row.get("solution"), answer)
            if prefix is None:
                return f"row {row['id']!r}: its solution does not contain its answer {answer!r}"
            ids = ids + tok(prefix, add_special_tokens=False)["input_ids"]
        ctx.append((ids, n_prompt))
        ans.append(tok(answer, add_special_tokens=False)["input_ids"])
    (c, pc), (x, px) = ctx
    if len(c) != len(x) or pc != px:
        return f"the contexts have different token counts (clean {len(c)}, corrupted {len(x)})"
    if ans[0] == ans[1]:
        return "the two answers are the same tokens"
    groups = []
    for i, (a, b) in enumerate(zip(c, x, strict=True)):
        if i == len(c) - 1:
            groups.append("last")
        elif i < pc:
            groups.append("changed" if a != b else "prompt")
        else:
            groups.append("trace changed" if a != b else "trace")
    return Pair(key, clean["id"], corrupted["id"], c, x, ans[0], ans[1], pc, groups)


def answer_logprobs(model, rows: list[tuple[list[int], list[int]]], pad: int, patcher=None):
    """Per row (context ids, answer ids): the summed log-probability of the answer teacher-forced
    after the context (float64), one forward pass, right padding (context positions keep their
    indices, so a `PathPatcher` mask over them lines up), under `patcher` when given."""
    import contextlib

    import torch

    from reasonlab.activations import pad_batch
    from reasonlab.models import input_device

    seqs = [c + a for c, a in rows]
    ids, mask, _ = pad_batch(seqs, pad, "right", input_device(model))
    n_ctx = min(len(c) for c, _ in rows)
    keep = ids.shape[1] - n_ctx + 1  # logits from the last context position on
    with patcher or contextlib.nullcontext(), torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False,
                       logits_to_keep=keep).logits  # fmt: skip
    logp = torch.log_softmax(logits.float(), -1)
    out = []
    for r, (c, a) in enumerate(rows):
        start = len(c) - 1 - (ids.shape[1] - keep)  # the position predicting a[0], in `logits`
        idx = torch.arange(start, start + len(a), device=logp.device)
        target = torch.tensor(a, device=logp.device)
        out.append(float(logp[r, idx, target].double().sum()))
    return out


def run_metric(model, ctx: list[int], p: Pair, pad: int, patcher=None, rows: int = 1) -> list:
    """The metric (clean answer minus corrupted answer) of `rows` copies of one context."""
    lp = answer_logprobs(model, [(ctx, p.clean_answer)] * rows + [(ctx, p.corrupted_answer)] * rows,
                         pad, patcher)  # fmt: skip
    return [a - b for a, b in zip(lp[:rows], lp[rows:], strict=True)]


def patch_pair(model, p: Pair, sites: list[int], pad: int, tokens: bool, batch_size: int = 64):
    """(clean metric, corrupted metric, group rows, token rows) of one pair: the corrupted run
    patched with the clean run's residual at every site x position group (and, when `tokens`,
    every site x context token)."""
    import torch

    from reasonlab.intervene import PathPatcher, record_residuals
    from reasonlab.models import input_device

    dev = input_device(model)
    m_clean = run_metric(model, p.clean, p, pad)[0]
    m_corr = run_metric(model, p.corrupted, p, pad)[0]
    ids = torch.tensor([p.clean], device=dev)
    source = record_residuals(model, ids, torch.ones_like(ids), sites)
    n = len(p.corrupted)
    present = [g for g in GROUPS if g in p.groups]
    masks = {g: torch.tensor([x == g for x in p.groups]) for g in present}
    if tokens:
        for i in range(n):
            masks[i] = torch.arange(n) == i
    keys = list(masks)
    group_rows, token_rows = [], []
    for site in sites:
        for s in range(0, len(keys), max(1, batch_size // 2)):
            chunk = keys[s : s + max(1, batch_size // 2)]
            m = torch.stack([masks[k] for k in chunk])
            patcher = PathPatcher(model, {site: source[site]}, [site], torch.cat([m, m]))
            got = run_metric(model, p.corrupted, p, pad, patcher, rows=len(chunk))
            for k, v in zip(chunk, got, strict=True):
                row = {"pair": p.pair, "site": site, "metric": v,
                       "normalised": (v - m_corr) / (m_clean - m_corr) if m_clean != m_corr else None}  # fmt: skip
                if isinstance(k, str):
                    group_rows.append({**row, "group": k, "n_positions": int(masks[k].sum())})
                else:
                    token_rows.append({**row, "position": k, "group": p.groups[k]})
    return m_clean, m_corr, group_rows, token_rows


def summarize(pairs, groups) -> list[dict]:
    """Per site x group: the normalised effect over the pairs (ratio of means: (mean patched - mean
    corrupted) / (mean clean - mean corrupted)) and the number of pairs."""
    import polars as pl

    ok = pairs.filter(pl.col("status") == "ok").select("pair", "clean_metric", "corrupted_metric")
    g = groups.join(ok, on="pair")
    out = (
        g.group_by("site", "group")
        .agg(
            n_pairs=pl.len(),
            metric=pl.col("metric").mean(),
            clean=pl.col("clean_metric").mean(),
            corrupted=pl.col("corrupted_metric").mean(),
        )
        .with_columns(
            effect=(pl.col("metric") - pl.col("corrupted"))
            / (pl.col("clean") - pl.col("corrupted"))
        )
        .sort("site", "group")
    )
    return out.to_dicts()


def patch_job(handle_path, data_path, settings: dict, out_prefix: str, batch_size: int = 64,
              threads=None, compute=None, record_path=None, progress: bool = True) -> dict:  # fmt: skip
    """One `patch` job: every usable pair of the dataset (up to `max_pairs`) patched at every site
    under one checkpoint; writes `{out_prefix}.groups.parquet` (pair x site x position group),
    `.tokens.parquet` (the first `token_pairs` pairs x site x token) and `.pairs.parquet` (each
    pair's clean and corrupted metric, or why it was skipped)."""
    import polars as pl
    import torch

    from reasonlab import compute as cp
    from reasonlab.activations import decoder_parts, pad_id
    from reasonlab.data import read_dataset
    from reasonlab.generate import GenOptions, render_prompts
    from reasonlab.models import load_placed, read_handle

    if threads:
        torch.set_num_threads(threads)
    h = read_handle(handle_path)
    where = f"interventions.patching.dataset ({data_path})"
    rows = pair_rows(read_dataset(data_path), where)
    machine, placement, model, tok = load_placed(h, compute, f"{h.model}/{h.ckpt} patching")
    opts = GenOptions(backend="transformers", template=settings.get("template") or "chat",
                      system=settings.get("system"))  # fmt: skip
    sites = list(range(decoder_parts(model).n_layers + 1))
    pad = pad_id(tok)
    context = settings.get("context", "trace")
    max_pairs = settings.get("max_pairs")
    token_pairs = int(settings.get("token_pairs", 4))
    pairs_out, groups_out, tokens_out = [], [], []
    t0 = time.perf_counter()
    used = 0
    it = rows
    if progress:
        from tqdm import tqdm

        it = tqdm(rows, desc="patching pairs", unit="pair")
    for key, clean, corrupted in it:
        if max_pairs and used >= max_pairs:
            break
        prompts = render_prompts([clean, corrupted], tok, opts)
        p = tokenize_pair(tok, key, clean, corrupted, tuple(prompts), context)
        base = {"pair": key, "clean_id": clean["id"], "corrupted_id": corrupted["id"]}
        if isinstance(p, str):
            pairs_out.append({**base, "status": f"skipped: {p}", "n_tokens": None,
                              "clean_metric": None, "corrupted_metric": None})  # fmt: skip
            continue
        m_clean, m_corr, g, t = patch_pair(model, p, sites, pad, used < token_pairs, batch_size)
        used += 1
        pairs_out.append({**base, "status": "ok", "n_tokens": len(p.clean),
                          "clean_metric": m_clean, "corrupted_metric": m_corr})  # fmt: skip
        groups_out += g
        for r in t:
            r["token"] = tok.decode([p.corrupted[r["position"]]])
            r["clean_token"] = tok.decode([p.clean[r["position"]]])
        tokens_out += t
    if not used:
        raise PatchingError(
            f"{where}: no usable pair ({len(pairs_out)} skipped; first reason: "
            f"{pairs_out[0]['status'] if pairs_out else 'the dataset has no pairs'})"
        )
    pairs_df = pl.DataFrame(pairs_out, schema={
        "pair": pl.String, "clean_id": pl.String, "corrupted_id": pl.String, "status": pl.String,
        "n_tokens": pl.Int64, "clean_metric": pl.Float64, "corrupted_metric": pl.Float64})  # fmt: skip
    group_schema = {"pair": pl.String, "site": pl.Int64, "metric": pl.Float64,
                    "normalised": pl.Float64, "group": pl.String, "n_positions": pl.Int64}  # fmt: skip
    token_schema = {"pair": pl.String, "site": pl.Int64, "metric": pl.Float64,
                    "normalised": pl.Float64, "position": pl.Int64, "group": pl.String,
                    "token": pl.String, "clean_token": pl.String}  # fmt: skip
    groups_df = pl.DataFrame(groups_out, schema=group_schema)
    tokens_df = pl.DataFrame(tokens_out, schema=token_schema)
    seconds = time.perf_counter() - t0
    pairs_df.write_parquet(f"{out_prefix}.pairs.parquet")
    tokens_df.write_parquet(f"{out_prefix}.tokens.parquet")
    groups_df.write_parquet(f"{out_prefix}.groups.parquet")
    rec = cp.record(placement, machine, "patch", model=h.model, ckpt=h.ckpt,
                    seconds=round(seconds, 2), pairs=used)  # fmt: skip
    cp.write_record(rec, record_path)
    summary = summarize(pairs_df, groups_df)
    log.info("patching %s/%s: %d pairs (%d skipped), %.1f s; effect at the last site: %s",
             h.model, h.ckpt, used, len(pairs_out) - used, seconds,
             {r["group"]: round(r["effect"], 3) for r in summary if r["site"] == sites[-1]})  # fmt: skip
    return {"pairs": used, "summary": summary, "seconds": seconds}
