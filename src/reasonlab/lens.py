"""Logit lens (seed 001's `LogitLens`): each layer's residual stream read through the model's own
final norm and output head (and final logit soft-capping, where the architecture has it).

For a text whose reference answer appears in its completion, the lens looks at the position that
predicts the answer's first token: per layer, that token's rank (1 = the lens's top token) and
probability, and the lens's top tokens. At the last site (`resid_final`, the last layer's output
before the final norm) the lens is the model's own next-token distribution: tested equal to its
logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from reasonlab import ReasonlabError
from reasonlab.activations import (
    Text,
    check_layers,
    decoder_parts,
    forward_sites,
    pad_batch,
    pad_id,
    site_name,
)


class LensError(ReasonlabError):
    """A text the lens cannot read (no answer in its completion)."""


@dataclass
class LensText:
    """A prefix ending just before the answer's first token, and that token."""

    id: str
    ids: list[int]  # the prefix: prompt and the completion up to the answer
    target: int  # the answer's first token id
    labels: dict


def answer_prefixes(
    texts: list[Text], answers: list[str | None], tokenizer
) -> tuple[list[LensText], list[str]]:
    """For each text with a reference answer found in its completion: the prefix up to the answer's
    last occurrence (the final answer) and the answer's first token, tokenized as the completion
    was. Returns (lens texts, ids of texts skipped because their answer is not in the completion)."""
    out, skipped = [], []
    for t, answer in zip(texts, answers, strict=True):
        completion_ids = t.ids[t.n_prompt :]
        text = tokenizer.decode(completion_ids)
        at = text.rfind(answer) if answer else -1
        if at < 0:
            skipped.append(t.id)
            continue
        # the completion's tokens whose decoded text ends at or before the answer's start
        k = 0
        while k < len(completion_ids) and len(tokenizer.decode(completion_ids[: k + 1])) <= at:
            k += 1
        if k == len(completion_ids):
            skipped.append(t.id)
            continue
        out.append(LensText(t.id, t.ids[: t.n_prompt + k], completion_ids[k], t.labels))
    return out, skipped


def _head_parts(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return head, softcap


def lens_logits(model, parts, residual):
    """The lens's logits of residual vectors [..., hidden]: final norm, output head, soft-capping."""
    import torch

    head, softcap = _head_parts(model)
    logits = head(parts.norm(residual.to(head.weight.device))).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def logit_lens(model, tokenizer, texts: list[LensText], layers="all", top_k: int = 5,
               batch_size: int = 8) -> list[dict]:  # fmt: skip
    """One row per text × layer: `site`, the answer token's `rank` and `prob` under the lens, and
    its `top_ids`/`top_tokens`/`top_probs`. The vocabulary-wide logits are held for one layer of one
    batch at a time."""
    import torch

    from reasonlab.models import input_device

    parts = decoder_parts(model)
    n = parts.n_layers
    layers = check_layers(layers, n, "lens.layers")
    pad = pad_id(tokenizer)
    dev = input_device(model)
    rows = []
    for s in range(0, len(texts), batch_size):
        batch = texts[s : s + batch_size]
        # left padding: the predicting position is the last column
        ids, mask, _ = pad_batch([t.ids for t in batch], pad, "left", dev)
        got = forward_sites(model, parts, ids, mask, layers)
        targets = torch.tensor([t.target for t in batch])
        for layer in layers:
            with torch.inference_mode():
                logits = lens_logits(model, parts, got[layer][:, -1]).cpu()
            logp = torch.log_softmax(logits, -1)
            tgt = logp.gather(1, targets[:, None])[:, 0]
            rank = (logp > tgt[:, None]).sum(-1) + 1
            top = logp.topk(min(top_k, logp.shape[-1]), -1)
            for i, t in enumerate(batch):
                ids_i = top.indices[i].tolist()
                rows.append({
                    "id": t.id, "layer": layer, "site": site_name(layer, n),
                    "target_id": t.target, "target_token": tokenizer.decode([t.target]),
                    "rank": int(rank[i]), "prob": float(tgt[i].exp()),
                    "top_ids": ids_i, "top_tokens": [tokenizer.decode([j]) for j in ids_i],
                    "top_probs": top.values[i].exp().tolist(),
                    **{k: t.labels.get(k) for k in ("set", "type", "level", "correct")},
                })  # fmt: skip
    return rows


def lens_dataset(handle, dataset: str, out_table: str, name: str = "", template: str = "chat",
                 system: str | None = None, layers="all", top_k: int = 5, max_texts: int | None = 64,
                 threads: int | None = None, compute=None, record_path=None) -> dict:  # fmt: skip
    """One `lens` job: a prepared dataset's prompts with their reference solutions, the lens at the
    position predicting the reference answer's first token, every layer. Rows whose answer is not
    in the solution are recorded in the table's `skipped` count, never silently dropped."""
    import time

    import polars as pl
    import torch

    from reasonlab import compute as cp
    from reasonlab.activations import dataset_texts
    from reasonlab.data import read_dataset
    from reasonlab.models import load_placed, read_handle

    if threads:
        torch.set_num_threads(threads)
    h = read_handle(handle)
    where = f"{h.model}/{h.ckpt} {name}"
    machine, placement, model, tok = load_placed(h, compute, where)
    df = read_dataset(dataset)
    df = df.filter(pl.col("solution").is_not_null() & pl.col("reference").is_not_null())[
        : max_texts or None
    ]
    if df.height == 0:
        raise LensError(
            f"lens.datasets: {name} has no row with both a solution and a reference answer"
        )
    prompts = dataset_texts(df, tok, template, system, name)
    texts = []
    for t, sol in zip(prompts, df["solution"].to_list(), strict=True):
        comp = tok(sol, add_special_tokens=False)["input_ids"]
        t.ids, t.n_prompt = t.ids + list(comp), len(t.ids)
        texts.append(t)
    lens_texts, skipped = answer_prefixes(texts, df["reference"].to_list(), tok)
    t0 = time.perf_counter()
    rows = logit_lens(model, tok, lens_texts, layers, top_k)
    out = pl.DataFrame(rows).with_columns(model=pl.lit(h.model), ckpt=pl.lit(h.ckpt), dataset=pl.lit(name),
                                          n_skipped=pl.lit(len(skipped)))  # fmt: skip
    out.write_parquet(out_table)
    rec = cp.record(placement, machine, "lens", model=h.model, ckpt=h.ckpt, item=name,
                    seconds=round(time.perf_counter() - t0, 2))  # fmt: skip
    cp.write_record(rec, record_path)
    return {"texts": len(lens_texts), "skipped": len(skipped)}
