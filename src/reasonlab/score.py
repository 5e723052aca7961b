"""Teacher-forced scoring: exact per-token entropy, varentropy, log-likelihood and perplexity.

Given (prompt, completion) pairs and a causal LM, one forward pass per batch over prompt +
completion gives, for every scored token t (predicted from the positions before it):

- logprob / prob of the actual token, its rank (1 = the most likely token),
- entropy H = -Σ p log p over the full vocabulary, and varentropy Σ p (log p + H)²,
- the top-1 token and its probability, and the margin between the top two probabilities;

and for every text: n_tokens, llh_sum, llh_mean, perplexity = exp(-llh_mean) and entropy
mean/median/std/min/max. Only completion tokens are scored by default (`scope="completion"`);
`scope="all"` scores every token after the first.

How it stays fast and bounded: requests are sorted by length, longest first (an out-of-memory shows
up in the first batch), and batched by a padded-token budget rather than a fixed count; the model's
body runs once per batch, and the output head plus the statistics run only on the scored positions:
`head_stats` takes `head_positions` positions at a time over blocks of the vocabulary (at most
`chunk_elements` logits at once, never the whole [positions x vocabulary] matrix) with an online
softmax, and computes every statistic in one compiled pass per block (`compile_stats`; eager
PyTorch where compiling is not possible), in float32 whatever the model dtype. On a 151 936-token
vocabulary the statistics then cost a few percent over the head's matrix products
(benchmarks/score_vs_lmeval.py). Sizes left unset follow the device (`sized`): fixed on a CPU,
from the free memory on a GPU. There is no Python loop over tokens or the vocabulary's entries.
`compile=True` also runs the model body through `torch.compile` (the first batch pays about a
minute).

Tokenization boundary: the prompt and the completion are encoded separately and concatenated
(`boundary="separate"`, the default), as LlamaFactory builds training examples and as a generator
produces completion tokens after prompt tokens; `boundary="joint"` encodes prompt + completion as one
string and splits at the first token that ends after the prompt's last character. Where a token
would straddle the boundary the two differ, by several nats on a whole text. Generated texts can
pass their exact token ids instead (`prompt_ids`, `completion_ids`), which avoids re-tokenization
altogether; with the generator's own log-probabilities (`completion_logprobs`) the token table gains a
`gen_logprob` column and the text table `gen_llh_sum` and `max_abs_logprob_diff` — scored under the
checkpoint that generated them, the two must agree (vLLM in float32: within 1e-3).

Encoder–decoder models (`config.is_encoder_decoder`, e.g. T5): the prompt is the encoder's input
(encoded with the tokenizer's special tokens, T5's closing `</s>`, as generation encodes it) and the
completion's tokens are scored as the decoder's, teacher-forced on [decoder start token] +
completion[:-1]; every statistic is computed over those decoder positions, by the same output-head
path as for a decoder-only model, on the hidden states the head receives (after any scaling the
architecture applies, such as T5's d_model^-0.5). The encoder predicts no tokens, so `scope="all"`
and `boundary="joint"` (one token sequence split in two) are errors there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from reasonlab import ReasonlabError, textsets
from reasonlab.options import speed
from reasonlab.outputs import write_all

log = logging.getLogger(__name__)

TOKEN_COLUMNS = [
    "id", "position", "token_id", "token", "logprob", "prob", "entropy", "varentropy", "rank",
    "top1_id", "top1_token", "top1_prob", "margin", "is_prompt",
]  # fmt: skip
SEQUENCE_COLUMNS = [
    "id", "n_prompt_tokens", "n_tokens", "truncated", "llh_sum", "llh_mean", "perplexity",
    "entropy_mean", "entropy_median", "entropy_std", "entropy_min", "entropy_max",
]  # fmt: skip


class ScoreError(ReasonlabError):
    """A text cannot be scored as asked (too long, mismatched tokenizer, non-finite logits...)."""


@dataclass(frozen=True)
class ScoreOptions:
    """How to score. Fields made with `speed(...)` change only speed or memory, never a number in
    the tables (the workflow does not re-run finished jobs when they change)."""

    scope: str = (
        "completion"  # "completion": completion tokens only; "all": every token after the first
    )
    boundary: str = "separate"  # "separate" or "joint" (see the module docstring)
    max_length: int | None = None  # default: the model's max_position_embeddings
    truncation: str = "error"  # too long: "error", "left" (drop the prompt's start) or "right" (cut the completion's end)
    append_eos: bool = False  # score the end-of-sequence token after each completion
    # sizes (None: `sized` picks them: fixed on a CPU, from the free GPU memory on a GPU)
    token_budget: int | None = speed(None)  # padded tokens per batch (rows x longest row)
    max_batch: int = speed(64)  # rows per batch at most
    chunk_elements: int | None = speed(None)  # logits held at once (head_positions x vocab block)
    head_positions: int | None = speed(None)  # positions the output head runs on at once
    compile_stats: bool = speed(True)  # torch.compile the per-block statistics (seconds, once)
    compile: bool = speed(
        False
    )  # torch.compile the model body: ~25% faster on CPU after a ~1 min compile
    progress: bool = speed(True)


@dataclass
class TextItem:
    """One text to score: a prompt and a completion (as text, or as exact token ids)."""

    id: str
    prompt: str
    completion: str = ""
    completion_ids: Sequence[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    prompt_ids: Sequence[int] | None = None  # exact prompt tokens (a generator's), used as given
    completion_logprobs: Sequence[float | None] | None = (
        None  # the generator's, one per completion token
    )


# ------------------------------------------------------------------------------ the statistics


def token_stats(logits, targets) -> dict:
    """Per-row statistics of next-token distributions, computed in float32.

    `logits`: [N, V] (any float dtype); `targets`: [N] token ids. Returns a dict of [N] tensors:
    logprob, entropy, varentropy, rank, top1_id, top1_logprob, margin (top-1 minus top-2 probability).
    A logit of -inf is a token of probability 0; NaN or +inf is refused by the caller.
    """
    import torch

    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)
    lp = lf - lse
    p = lp.exp()
    plp = torch.where(p > 0, p * lp, torch.zeros((), dtype=lp.dtype))
    entropy = -plp.sum(-1)
    dev = torch.where(p > 0, lp + entropy[:, None], torch.zeros((), dtype=lp.dtype))
    varentropy = (p * dev * dev).sum(-1)
    tgt = lf.gather(-1, targets[:, None].long())
    rank = (lf > tgt).sum(-1) + 1
    top = lp.topk(2, dim=-1) if lp.shape[-1] > 1 else None
    top1_lp = top.values[:, 0] if top is not None else lp[:, 0]
    margin = top1_lp.exp() - top.values[:, 1].exp() if top is not None else torch.ones_like(top1_lp)
    return {
        "logprob": (tgt[:, 0] - lse[:, 0]),
        "entropy": entropy,
        "varentropy": varentropy.clamp_min(0.0),
        "rank": rank,
        "top1_id": top.indices[:, 0] if top is not None else torch.zeros_like(targets),
        "top1_logprob": top1_lp,
        "margin": margin,
    }


def head_stats(h, weight, targets, bias=None, softcap: float | None = None,
               vocab_block: int = 8192, compiled: bool = False) -> dict:  # fmt: skip
    """`token_stats` of the logits `h @ weight.T (+ bias)` without ever holding them all: the output
    head runs over blocks of `vocab_block` vocabulary rows, and an online (streaming) softmax
    combines the blocks. Per block, while its logits are in cache: the count of logits above the
    target's (for the rank), the block maximum, one fused softmax of the logits shifted by it, and
    two dot products giving the block's sums of e^x·x and e^x·x² (x = logit - maximum); the blocks'
    sums are then rescaled to the running maximum and added. Every statistic is in float32 whatever
    the model dtype, and the shift by the maximum keeps the varentropy of peaked distributions from
    cancelling (logits spread over 1e4 stay exact). The top two logits and the top-1 id come from
    each block's maximum, argmax and second largest; the target's logit from its own block.

    `compiled`: the per-block statistics as one `torch.compile`d function (one loop over each
    block's logits instead of several passes: on a CPU the statistics then cost about a tenth of
    the head's matrix products; compiling costs seconds once per process, and falls back to eager with a
    warning where it cannot run).

    Returns the keys of `token_stats`, plus `finite` ([N] bool): False for a row whose logits hold a
    NaN, +inf or -inf; the caller recomputes those rows from their materialized logits
    (`token_stats`, where -inf is probability 0 and NaN/+inf are refused). Rank and top-1 equal
    `token_stats`' on the materialized logits except at ties within the logits' rounding.
    """
    import torch
    import torch.nn.functional as F

    dev, f32 = h.device, torch.float32
    vocab = weight.shape[0]
    targets = targets.long()

    def logits_of(hh, v0, v1):
        out = F.linear(hh, weight[v0:v1], None if bias is None else bias[v0:v1]).float()
        return torch.tanh(out / softcap) * softcap if softcap else out

    # the target's logit, computed as the head computes it (the same matrix product over the same
    # rows: bitwise equal on the CPU), to count the logits above it
    ref = torch.diagonal(
        F.linear(h, weight[targets], None if bias is None else bias[targets])
    ).float()
    if softcap:
        ref = torch.tanh(ref / softcap) * softcap
    block_stats = _compiled_block_stats(dev) if compiled else _block_stats
    # per block, [8, n]: maximum, the sums of e^x, e^x·x, e^x·x² relative to it, the count of
    # logits above the target's, the block's argmax and second largest, and the logit of each
    # row's target column as that block sees it (valid in the target's own block)
    blocks = [
        block_stats(logits_of(h, v0, min(vocab, v0 + vocab_block)), ref, targets - v0)
        for v0 in range(0, vocab, vocab_block)
    ]
    sums = torch.stack(blocks, -1)
    tgt = sums[7].gather(1, (targets // vocab_block)[:, None])[:, 0]
    # the target itself is not above itself, where its logit rounded above `ref`
    above = sums[4].sum(-1) - (tgt > ref).to(f32)
    # the blocks' sums moved to the overall maximum m (x' = x + d, d <= 0), then added
    bmax, sb, s1b, s2b = sums[:4]
    m = bmax.amax(-1)
    d = bmax - m[:, None]
    a = torch.exp(d)
    keep = a > 0  # where e^d underflows a block adds nothing (and no inf·0)
    d = torch.where(keep, d, 0.0)
    s = (a * sb).sum(-1)
    s1 = torch.where(keep, a * (s1b + d * sb), 0.0).sum(-1)
    s2 = torch.where(keep, a * (s2b + 2 * d * s1b + d * d * sb), 0.0).sum(-1)
    log_s = torch.log(s)  # log-sum-exp = m + log_s: m is subtracted first (exact where close)
    mean = s1 / s
    win = bmax.argmax(-1)  # the block holding the largest logit
    top1_id = sums[5].gather(1, win[:, None])[:, 0].long() + win * vocab_block
    others = bmax.scatter(1, win[:, None], float("-inf")).amax(-1)
    second = torch.maximum(others, sums[6].gather(1, win[:, None])[:, 0])
    top1 = -log_s  # the top logit is m
    finite = torch.isfinite(m + log_s) & torch.isfinite(s1) & torch.isfinite(s2)
    return {
        "logprob": (tgt - m) - log_s,
        "entropy": log_s - mean,
        "varentropy": (s2 / s - mean * mean).clamp_min(0.0),
        "rank": above.long() + 1,
        "top1_id": top1_id,
        "top1_logprob": top1,
        "margin": top1.exp() - ((second - m) - log_s).exp(),
        "finite": finite & torch.isfinite(tgt) & torch.isfinite(second),
    }


def _block_stats(logits, ref, t):
    """One block's [maximum, sum of e^x, of e^x·x, of e^x·x², count of logits above `ref`, argmax,
    second largest, logit at column `t`] per row ([8, rows]), x = logit - maximum; in place on
    `logits`, with PyTorch's fused softmax for the exponentials. `t`: each row's target column in
    this block (outside [0, width) for a target in another block: that entry is then meaningless)."""
    import torch

    at_t = logits.gather(1, t.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
    above = torch.sub(logits, ref[:, None]).sign_().clamp_min_(0).sum(-1)
    bm, arg = logits.max(-1)
    second = logits.scatter(1, arg[:, None], float("-inf")).amax(-1)
    x = logits.sub_(bm[:, None])  # the block's own maximum is 0
    p = torch.softmax(x, -1)
    sb = 1.0 / p.amax(-1)  # the block's sum of e^x (its largest term is e^0 = 1)
    y = p.mul_(x)
    s1, s2 = sb * y.sum(-1), sb * torch.linalg.vecdot(y, x)
    return torch.stack([bm, sb, s1, s2, above, arg.to(sb.dtype), second, at_t])


def _block_stats_plain(logits, ref, t):
    """`_block_stats` written for the compiler: it fuses these into two loops per row (the maximum,
    then everything else; counts are kept in float32, which vectorizes better than int64)."""
    import torch

    at_t = logits.gather(1, t.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
    bm = logits.amax(-1, keepdim=True)
    x = logits - bm
    e = torch.exp(x)
    ex = e * x
    above = torch.where(logits > ref[:, None], 1.0, 0.0).sum(-1)
    # in the same loop: where the maximum is (its last column), how often, and the largest below it
    top = x == 0
    cols = torch.arange(x.shape[-1], device=x.device, dtype=torch.float32)
    arg = torch.where(top, cols, -1.0).amax(-1)
    ties = torch.where(top, 1.0, 0.0).sum(-1)
    below = torch.where(top, float("-inf"), x).amax(-1)
    second = bm[:, 0] + torch.where(ties > 1, 0.0, below)
    stats = [bm[:, 0], e.sum(-1), ex.sum(-1), (ex * x).sum(-1), above]
    return torch.stack([*stats, arg, second, at_t])


_COMPILED: dict = {}


def _compiled_block_stats(device):
    """`_block_stats_plain` through torch.compile (once per process and device type), or the eager
    `_block_stats` where compiling fails (no C++ compiler on the node, say), with one warning."""
    import torch

    key = torch.device(device).type
    if key not in _COMPILED:
        fn = torch.compile(_block_stats_plain, dynamic=True)

        def guarded(logits, ref, t):
            if _COMPILED[key] is not guarded:
                return _COMPILED[key](logits, ref, t)
            try:
                return fn(logits, ref, t)
            except Exception as e:  # the compiler's errors have no common base class
                log.warning("compiling the scoring statistics failed (%s); running them eagerly",
                            str(e).splitlines()[0][:200])  # fmt: skip
                _COMPILED[key] = _block_stats
                return _block_stats(logits, ref, t)

        _COMPILED[key] = guarded
    return _COMPILED[key]


# ------------------------------------------------------------------------------ encoding


@dataclass
class Encoded:
    id: str
    ids: list[int]
    n_prompt: int  # tokens before the first scored one (completion scope)
    truncated: bool = False


def encode(
    items: Sequence[TextItem],
    tokenizer,
    opts: ScoreOptions,
    max_length: int,
    prompt_special_tokens: bool = False,
) -> list[Encoded]:
    """Token ids of every item with the prompt/completion boundary, truncated by the policy.

    `prompt_special_tokens`: prompts given as text are encoded with the tokenizer's special tokens
    (an encoder–decoder model's encoder input, T5's closing `</s>`); otherwise without."""
    if opts.boundary not in ("separate", "joint"):
        raise ScoreError(f"boundary must be 'separate' or 'joint', not {opts.boundary!r}")
    eos = [tokenizer.eos_token_id] if opts.append_eos and tokenizer.eos_token_id is not None else []
    need = [i for i, it in enumerate(items) if it.prompt_ids is None]
    prompts: list[list[int] | None] = [
        None if it.prompt_ids is None else list(it.prompt_ids) for it in items
    ]
    if need:
        for i, p in zip(
            need,
            tokenizer([items[i].prompt for i in need], add_special_tokens=prompt_special_tokens)[
                "input_ids"
            ],
            strict=True,
        ):
            prompts[i] = list(p)
    # exact completion ids are used as given; otherwise the boundary policy decides
    exact = [it.completion_ids is not None for it in items]
    sep = [i for i in range(len(items)) if not exact[i] and opts.boundary == "separate"]
    joint = [i for i in range(len(items)) if not exact[i] and opts.boundary == "joint"]
    out: list[Encoded | None] = [None] * len(items)
    for i, it in enumerate(items):
        if exact[i]:
            c = list(it.completion_ids)
            out[i] = Encoded(it.id, prompts[i] + c + (eos if c else []), len(prompts[i]))
    if sep:
        comps = tokenizer([items[i].completion for i in sep], add_special_tokens=False)["input_ids"]
        for i, c in zip(sep, comps, strict=True):
            it = items[i]
            out[i] = Encoded(
                it.id, prompts[i] + list(c) + (eos if c or it.completion else []), len(prompts[i])
            )
    if joint:
        enc = tokenizer(
            [items[i].prompt + items[i].completion for i in joint],
            add_special_tokens=False,
            return_offsets_mapping=True,
        )
        for i, ids, offsets in zip(joint, enc["input_ids"], enc["offset_mapping"], strict=True):
            cut = len(items[i].prompt)
            n_prompt = next((k for k, (_, end) in enumerate(offsets) if end > cut), len(ids))
            out[i] = Encoded(
                items[i].id, list(ids) + (eos if n_prompt < len(ids) else []), n_prompt
            )
    for e in out:
        if len(e.ids) > max_length:
            if opts.truncation == "left" and e.n_prompt > len(e.ids) - max_length:
                drop = len(e.ids) - max_length
                e.ids, e.n_prompt, e.truncated = e.ids[drop:], e.n_prompt - drop, True
            elif opts.truncation == "right":
                e.ids, e.truncated = e.ids[:max_length], True
                e.n_prompt = min(e.n_prompt, max_length)
            else:
                raise ScoreError(
                    f"text {e.id!r}: {len(e.ids)} tokens exceed the limit of {max_length} "
                    f"(truncation={opts.truncation!r}); set score.truncation to 'left' or 'right', "
                    f"or score.max_length"
                )
    return out


CPU_SIZES = {"token_budget": 2048, "chunk_elements": 2**21, "head_positions": 1024}


def gpu_sizes(hidden: int, intermediate: int, elem_bytes: int, free_bytes: int) -> dict:
    """Batch sizes on a GPU from its free memory (after the model is loaded) and the model's shape.

    The rule: half the free memory holds the forward pass's activations, estimated per token as
    (6 x hidden + 3 x intermediate) values of the model's dtype (hidden states, residual, q/k/v and
    output, the MLP's gate/up/down; with no KV cache a layer's activations are freed before the
    next one's); a quarter holds the head's logit blocks, each float32 value held about four times
    over (logits, shifted, exponentials, products). Within [2 048, 131 072] tokens and
    [2^21, 2^28] logits; 4 096 positions per head pass.
    """
    per_token = (6 * hidden + 3 * intermediate) * elem_bytes
    budget = int(0.5 * free_bytes / max(per_token, 1))
    logits = int(0.25 * free_bytes / 16)
    return {
        "token_budget": min(max(budget, 2048), 131072),
        "chunk_elements": min(max(logits, 2**21), 2**28),
        "head_positions": 4096,
    }


def sized(opts: ScoreOptions, model, device) -> ScoreOptions:
    """`opts` with every size left at None filled in: CPU_SIZES on a CPU, `gpu_sizes` on a GPU."""
    import dataclasses

    import torch

    unset = [k for k in CPU_SIZES if getattr(opts, k) is None]
    if not unset:
        return opts
    if torch.device(device).type == "cuda":
        cfg = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        elem = next(model.parameters()).element_size()
        free = torch.cuda.mem_get_info(torch.device(device))[0]
        sizes = gpu_sizes(cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
                          elem, free)  # fmt: skip
    else:
        sizes = CPU_SIZES
    chosen = {k: sizes[k] for k in unset}
    log.info("scoring sizes: %s", chosen)
    return dataclasses.replace(opts, **chosen)


def batches(lengths: Sequence[int], token_budget: int, max_batch: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, each within `token_budget` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out, cur = [], []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * longest > token_budget or len(cur) >= max_batch):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


# ------------------------------------------------------------------------------ the model side


def _head(model):
    """(body, head, softcap): the decoder that gives final hidden states, the output projection, and
    the final logit soft-capping some architectures apply."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    if body is None or head is None or body is base:
        raise ScoreError(
            f"{type(base).__name__}: cannot split it into decoder and output head for scoring"
        )
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return body, head, softcap


def _causal_batch(body, batch: Sequence[Encoded], pad_id: int, device, scope: str):
    """One batch of texts through a decoder-only model's body (right padding): (batch row, position,
    token id) of every scored token and the final hidden state [N, hidden] at the position before
    it, which predicts it; None when the batch has nothing to score."""
    import torch

    width = len(batch[0].ids)  # the longest first
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    # positions to score: (batch row, position predicting the next token), and the targets
    b_idx, p_idx = [], []
    for r, e in enumerate(batch):
        n = len(e.ids)
        ids[r, :n] = torch.tensor(e.ids)
        mask[r, :n] = 1
        start = 1 if scope == "all" else max(e.n_prompt, 1)
        b_idx.extend([r] * (n - start))
        p_idx.extend(range(start - 1, n - 1))
    if not b_idx:
        return None
    b = torch.tensor(b_idx)
    pos = torch.tensor(p_idx)
    # no padding in this batch: no mask, so attention can take its causal fast path
    attn = None if bool(mask.all()) else mask.to(device)
    hidden = body(input_ids=ids.to(device), attention_mask=attn, use_cache=False).last_hidden_state
    return b, pos + 1, ids[b, pos + 1], hidden[b.to(hidden.device), pos.to(hidden.device)]


def _seq2seq_head(model):
    """(model, head, softcap) of an encoder–decoder model: the model whose forward pass feeds the
    output head (a peft wrapper's base model), the output projection, and the final logit
    soft-capping some architectures apply."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is None:
        raise ScoreError(f"{type(base).__name__}: no output head to score with")
    return base, head, getattr(base.config, "final_logit_softcapping", None)


def _check_seq2seq_options(opts: ScoreOptions, where: str) -> None:
    """An encoder–decoder model scores completion tokens only, prompt and completion encoded apart."""
    if opts.scope == "all":
        raise ScoreError(
            f"{where}: score.scope 'all' scores the prompt's tokens, which an encoder–decoder model "
            f"reads with its encoder and does not predict; set score.scope: completion"
        )
    if opts.boundary == "joint":
        raise ScoreError(
            f"{where}: score.boundary 'joint' splits one token sequence into prompt and completion; "
            f"an encoder–decoder model reads them as two sequences: set score.boundary: separate"
        )


class _HeadInput(Exception):
    """Raised by `_head_inputs`' hook to stop a forward pass at the output head."""

    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden


def _head_inputs(model, head, **inputs):
    """The hidden states [rows, positions, hidden] `model`'s output head receives for `inputs`: an
    encoder–decoder's final decoder states after whatever the architecture applies before its head
    (T5 multiplies them by d_model^-0.5 where the embeddings are tied). A forward pre-hook on the
    head (always removed) stops the pass there, so the logits are never formed."""

    def stop(module, args):
        raise _HeadInput(args[0])

    hook = head.register_forward_pre_hook(stop)
    try:
        model(**inputs, use_cache=False)
    except _HeadInput as e:
        return e.hidden
    finally:
        hook.remove()
    raise ScoreError(f"{type(model).__name__}: its forward pass does not call its output head")


def _seq2seq_batch(model, head, softcap, batch: Sequence[Encoded], pad_id: int, device,
                   where: str, check: bool = False):  # fmt: skip
    """One batch of texts through an encoder–decoder model, the prompt as the encoder's input and
    the completion teacher-forced into the decoder as [decoder start token] + completion[:-1]
    (both right-padded and masked): (batch row, position, token id) of every completion token,
    its position counted in prompt + completion, and the hidden state [N, hidden] the output head
    receives at the decoder position predicting it; None when the batch has nothing to score.

    `check`: also compare the model's own logits for the batch's first text with the output head
    applied to those hidden states, and refuse an architecture that changes its logits after the
    head (BART's `final_logits_bias`, say)."""
    import torch

    cfg = model.config
    start = getattr(cfg, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise ScoreError(
            f"{where}: the encoder–decoder model's config has no decoder_start_token_id"
        )
    for e in batch:
        if e.n_prompt == 0:
            raise ScoreError(
                f"{where}: text {e.id!r} has an empty prompt; an encoder–decoder model needs one "
                f"for its encoder"
            )
    comps = [e.ids[e.n_prompt :] for e in batch]
    if not any(comps):
        return None
    enc_w, dec_w = max(e.n_prompt for e in batch), max(map(len, comps))
    enc_ids = torch.full((len(batch), enc_w), pad_id, dtype=torch.long)
    enc_mask = torch.zeros_like(enc_ids)
    dec_ids = torch.full((len(batch), dec_w), pad_id, dtype=torch.long)
    dec_mask = torch.zeros_like(dec_ids)
    b_idx, k_idx, n_prompt = [], [], []
    for r, (e, c) in enumerate(zip(batch, comps, strict=True)):
        enc_ids[r, : e.n_prompt] = torch.tensor(e.ids[: e.n_prompt])
        enc_mask[r, : e.n_prompt] = 1
        dec = [start, *c[:-1]]
        dec_ids[r, : len(dec)] = torch.tensor(dec)
        dec_mask[r, : len(dec)] = 1  # a row without a completion keeps its start token
        b_idx.extend([r] * len(c))
        k_idx.extend(range(len(c)))
        n_prompt.extend([e.n_prompt] * len(c))
    b, k = torch.tensor(b_idx), torch.tensor(k_idx)

    def inputs(rows):
        return {"input_ids": enc_ids[rows].to(device), "attention_mask": enc_mask[rows].to(device),
                "decoder_input_ids": dec_ids[rows].to(device),
                "decoder_attention_mask": dec_mask[rows].to(device)}  # fmt: skip

    hidden = _head_inputs(model, head, **inputs(slice(None)))
    if check:
        _check_head_path(model, head, softcap, inputs(slice(0, 1)), where)
    tgt = torch.tensor([t for c in comps for t in c], dtype=torch.long)
    return b, torch.tensor(n_prompt) + k, tgt, hidden[b.to(hidden.device), k.to(hidden.device)]


def _check_head_path(model, head, softcap, inputs: dict, where: str) -> None:
    """The model's own logits for `inputs` (one text) must be its output head applied to the hidden
    states the head receives (`_head_inputs`), soft-capped as `_head` says: otherwise the
    architecture changes its logits after the head and scoring it is refused."""
    import torch

    own = model(**inputs, use_cache=False).logits.float()
    mine = head(_head_inputs(model, head, **inputs)).float()
    if softcap:
        mine = torch.tanh(mine / softcap) * softcap
    if own.shape != mine.shape or not torch.allclose(own, mine, rtol=1e-3, atol=1e-3):
        raise ScoreError(
            f"{where}: {type(model).__name__}'s logits are not its output head applied to the "
            f"decoder's final hidden states; scoring this encoder–decoder architecture is not supported"
        )


def check_tokenizer(model, tokenizer, where: str) -> None:
    """The tokenizer's ids must fit the model's vocabulary, and padding needs a pad token."""
    vocab = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ScoreError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}; "
            "the handle's tokenizer does not belong to this model (set models.<m>.tokenizer)"
        )


STAT_KEYS = ("logprob", "entropy", "varentropy", "rank", "top1_id", "top1_logprob", "margin")


def _scored_chunks(h, targets, head, softcap, opts):
    """(start, head_stats of positions start:start+P) over the scored positions of a batch, P =
    `head_positions` at a time, the vocabulary in blocks of chunk_elements / P rows."""
    n_pos = max(1, opts.head_positions)
    block = max(128, opts.chunk_elements // min(n_pos, max(1, h.shape[0])))
    for s in range(0, h.shape[0], n_pos):
        yield s, head_stats(h[s : s + n_pos], head.weight, targets[s : s + n_pos],
                            getattr(head, "bias", None), softcap, vocab_block=block,
                            compiled=opts.compile_stats)  # fmt: skip


def _exact_rows(st, bad, h, targets, head, softcap, text_ids, where):
    """Recompute the rows whose logits were not all finite from their materialized logits: -inf is
    a token of probability 0; NaN or +inf stop the job naming the text."""
    import torch

    logits = head(h[bad])
    if softcap:
        logits = torch.tanh(logits.float() / softcap) * softcap
    broken = torch.isnan(logits) | (logits == float("inf"))
    if broken.any():
        i = int(bad.nonzero()[int(broken.any(-1).nonzero()[0]), 0])
        raise ScoreError(
            f"{where}: non-finite (NaN or +inf) logits while scoring text {text_ids[i]!r}"
        )
    exact = token_stats(logits, targets[bad])
    for k in STAT_KEYS:
        st[k] = st[k].clone()
        st[k][bad] = exact[k].to(st[k].dtype)
    return st


def score_items(
    model,
    tokenizer,
    items: Sequence[TextItem],
    opts: ScoreOptions | None = None,
    where: str = "model",
):
    """Score `items` under `model`. Returns (tokens, sequences) as polars DataFrames.

    `tokens` has one row per scored token (TOKEN_COLUMNS, plus the items' meta is not repeated
    there); `sequences` one row per item, in input order (SEQUENCE_COLUMNS plus each item's meta).
    An item with nothing to score (empty completion) gets n_tokens = 0 and null statistics.
    """
    import numpy as np
    import polars as pl
    import torch

    opts = opts or ScoreOptions()
    if opts.scope not in ("completion", "all"):
        raise ScoreError(f"scope must be 'completion' or 'all', not {opts.scope!r}")
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if seq2seq:
        _check_seq2seq_options(opts, where)
    check_tokenizer(model, tokenizer, where)
    max_length = opts.max_length or getattr(model.config, "max_position_embeddings", None) or 2**31
    enc = encode(items, tokenizer, opts, max_length, prompt_special_tokens=seq2seq)
    body, head, softcap = _seq2seq_head(model) if seq2seq else _head(model)
    if opts.compile and seq2seq:
        log.warning("score.compile compiles decoder-only models' bodies; %s runs eagerly", where)
    elif opts.compile:
        body = torch.compile(body, dynamic=True)
    from reasonlab.models import input_device

    device = input_device(
        model
    )  # where inputs go (the first device of a model spread by accelerate)
    out_device = head.weight.device  # where the hidden states and logits end up
    opts = sized(opts, model, out_device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    cols: dict[str, list] = {k: [] for k in ("row", "position", "token_id", "logprob", "entropy", "varentropy",
                                             "rank", "top1_id", "top1_logprob", "margin", "is_prompt")}  # fmt: skip
    plan = batches([len(e.ids) for e in enc], opts.token_budget, opts.max_batch)
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=sum(len(e.ids) for e in enc), desc=f"scoring ({where})", unit="tok", mininterval=5
        )
    checked = False  # an encoder–decoder's head path, checked on the first batch it scores
    with torch.inference_mode():
        for rows in plan:
            batch = [enc[i] for i in rows]
            if seq2seq:  # the completions as decoder tokens given their prompts
                got = _seq2seq_batch(body, head, softcap, batch, pad_id, device, where,
                                     check=not checked)  # fmt: skip
                checked = checked or got is not None
            else:
                got = _causal_batch(body, batch, pad_id, device, opts.scope)
            if got is not None:
                # b: batch row, pos: the scored token's position in prompt + completion
                b, pos, tgt, h = got
                h, targets = h.to(out_device), tgt.to(out_device)
                for s, st in _scored_chunks(h, targets, head, softcap, opts):
                    bad = ~st.pop("finite")
                    if bad.any():  # NaN, +inf or -inf among the logits: these rows exactly
                        ids_of = [batch[int(i)].id for i in b[s : s + len(bad)]]
                        st = _exact_rows(st, bad, h[s : s + len(bad)], targets[s : s + len(bad)],
                                         head, softcap, ids_of, where)  # fmt: skip
                    for k in STAT_KEYS:
                        cols[k].append(st[k].cpu())
                cols["row"].append(torch.tensor(rows)[b])
                cols["position"].append(pos)
                cols["token_id"].append(tgt)
                cols["is_prompt"].append(pos < torch.tensor([e.n_prompt for e in batch])[b])
            if bar:
                bar.update(sum(len(e.ids) for e in batch))
    if bar:
        bar.close()

    def cat(k, dtype):
        return torch.cat(cols[k]).numpy().astype(dtype) if cols[k] else np.zeros(0, dtype=dtype)

    row = cat("row", np.int64)
    token_id = cat("token_id", np.int64)
    top1_id = cat("top1_id", np.int64)
    logprob = cat("logprob", np.float64)
    n_prompt_arr = np.array([e.n_prompt for e in enc], dtype=np.int64)
    position = cat("position", np.int64)
    # completion tokens count from 1 (generation step); prompt tokens (scope "all") from 1 too
    is_prompt = cat("is_prompt", bool)
    step = np.where(is_prompt, position, position - n_prompt_arr[row] + 1) if len(row) else position
    vocab = _token_texts(tokenizer, np.unique(np.concatenate([token_id, top1_id])))
    tokens = pl.DataFrame(
        {
            "row": row,
            "id": np.array([e.id for e in enc], dtype=object)[row].tolist() if len(row) else [],
            "position": step,
            "token_id": token_id,
            "token": [vocab[t] for t in token_id.tolist()],
            "logprob": logprob,
            "prob": np.exp(logprob),
            "entropy": cat("entropy", np.float64),
            "varentropy": cat("varentropy", np.float64),
            "rank": cat("rank", np.int64),
            "top1_id": top1_id,
            "top1_token": [vocab[t] for t in top1_id.tolist()],
            "top1_prob": np.exp(cat("top1_logprob", np.float64)),
            "margin": cat("margin", np.float64),
            "is_prompt": is_prompt,
        },
        schema_overrides={"id": pl.String, "token": pl.String, "top1_token": pl.String},
    ).sort("row", "is_prompt", "position", descending=[False, True, False])
    if any(it.completion_logprobs is not None for it in items):
        tokens = _with_generator_logprobs(tokens, items)
    sequences = summarize(
        tokens.filter(~pl.col("is_prompt")) if opts.scope == "completion" else tokens, enc, items
    )
    return tokens.drop("row"), sequences


def _with_generator_logprobs(tokens, items: Sequence[TextItem]):
    """Add `gen_logprob`: the generator's log-probability of each completion token (step k is the
    k-th generated token), null where there is none (prompt tokens, an appended end-of-sequence)."""
    import polars as pl

    rows, steps, values = [], [], []
    for r, it in enumerate(items):
        lps = list(it.completion_logprobs or [])
        rows.extend([r] * len(lps))
        steps.extend(range(1, len(lps) + 1))
        values.extend(lps)
    gen = pl.DataFrame(
        {"row": rows, "position": steps, "gen_logprob": values, "is_prompt": [False] * len(rows)},
        schema={"row": tokens.schema["row"], "position": tokens.schema["position"],
                "gen_logprob": pl.Float64, "is_prompt": pl.Boolean},
    )  # fmt: skip
    return tokens.join(gen, on=["row", "is_prompt", "position"], how="left", maintain_order="left")


def _token_texts(tokenizer, ids) -> dict[int, str]:
    """Each token id decoded on its own (so byte-level symbols read as text)."""
    ids = [int(i) for i in ids]
    if not ids:
        return {}
    texts = tokenizer.batch_decode(
        [[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    return dict(zip(ids, texts, strict=True))


def summarize(tokens, enc: Sequence[Encoded], items: Sequence[TextItem]):
    """Per-text statistics from the per-token table; every item gets a row, in input order."""
    import polars as pl

    gen = []
    if "gen_logprob" in tokens.columns:
        diff = (pl.col("logprob") - pl.col("gen_logprob")).abs()
        gen = [
            pl.col("gen_logprob").sum().alias("gen_llh_sum"),
            diff.max().alias("max_abs_logprob_diff"),
        ]
    agg = tokens.group_by("row").agg(
        pl.len().alias("n_tokens"),
        pl.col("logprob").sum().alias("llh_sum"),
        pl.col("entropy").mean().alias("entropy_mean"),
        pl.col("entropy").median().alias("entropy_median"),
        pl.col("entropy").std(ddof=0).alias("entropy_std"),
        pl.col("entropy").min().alias("entropy_min"),
        pl.col("entropy").max().alias("entropy_max"),
        *gen,
    )
    base = pl.DataFrame(
        {
            "row": list(range(len(enc))),
            "id": [e.id for e in enc],
            "n_prompt_tokens": [e.n_prompt for e in enc],
            "truncated": [e.truncated for e in enc],
        },
        schema_overrides={"row": pl.Int64, "id": pl.String, "n_prompt_tokens": pl.Int64},
    )
    out = (
        base.join(agg.with_columns(pl.col("row").cast(pl.Int64)), on="row", how="left")
        .with_columns(pl.col("n_tokens").fill_null(0).cast(pl.Int64))
        .with_columns(llh_mean=pl.col("llh_sum") / pl.col("n_tokens"))
        .with_columns(perplexity=(-pl.col("llh_mean")).exp())
        .sort("row")
        .select(
            SEQUENCE_COLUMNS
            + [c for c in ("gen_llh_sum", "max_abs_logprob_diff") if c in agg.columns]
        )
    )
    meta_keys = [k for k in (items[0].meta if items else {}) if k not in out.columns]
    if meta_keys:
        out = out.with_columns([pl.Series(k, [it.meta.get(k) for it in items]) for k in meta_keys])
    return out


# ------------------------------------------------------------------------------ text sets and jobs


def reference_items(
    df, tokenizer, prompt: str = "chat", system: str | None = None, dataset: str = ""
) -> list[TextItem]:
    """A prepared dataset's rows as (rendered prompt, reference solution) items to score.

    Rows without a solution become empty completions (recorded with n_tokens = 0).
    """
    from reasonlab.prompts import render_prompt

    items = []
    for r in df.iter_rows(named=True):
        text = render_prompt(tokenizer, r["question"], r["system"] or system, prompt)
        meta = {"dataset": dataset, "type": r["type"], "subject": r["subject"], "level": r["level"]}
        items.append(TextItem(r["id"], text, r["solution"] or "", meta=meta))
    return items


def generated_items(df, dataset: str = "", generator: str = "") -> list[TextItem]:
    """Graded generations (the `generate` → `grade` table) as items scored on their exact tokens:
    the prompt and completion token ids the generator saw and sampled, with its log-probabilities.

    Ids are the row's id, or `<id>#<sample>` when there are several samples per prompt. The
    sequence table's `type` is "correct" or "incorrect", so log-likelihood by type splits on it.
    """
    multi = df["sample"].max() > 0 if df.height else False
    items = []
    for r in df.iter_rows(named=True):
        correct = r.get("correct")
        meta = {"dataset": dataset, "generator": generator, "sample": r["sample"],
                "type": None if correct is None else ("correct" if correct else "incorrect"),
                "finish_reason": r["finish_reason"], "gen_dtype": r.get("dtype")}  # fmt: skip
        items.append(
            TextItem(
                f"{r['id']}#{r['sample']}" if multi else r["id"],
                r["prompt"],
                r["completion"],
                completion_ids=r["token_ids"],
                prompt_ids=r["prompt_ids"],
                completion_logprobs=r["token_logprobs"],
                meta=meta,
            )
        )
    return items


def score_textset(handle, texts, out_tokens, out_sequences, options: dict, prompt: str = "chat",
                  system: str | None = None, threads: int | None = None, name: str = "",
                  compute=None, record_path=None) -> dict:  # fmt: skip
    """Score a text set under a model handle and write both tables: a prepared dataset's reference
    solutions, or (a table with `token_ids`) graded generations on their exact tokens.

    `compute`: the job's `reasonlab.compute.Request` (default: auto: a GPU when the job sees one).
    `record_path`: where to write how the job ran (device, dtype, GPUs). Returns a small summary
    (texts, tokens, seconds, tokens per second, and that record).
    """
    import time

    import polars as pl
    import torch

    from reasonlab import compute as cp
    from reasonlab.data import read_dataset
    from reasonlab.models import load_placed, read_handle

    if threads:
        torch.set_num_threads(threads)
    h = read_handle(handle)
    where = f"{h.model}/{h.ckpt}"
    machine, placement, model, tok = load_placed(h, compute, where)
    if "token_ids" in pl.read_parquet_schema(texts):  # generations (the grade rule's table)
        t = textsets.parse(name) if name else textsets.TextSet("")
        items = generated_items(pl.read_parquet(texts), t.dataset, t.generator or "")
    else:
        items = reference_items(read_dataset(texts), tok, prompt, system, dataset=name)
    t0 = time.perf_counter()
    tokens, sequences = score_items(model, tok, items, ScoreOptions(**options), where=where)
    sequences = sequences.with_columns(dtype=pl.lit(placement.dtype))
    seconds = time.perf_counter() - t0
    write_all(
        {"tokens": tokens, "sequences": sequences},
        {"tokens": out_tokens, "sequences": out_sequences},
    )
    n = int(sequences["n_tokens"].sum() + sequences["n_prompt_tokens"].sum())
    summary = {"model": where, "texts": len(items), "scored_tokens": tokens.height, "tokens": n,
               "seconds": round(seconds, 2), "tokens_per_s": round(n / seconds, 1) if seconds else None}  # fmt: skip
    if "max_abs_logprob_diff" in sequences.columns:
        summary["max_abs_logprob_diff_vs_generator"] = sequences["max_abs_logprob_diff"].max()
    log.info("scored %s", summary)
    rec = cp.record(placement, machine, "score", model=h.model, ckpt=h.ckpt, textset=name,
                    seconds=summary["seconds"])  # fmt: skip
    cp.write_record(rec, record_path)
    return summary | {"compute": rec}
