"""Guided inference (seed 004): a small base model consults a larger oracle model under a budget.

The loop runs batched over problems in synchronous rounds. Each model keeps its own KV cache for
the whole batch (`Stream`): tokens are handed over as token ids, never re-tokenized text, so both
models must share a tokenizer. A round: every active row decodes up to `step_size` tokens on the
base; a statistic trigger (entropy or varentropy above, top-1 probability below a threshold) is
evaluated at every base position — when it fires, the base's step ends there without emitting and
the oracle writes the next `k` tokens (BiLD's fallback); the random trigger (its probability rising
with position, as in seed 004) and the structural one (a blank line followed by a hesitation word,
as Speculative Thinking) fire at step boundaries. At most `c` consultations per problem; stop at
end-of-sequence or `max_new_tokens`. Rows that advance by different numbers of tokens leave holes
in a cache: every forward pass carries the full 2-D attention mask (holes masked) and explicit
position ids (each row's own count of real tokens), so a row's logits do not depend on the others.

Budget matching: `quantile_threshold` turns a target trigger rate into a threshold from a
base-only run's statistics at every position (`position_stats=True`).

Budget-matched grids (`calibrate`): a statistic policy's threshold is searched as a quantile of
the base's own statistic, the random policy's rate as a multiple of its schedule, until the
realised oracle-token fraction (a trace's oracle tokens ÷ all its generated tokens, averaged over
the problems) lands within a relative tolerance of the target; the realised fraction is recorded.

At each consultation point: the base's next-token statistics (the scorer's definitions), the
base–oracle agreement (top-1 match, KL, Jensen–Shannon), and, from one extra forward pass over the
finished traces (`attention_stats`), the base's attention entropy at a configured layer (each
head's entropy over the valid context only — padding and future positions never enter the softmax
— divided by log(context length); mean and variance across heads) and the interaction strength
(the mean absolute pre-softmax attention score over the same keys).

The oracle is a loaded model (its own `Stream`) or, with `server=ServerOracle(url)`, an
OpenAI-compatible server (`vllm serve`) sent the exact token ids of each consulting row; agreement
is then computed on the server's top log-probabilities (`agreement_topk`).

`guided_job` is the `guide` rule: one (base, oracle, dataset, policy) with its grid of (c, k,
step size) × budgets, graded by the grading stage's parser.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from reasonlab import ReasonlabError

POLICIES = ("never", "always", "random", "entropy", "varentropy", "top1", "structural")
STATISTIC = {"entropy": "entropy", "varentropy": "varentropy", "top1": "top1"}
log = logging.getLogger(__name__)


class GuidedError(ReasonlabError):
    """Bad guided-inference inputs: mismatched tokenizers, an unknown policy."""


@dataclass(frozen=True)
class Policy:
    """When the base consults the oracle. `threshold`: entropy / varentropy above it, top-1
    probability below it; `p0`/`slope`: the random trigger's probability at a step boundary,
    min(1, p0 + slope × generated tokens); `words`: the structural trigger's hesitation words."""

    name: str = "never"
    c: int = 0  # consultations per problem at most
    k: int = 8  # oracle tokens per consultation
    step_size: int = 8
    threshold: float | None = None
    p0: float = 0.05
    slope: float = 0.002
    words: tuple[str, ...] = ("Wait", "Hmm", "But")
    seed: int = 0

    def __post_init__(self):
        if self.name not in POLICIES:
            raise GuidedError(
                f"unknown policy {self.name!r}; expected one of {', '.join(POLICIES)}"
            )
        if self.name in ("entropy", "varentropy", "top1") and self.threshold is None:
            raise GuidedError(f"policy {self.name} needs a threshold")


def check_tokenizers(
    base_tok, oracle_tok, base_name: str = "base", oracle_name: str = "oracle"
) -> None:
    """Token ids are handed over as they are: both tokenizers must map the same strings to the same
    ids (vocabulary and special tokens)."""
    if (
        base_tok.get_vocab() != oracle_tok.get_vocab()
        or base_tok.eos_token_id != oracle_tok.eos_token_id
    ):
        raise GuidedError(
            f"the base model {base_name} and the oracle {oracle_name} have different tokenizers "
            f"({len(base_tok.get_vocab())} vs {len(oracle_tok.get_vocab())} tokens): guided inference "
            "hands token ids from one model to the other, so pick an oracle of the same family"
        )


def batch_stats(logits) -> dict:
    """Entropy, varentropy, top-1 probability and top-1 minus top-2 probability of each row of a
    [rows, vocab] batch of next-token distributions (float64 tensors), as the scorer defines them."""
    import torch

    lp = torch.log_softmax(logits.double(), -1)
    p = lp.exp()
    ent = -(p * lp).sum(-1)
    var = (p * (lp + ent[:, None]) ** 2).sum(-1)
    top = torch.topk(p, 2, dim=-1).values
    return {
        "entropy": ent,
        "varentropy": var,
        "top1": top[:, 0],
        "top2_diff": top[:, 0] - top[:, 1],
    }


def next_token_stats(logits) -> dict:
    """`batch_stats` of one next-token distribution, as floats."""
    return {k: float(v[0]) for k, v in batch_stats(logits.reshape(1, -1)).items()}


class Stream:
    """One model's KV cache over a batch of rows that advance by different numbers of tokens."""

    def __init__(self, model, pad: int, rows: int):
        import torch

        self.model, self.pad = model, pad
        self.device = model.get_input_embeddings().weight.device
        self.cache = None
        self.mask = torch.zeros((rows, 0), dtype=torch.long, device=self.device)
        self.count = [0] * rows  # real tokens per row (the next position id)
        self.last = None  # [rows, vocab]: each row's next-token logits (after its last real token)
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.pending: list[list[int]] = [
            [] for _ in range(rows)
        ]  # the other model's tokens to feed
        self.forwards = 0

    def feed(self, chunks: list[list[int]]) -> None:
        """Append each row's tokens (an empty list: a hole) in one forward pass."""
        import torch

        width = max(len(c) for c in chunks)
        if width == 0:
            return
        rows = len(chunks)
        ids = torch.full((rows, width), self.pad, dtype=torch.long)
        m = torch.zeros((rows, width), dtype=torch.long)
        pos = torch.zeros((rows, width), dtype=torch.long)
        for r, c in enumerate(chunks):
            if c:
                ids[r, : len(c)] = torch.tensor(c)
                m[r, : len(c)] = 1
            pos[r] = torch.arange(self.count[r], self.count[r] + width)
        self.mask = torch.cat([self.mask, m.to(self.device)], 1)
        fed = [r for r, c in enumerate(chunks) if c]
        at = torch.tensor([len(chunks[r]) - 1 for r in fed], device=self.device)
        rows_t = torch.tensor(fed, device=self.device)
        with torch.inference_mode():
            out = self.decoder(input_ids=ids.to(self.device), attention_mask=self.mask,
                               position_ids=pos.to(self.device), past_key_values=self.cache,
                               use_cache=True)  # fmt: skip
            # the output head only where a row's next token is predicted (a 150 k vocabulary over
            # every prompt position would be most of the prefill's memory)
            logits = self.head(out.last_hidden_state[rows_t, at]).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
        self.cache = out.past_key_values
        self.forwards += 1
        if self.last is None:
            self.last = torch.zeros(
                (rows, logits.shape[-1]), dtype=torch.float32, device=self.device
            )
        self.last[rows_t] = logits
        for r in fed:
            self.count[r] += len(chunks[r])

    def sync(self) -> None:
        """Feed every row's pending tokens (the other model's)."""
        if any(self.pending):
            chunks, self.pending = self.pending, [[] for _ in self.pending]
            self.feed(chunks)


@dataclass
class Row:
    tokens: list[int] = field(default_factory=list)
    source: list[str] = field(default_factory=list)  # "base" / "oracle" per token
    consultations: list[dict] = field(default_factory=list)  # position and base statistics
    done: bool = False
    finish_reason: str | None = None


def _choose(logits, temperature: float, rng: random.Random) -> int:
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits))
    p = torch.softmax(logits.double() / temperature, -1)
    return int(
        torch.multinomial(p, 1, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    )


def agreement(base_logits, oracle_logits) -> dict:
    """How the base's and the oracle's next-token distributions agree at one point: top-1 match,
    KL(base ‖ oracle) and the Jensen–Shannon divergence (nats, float64)."""
    import torch

    lb = torch.log_softmax(base_logits.double(), -1)
    lo = torch.log_softmax(oracle_logits.double(), -1)
    pb, po = lb.exp(), lo.exp()
    mid = (0.5 * (pb + po)).clamp_min(1e-300).log()
    kl = float((pb * (lb - lo)).sum())
    js = float(0.5 * (pb * (lb - mid)).sum() + 0.5 * (po * (lo - mid)).sum())
    return {
        "top1_match": bool(torch.argmax(lb) == torch.argmax(lo)),
        "kl": max(kl, 0.0),
        "js": max(js, 0.0),
    }


def quantile_threshold(stats: list[dict], name: str, fraction: float) -> float:
    """The threshold at which the statistic `name` (entropy, varentropy, top1) of the base's own
    positions (a base-only run's `position_stats`) fires at about `fraction` of them: above the
    1 − fraction quantile (entropy, varentropy), below the fraction quantile (top1)."""
    import numpy as np

    values = np.asarray([s[name] for s in stats], dtype=np.float64)
    if not len(values):
        raise GuidedError("no base positions to take a quantile of (an empty base-only run)")
    q = fraction if name == "top1" else 1.0 - fraction
    return float(np.quantile(values, min(max(q, 0.0), 1.0)))


def guided_generate(base, oracle, tokenizer, prompts: list[list[int]], policy: Policy,
                    max_new_tokens: int = 256, temperature: float = 0.0,
                    position_stats: bool = False, server: ServerOracle | None = None) -> list[dict]:  # fmt: skip
    """Generate a completion of every prompt (token ids) with the base consulting the oracle under
    `policy`. Per row: tokens, their source, the consultations (position, the base's next-token
    statistics there, the base–oracle agreement), oracle tokens, the oracle-token fraction, the
    finish reason; with `position_stats`, the base's statistics at every position it wrote (for
    `quantile_threshold`). With `server` (a `ServerOracle`) the oracle is that server and
    `oracle` is unused (None): each consultation sends the row's token ids and the agreement is
    computed on the server's top log-probabilities."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    n = len(prompts)
    b = Stream(base, pad, n)
    b.feed([list(p) for p in prompts])
    o = None
    if server is None:
        o = Stream(oracle, pad, n)
        o.feed([list(p) for p in prompts])
    rows = [Row() for _ in range(n)]
    seen: list[list[dict]] = [[] for _ in range(n)]
    rng = random.Random(policy.seed)
    always = policy.name == "always"
    c = math.inf if always else policy.c
    k = max_new_tokens if always else policy.k
    hesitation = re.compile(r"\n\s*\n\s*(?:" + "|".join(map(re.escape, policy.words)) + r")$")

    def emit(r: int, tok: int, source: str, other: Stream) -> None:
        row = rows[r]
        row.tokens.append(tok)
        row.source.append(source)
        if other is not None:
            other.pending[r].append(tok)
        if eos is not None and tok == eos:
            row.done, row.finish_reason = True, "stop"
        elif len(row.tokens) >= max_new_tokens:
            row.done, row.finish_reason = True, "length"

    def fires(st: dict):
        """Per row of a batch of statistics: does the policy's statistic trigger fire?"""
        import torch

        if policy.name == "entropy":
            return st["entropy"] > policy.threshold
        if policy.name == "varentropy":
            return st["varentropy"] > policy.threshold
        if policy.name == "top1":
            return st["top1"] < policy.threshold
        return torch.full(
            st["entropy"].shape, always, dtype=torch.bool, device=st["entropy"].device
        )

    while not all(r.done for r in rows):
        b.sync()
        triggered: set[int] = set()
        for _ in range(policy.step_size):
            live = [r for r in range(n) if not rows[r].done and r not in triggered]
            if not live:
                break
            chunks: list[list[int]] = [[] for _ in range(n)]
            logits = b.last[live]
            st = batch_stats(logits) if position_stats or policy.name != "never" else None
            # one transfer per step from the device: the statistics, the trigger and the tokens
            fire = fires(st).tolist() if st is not None else None
            host = {key: v.tolist() for key, v in st.items()} if st is not None else None
            greedy = logits.argmax(-1).tolist() if temperature <= 0 else None
            for i, r in enumerate(live):
                stats = {key: v[i] for key, v in host.items()} if host is not None else None
                if position_stats:
                    seen[r].append(stats)
                if fire is not None and fire[i] and len(rows[r].consultations) < c:
                    triggered.add(r)
                    rows[r].consultations.append(
                        {"position": len(rows[r].tokens), "trigger": policy.name, **stats}
                    )
                    continue
                tok = greedy[i] if greedy is not None else _choose(logits[i], temperature, rng)
                emit(r, tok, "base", o)
                chunks[r] = [tok]
            b.feed(chunks)
        for r in range(n):  # the triggers at step boundaries
            row = rows[r]
            if row.done or r in triggered or len(row.consultations) >= c:
                continue
            hit = False
            if policy.name == "random":
                hit = rng.random() < min(1.0, policy.p0 + policy.slope * len(row.tokens))
            elif policy.name == "structural":
                tail = tokenizer.decode(row.tokens[-16:])
                hit = bool(hesitation.search(tail))
            if hit:
                triggered.add(r)
                row.consultations.append({"position": len(row.tokens), "trigger": policy.name,
                                          **next_token_stats(b.last[r])})  # fmt: skip
        if not triggered:
            continue
        if server is not None:
            live = sorted(r for r in triggered if not rows[r].done)
            seeds = None if temperature <= 0 else [rng.randrange(2**31) for _ in live]
            got = server.complete([list(prompts[r]) + rows[r].tokens for r in live],
                                  [min(k, max_new_tokens - len(rows[r].tokens)) for r in live],
                                  temperature, seeds)  # fmt: skip
            for r, (toks, top) in zip(live, got, strict=True):
                rows[r].consultations[-1].update(agreement_topk(b.last[r], top))
                for tok in toks:
                    if rows[r].done:
                        break
                    emit(r, tok, "oracle", b)
            continue
        o.sync()
        for r in sorted(triggered):  # where the two models stand before the oracle writes
            rows[r].consultations[-1].update(agreement(b.last[r], o.last[r]), agreement_on="full")
        for _ in range(k):
            live = sorted(r for r in triggered if not rows[r].done)
            if not live:
                break
            chunks = [[] for _ in range(n)]
            logits = o.last[live]
            greedy = logits.argmax(-1).tolist() if temperature <= 0 else None
            for i, r in enumerate(live):
                tok = greedy[i] if greedy is not None else _choose(logits[i], temperature, rng)
                emit(r, tok, "oracle", b)
                chunks[r] = [tok]
            o.feed(chunks)
    out = []
    for row in rows:
        n_oracle = row.source.count("oracle")
        out.append({"token_ids": row.tokens, "source": row.source, "consultations": row.consultations,
                    "n_consultations": len(row.consultations), "oracle_tokens": n_oracle,
                    "oracle_fraction": n_oracle / max(len(row.tokens), 1),
                    "finish_reason": row.finish_reason})  # fmt: skip
    if position_stats:
        for rec, st in zip(out, seen, strict=True):
            rec["position_stats"] = st
    return out


# ---------------------------------------------------------------- attention at consultation points

PROBE = "reasonlab_attention_probe"


def _register_probe() -> None:
    """An attention implementation that computes what sdpa computes and, at the probed layer,
    records each requested query's statistics (registered once, by name)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def probe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        state = getattr(module, "_reasonlab_probe", None)
        if state is not None:
            state.record(query, key, scaling if scaling is not None else query.shape[-1] ** -0.5)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)  # fmt: skip

    AttentionInterface.register(PROBE, probe)
    AttentionMaskInterface.register(PROBE, sdpa_mask)


class _ProbeState:
    def __init__(self, valid, queries):
        self.valid, self.queries, self.out = valid, queries, None

    def record(self, query, key, scaling) -> None:
        import torch

        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        out = []
        for b, qs in enumerate(self.queries):
            if not qs:
                out.append([])
                continue
            idx = torch.tensor(qs, device=query.device)
            scores = (query[b][:, idx].double() @ key[b].double().transpose(-1, -2)) * scaling
            n_keys = scores.shape[-1]
            causal = torch.arange(n_keys, device=query.device)[None, :] <= idx[:, None]
            ok = causal & self.valid[b][None, :n_keys].bool()  # [queries, keys]: the valid context
            n = ok.sum(-1)  # context length of each query
            lp = torch.log_softmax(scores.masked_fill(~ok, -math.inf), -1)
            p = lp.exp()
            ent = -(p * lp.masked_fill(~ok, 0.0)).sum(-1)  # [heads, queries], nats
            norm = ent / torch.log(n.double()).clamp_min(1e-12)[None, :]
            norm = torch.where(n[None, :] > 1, norm, torch.zeros_like(norm))
            inter = (scores.abs() * ok).sum(-1) / n[None, :]  # [heads, queries]
            # entropix's agreement: how far each head's attention is from the heads' mean (mean
            # absolute difference over the valid context; 0 = every head attends alike)
            dev = (p - p.mean(0, keepdim=True)).abs().masked_fill(~ok, 0.0)
            agree = dev.sum(-1) / n[None, :]  # [heads, queries]
            out.append([{"attn_entropy": float(norm[:, i].mean()),
                         "attn_varentropy": float(norm[:, i].var(unbiased=False)),
                         "interaction": float(inter[:, i].mean()),
                         "attn_agreement": float(agree[:, i].mean()), "context": int(n[i])}
                        for i in range(len(qs))])  # fmt: skip
        self.out = out


def attention_stats(model, sequences: list[list[int]], queries: list[list[int]], layer: int = -1,
                    pad: int = 0, batch_size: int = 8) -> list[list[dict]]:  # fmt: skip
    """At each row's query indices (positions in its token sequence whose next-token distribution
    is asked about), the attention statistics of the decoder layer `layer` (negative: from the end)
    in one forward pass per batch: `attn_entropy` (the mean over heads of each head's attention
    entropy over the valid context, ÷ log of the context length), `attn_varentropy` (their variance
    across heads), `interaction` (the mean absolute pre-softmax score over the valid context,
    averaged over heads) and `context` (keys attended to). Right padding; the model's attention
    implementation is restored afterwards."""
    import torch

    from reasonlab.activations import decoder_parts
    from reasonlab.models import input_device

    layers = decoder_parts(model).layers
    if not -len(layers) <= layer < len(layers):
        raise GuidedError(f"attention layer {layer} is out of range ({len(layers)} layers)")
    attn = _attention_module(layers[layer])
    _register_probe()
    before = model.config._attn_implementation
    device = input_device(model)
    out: list[list[dict]] = [[] for _ in sequences]
    todo = [i for i, q in enumerate(queries) if q]
    model.set_attn_implementation(PROBE)
    try:
        for s in range(0, len(todo), batch_size):
            rows = todo[s : s + batch_size]
            width = max(len(sequences[r]) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(sequences[r])] = torch.tensor(sequences[r])
                mask[j, : len(sequences[r])] = 1
            state = _ProbeState(mask.to(device), [queries[r] for r in rows])
            attn._reasonlab_probe = state
            with torch.inference_mode():  # the decoder alone: no output head is needed
                model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    use_cache=False)  # fmt: skip
            for j, r in enumerate(rows):
                out[r] = state.out[j]
    finally:
        attn.__dict__.pop("_reasonlab_probe", None)
        model.set_attn_implementation(before)
    return out


def _attention_module(layer):
    for name in ("self_attn", "attn", "attention", "self_attention"):
        if hasattr(layer, name):
            return getattr(layer, name)
    raise GuidedError(f"no attention module found in {type(layer).__name__}")


# ---------------------------------------------------------------- budget matching


def realised_fraction(runs: list[dict]) -> float:
    """The mean over problems of each trace's oracle-token fraction."""
    return sum(r["oracle_fraction"] for r in runs) / max(len(runs), 1)


def calibrate(run, policy: Policy, target: float, base_stats: list[dict], max_new_tokens: int,
              runs: int = 6, tolerance: float = 0.1) -> tuple[Policy, list[dict], dict]:  # fmt: skip
    """Search the knob of `policy` — a statistic trigger's firing rate among the base's own
    positions (its threshold the matching quantile of `base_stats`), or the random trigger's
    schedule multiple — until `run(policy)`'s realised oracle-token fraction is within `tolerance`
    (relative) of `target`, in at most `runs` runs (geometric bisection once bracketed). Returns
    the closest (policy, results, info: target, realised, knob, runs, matched)."""
    stat = STATISTIC.get(policy.name)
    per = policy.k / max(1.0 - target, 1e-6)
    if stat:
        x, top = min(1.0, target / per), 1.0
    else:
        p = target * policy.step_size / per
        x, top = p / max(policy.p0 + policy.slope * max_new_tokens / 2, 1e-9), math.inf

    def make(x: float) -> Policy:
        if stat:
            return replace(policy, threshold=quantile_threshold(base_stats, stat, x))
        return replace(policy, p0=policy.p0 * x, slope=policy.slope * x)

    lo = hi = None
    best, used = None, 0
    for _ in range(runs):
        used += 1
        pol = make(x)
        res = run(pol)
        f = realised_fraction(res)
        err = abs(f / target - 1.0) if target > 0 else abs(f)
        if best is None or err < best[3]:
            best = (pol, res, x, err, f)
        if err <= tolerance:
            break
        if f < target:
            lo = x if lo is None else max(lo, x)
        else:
            hi = x if hi is None else min(hi, x)
        if lo is not None and hi is not None:
            x = math.sqrt(lo * hi)
        elif f < target:
            if x >= top:
                break  # the trigger already fires everywhere: the budget is out of reach (c, k)
            x = min(top, x * (target / f if f > 0 else 4.0))
        else:
            x = x * target / f
    pol, res, x, err, f = best
    info = {"target": target, "realised": f, "knob": x, "runs": used,
            "matched": err <= tolerance, "threshold": pol.threshold,
            "rate": x if not stat else None}  # fmt: skip
    return pol, res, info


# ---------------------------------------------------------------- traces as text


def segments(tokenizer, tokens: list[int], source: list[str]) -> list[dict]:
    """A trace as consecutive runs of one source: [{source, text, start, n}]."""
    out, start = [], 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or source[i] != source[start]:
            out.append({"source": source[start], "start": start, "n": i - start,
                        "text": tokenizer.decode(tokens[start:i])})  # fmt: skip
            start = i
    return out


def ansi_view(segs: list[dict]) -> str:
    """Seed 004's `--verbose` view: oracle tokens in bold yellow, base tokens plain."""
    return "".join(
        f"\x1b[1;33m{s['text']}\x1b[0m" if s["source"] == "oracle" else s["text"] for s in segs
    )


# ---------------------------------------------------------------- an oracle behind a server


class ServerOracle:
    """The oracle behind an OpenAI-compatible completions endpoint — seed 004 runs its oracles with
    `vllm serve` (prefix caching on by default), and a 70 B oracle will not share a node with the
    base. Each consultation sends the row's exact token ids (prompt + trace so far, never text)
    and receives up to k token ids and the first one's top-`top` log-probabilities; rows consulting
    in the same round are sent at once (the server batches them). Base–oracle agreement is then
    computed on the oracle's top-`top` tokens (`agreement_topk`)."""

    def __init__(self, url: str, model: str | None = None, top: int = 20, timeout: float = 600.0,
                 key: str = "guided.pairs[].server") -> None:  # fmt: skip
        base = url.rstrip("/")
        self.url = base if base.endswith("/v1") else base + "/v1"
        self.top, self.timeout, self.key = top, timeout, key
        self.model = model or self._get("/models")["data"][0]["id"]

    def _request(self, path: str, body: dict | None = None) -> dict:
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise GuidedError(f"{self.key}: the oracle server at {self.url} refused {path} "
                              f"({e.code}: {detail})") from None  # fmt: skip
        except (urllib.error.URLError, OSError) as e:
            raise GuidedError(f"{self.key}: no oracle server answers at {self.url} ({e}); start "
                              "one with `vllm serve <oracle>` or remove the server to run the "
                              "oracle locally") from None  # fmt: skip

    def _get(self, path: str) -> dict:
        return self._request(path)

    def complete(self, prefixes: list[list[int]], ks: list[int], temperature: float = 0.0,
                 seeds: list[int] | None = None) -> list[tuple[list[int], dict[int, float]]]:  # fmt: skip
        """(token ids, {token id: log-probability} of the first token's top) per prefix."""
        from concurrent.futures import ThreadPoolExecutor

        def one(i: int):
            body = {"model": self.model, "prompt": prefixes[i], "max_tokens": ks[i],
                    "temperature": temperature, "logprobs": self.top, "return_token_ids": True,
                    "return_tokens_as_token_ids": True, "skip_special_tokens": False}  # fmt: skip
            if seeds is not None:
                body["seed"] = seeds[i]
            choice = self._request("/completions", body)["choices"][0]
            tops = (choice.get("logprobs") or {}).get("top_logprobs") or [{}]
            first = {int(t.split(":", 1)[1]): float(v) for t, v in (tops[0] or {}).items()}
            return list(choice["token_ids"]), first

        if not prefixes:
            return []
        with ThreadPoolExecutor(max_workers=min(len(prefixes), 64)) as pool:
            return list(pool.map(one, range(len(prefixes))))


def agreement_topk(base_logits, top: dict[int, float]) -> dict:
    """Agreement with an oracle known only by its top-k log-probabilities: top-1 match, and KL and
    Jensen–Shannon divergence of the two distributions restricted to those k tokens (each
    renormalised over them); `agreement_on` says so."""
    import torch

    if not top:
        return {"top1_match": None, "kl": None, "js": None, "agreement_on": "none"}
    ids = torch.tensor(list(top), device=base_logits.device)
    lo = torch.log_softmax(torch.tensor(list(top.values()), dtype=torch.float64), -1)
    lb = torch.log_softmax(torch.log_softmax(base_logits.double(), -1)[ids].cpu(), -1)
    pb, po = lb.exp(), lo.exp()
    mid = (0.5 * (pb + po)).clamp_min(1e-300).log()
    kl = float((pb * (lb - lo)).sum())
    js = float(0.5 * (pb * (lb - mid)).sum() + 0.5 * (po * (lo - mid)).sum())
    best = max(top, key=top.get)
    return {"top1_match": int(torch.argmax(base_logits)) == best, "kl": max(kl, 0.0),
            "js": max(js, 0.0), "agreement_on": f"top-{len(top)}"}  # fmt: skip


# ---------------------------------------------------------------- the `guide` rule


def grid_cells(policy: str, settings: dict) -> list[dict]:
    """The (c, k, step size, budget) cells a policy runs: `never` and `always` one cell each; a
    statistic or random policy every (c, k, step) × budget target (or × fixed threshold); the
    structural one every (c, k, step), its fraction whatever the text gives."""
    if policy in ("never", "always"):
        return [{"c": 0 if policy == "never" else None, "k": 0 if policy == "never" else None,
                 "step_size": None,
                 "target": 0.0 if policy == "never" else 1.0, "threshold": None}]  # fmt: skip
    g = settings["grid"]
    base = [
        {"c": c, "k": k, "step_size": s} for c in g["c"] for k in g["k"] for s in g["step_size"]
    ]
    fixed = (settings.get("thresholds") or {}).get(policy)
    if policy == "structural":
        return [b | {"target": None, "threshold": None} for b in base]
    if fixed:
        return [b | {"target": None, "threshold": t} for b in base for t in fixed]
    return [b | {"target": f, "threshold": None} for b in base for f in settings["budgets"]]


def guided_job(base_handle, oracle_handle, data_path, policy_name: str, settings: dict,
               problems_path, cells_path, points_path, compute=None, threads=None,
               batch_size: int = 64, record_path=None, progress: bool = True,
               server: dict | None = None) -> dict:  # fmt: skip
    """One `guide` job: the base checkpoint consulting the oracle checkpoint under one policy over
    the first `max_prompts` rows of a dataset, for every cell of the grid (`grid_cells`), both
    models loaded once. Writes every problem of every cell (`problems_path`: the generation
    schema's graded columns, sources, consultations with their statistics), one row per cell
    (`cells_path`: accuracy with its Wilson interval, realised oracle-token fraction against its
    target, consultations) and one row per consultation point (`points_path`). `server`
    ({url, model, top_logprobs}): the oracle is that OpenAI-compatible server (its tokenizer is
    still the oracle handle's, checked against the base's) instead of loaded here."""
    import time

    import polars as pl
    import torch
    from tqdm import tqdm

    from reasonlab import compute as cp
    from reasonlab.data import read_dataset
    from reasonlab.generate import COLUMNS, GenOptions, render_prompts, to_frame
    from reasonlab.grading import grade_table, wilson
    from reasonlab.models import load_placed, load_tokenizer, read_handle

    if threads:
        torch.set_num_threads(threads)
    hb, ho = read_handle(base_handle), read_handle(oracle_handle)
    where = f"guided {hb.model}/{hb.ckpt} + {ho.model}/{ho.ckpt} {policy_name}"
    data = read_dataset(data_path)
    if settings.get("max_prompts"):
        data = data.head(settings["max_prompts"])
    machine, placement, base, tok = load_placed(hb, compute, where)
    oracle = remote = None
    if server:
        otok = load_tokenizer(ho)
        remote = ServerOracle(server["url"], server.get("model"), server.get("top_logprobs", 20),
                              key=f"guided.pairs[{ho.model}/{ho.ckpt}].server")  # fmt: skip
    else:
        _, _, oracle, otok = load_placed(ho, compute, where)
    check_tokenizers(tok, otok, f"{hb.model}/{hb.ckpt}", f"{ho.model}/{ho.ckpt}")
    opts = GenOptions(backend="transformers", template=settings.get("template") or "chat",
                      system=settings.get("system"), max_new_tokens=settings["max_new_tokens"])  # fmt: skip
    rows = data.to_dicts()
    prompts = render_prompts(rows, tok, opts)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    max_new, temp = settings["max_new_tokens"], float(settings.get("temperature") or 0.0)
    seed = int(settings.get("seed") or 0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def run(policy: Policy, stats: bool = False) -> list[dict]:
        out = []
        for s in range(0, len(ids), batch_size):
            out += guided_generate(base, oracle, tok, ids[s : s + batch_size], policy, max_new,
                                   temp, position_stats=stats, server=remote)  # fmt: skip
        return out

    t0 = time.perf_counter()
    base_stats = None
    cells = grid_cells(policy_name, settings)
    if policy_name in STATISTIC and any(c["target"] is not None for c in cells):
        free = run(Policy("never", seed=seed), stats=True)  # the base's own statistics
        base_stats = [s for r in free for s in r["position_stats"]]
    problems, summary, points = [], [], []
    bar = tqdm(cells, desc=where, unit="cell", disable=not progress, mininterval=2)
    for ci, cell in enumerate(bar):
        pol = cell_policy(policy_name, cell, settings)
        info = {"target": cell["target"], "runs": 1, "matched": None, "rate": None,
                "threshold": cell["threshold"]}  # fmt: skip
        if cell["target"] is not None and policy_name in (*STATISTIC, "random"):
            pol, res, info = calibrate(run, pol, cell["target"], base_stats or [], max_new,
                                       settings.get("calibration_runs", 6),
                                       settings.get("tolerance", 0.1))  # fmt: skip
        else:
            res = run(pol)
        name = _cell_name(policy_name, cell, info)
        # the attention statistics at the consultation points, from the finished traces
        queries = [[len(p) + c["position"] - 1 for c in r["consultations"]] for p, r in zip(ids, res, strict=True)]  # fmt: skip
        attn = attention_stats(base, [p + r["token_ids"] for p, r in zip(ids, res, strict=True)],
                               queries, settings.get("attention_layer", -1), pad)  # fmt: skip
        for r, a in zip(res, attn, strict=True):
            for c, x in zip(r["consultations"], a, strict=True):
                c.update(x)
        for i, r in enumerate(res):
            segs = segments(tok, r["token_ids"], r["source"])
            problems.append({"id": rows[i]["id"], "sample": 0, "prompt": prompts[i],
                             "completion": tok.decode(r["token_ids"]), "n_prompt_tokens": len(ids[i]),
                             "n_completion_tokens": len(r["token_ids"]), "finish_reason": r["finish_reason"],
                             "backend": "guided", "dtype": placement.dtype, "prompt_ids": ids[i],
                             "token_ids": r["token_ids"], "token_logprobs": None, "top_ids": None,
                             "top_logprobs": None, "_cell": name,
                             **{k: cell[k] for k in ("c", "k", "step_size")},
                             "oracle_mask": [s == "oracle" for s in r["source"]],
                             "segments": segs, "consultations": r["consultations"],
                             "n_consultations": r["n_consultations"], "oracle_tokens": r["oracle_tokens"],
                             "oracle_fraction": r["oracle_fraction"]})  # fmt: skip
        summary.append({"cell": name, "order": ci, **{k: cell[k] for k in ("c", "k", "step_size")},
                        "target": info["target"], "threshold": info["threshold"], "rate": info["rate"],
                        "calibration_runs": info["runs"], "matched": info["matched"]})  # fmt: skip
        log.info("%s %s: fraction %.3f (target %s), %d runs", where, name, realised_fraction(res),
                 info["target"], info["runs"])  # fmt: skip
    seconds = time.perf_counter() - t0
    raw = to_frame([{k: p[k] for k in COLUMNS} for p in problems])
    graded = grade_table(raw, data, settings.get("format") or "math")
    extra = pl.DataFrame(
        [{"cell": p["_cell"], "c": p["c"], "k": p["k"], "step_size": p["step_size"],
          "oracle_mask": p["oracle_mask"], "n_consultations": p["n_consultations"],
          "oracle_tokens": p["oracle_tokens"], "oracle_fraction": p["oracle_fraction"],
          "segments": json.dumps(p["segments"], ensure_ascii=False),
          "consultations": json.dumps(p["consultations"])} for p in problems],
        schema={"cell": pl.String, "c": pl.Int64, "k": pl.Int64, "step_size": pl.Int64,
                "oracle_mask": pl.List(pl.Boolean), "n_consultations": pl.Int64,
                "oracle_tokens": pl.Int64, "oracle_fraction": pl.Float64, "segments": pl.String,
                "consultations": pl.String},
    )  # fmt: skip
    ident = {
        "policy": policy_name,
        "base": f"{hb.model}/{hb.ckpt}",
        "oracle": f"{ho.model}/{ho.ckpt}",
    }
    table = pl.concat([graded, extra], how="horizontal").with_columns(
        **{k: pl.lit(v) for k, v in ident.items()}
    )
    keys = zip(table["cell"], table["id"], strict=True)
    correct = dict(zip(keys, table["correct"].fill_null(False), strict=True))
    out_cells = []
    for s in summary:
        part = table.filter(pl.col("cell") == s["cell"])
        n, k = part.height, int(part["correct"].fill_null(False).sum())
        lo, hi = wilson(k, n)
        frac = part["oracle_fraction"].mean() if n else None
        out_cells.append(ident | s | {"n": n, "accuracy": k / n if n else None, "ci_low": lo,
                         "ci_high": hi, "oracle_fraction": frac,
                         "oracle_tokens": part["oracle_tokens"].mean(),
                         "mean_tokens": part["n_completion_tokens"].mean(),
                         "consultations": part["n_consultations"].mean()})  # fmt: skip
    for p in problems:
        for c in p["consultations"]:
            points.append(ident | {"cell": p["_cell"], "id": p["id"],
                                   "correct": bool(correct[(p["_cell"], p["id"])])}
                          | {k: c.get(k) for k in POINT_COLUMNS})  # fmt: skip
    Path(problems_path).parent.mkdir(parents=True, exist_ok=True)
    table.write_parquet(problems_path)
    pl.DataFrame(out_cells, infer_schema_length=None).write_parquet(cells_path)
    pl.DataFrame(points, schema={**{k: pl.String for k in ("policy", "base", "oracle", "cell", "id")},
                                 "correct": pl.Boolean,
                                 **{k: getattr(pl, v) for k, v in POINT_SCHEMA.items()}}).write_parquet(points_path)  # fmt: skip
    rec = cp.record(placement, machine, "guide", base=ident["base"], oracle=ident["oracle"],
                    policy=policy_name, seconds=round(seconds, 2),
                    oracle_server=remote.url if remote else None)  # fmt: skip
    cp.write_record(rec, record_path)
    log.info("%s: %s", where, {c["cell"]: (round(c["accuracy"], 3), round(c["oracle_fraction"], 3))
                               for c in out_cells})  # fmt: skip
    return {"cells": out_cells, "seconds": seconds}


POINT_SCHEMA = {"position": "Int64", "trigger": "String", "entropy": "Float64",
                "varentropy": "Float64", "top1": "Float64", "top2_diff": "Float64",
                "top1_match": "Boolean", "kl": "Float64", "js": "Float64", "agreement_on": "String",
                "attn_entropy": "Float64", "attn_varentropy": "Float64",
                "interaction": "Float64", "attn_agreement": "Float64", "context": "Int64"}  # fmt: skip
POINT_COLUMNS = tuple(POINT_SCHEMA)


def cell_policy(name: str, cell: dict, settings: dict) -> Policy:
    """A grid cell's policy (a statistic policy to be calibrated starts at threshold 0)."""
    rand = settings.get("random") or {}
    threshold = None
    if name in STATISTIC:
        threshold = cell["threshold"] if cell["threshold"] is not None else 0.0
    return Policy(name, c=cell["c"] or 0, k=cell["k"] or 8, step_size=cell["step_size"] or 8,
                  threshold=threshold, p0=rand.get("p0", 0.05), slope=rand.get("slope", 0.002),
                  words=tuple((settings.get("structural") or {}).get("words") or Policy.words),
                  seed=int(settings.get("seed") or 0))  # fmt: skip


def _cell_name(policy: str, cell: dict, info: dict) -> str:
    """A cell's label: policy, c, k, step and its budget target or threshold."""
    if policy in ("never", "always"):
        return policy
    name = f"{policy} c={cell['c']} k={cell['k']} s={cell['step_size']}"
    if cell["target"] is not None:
        return f"{name} @{cell['target']:g}"
    if cell["threshold"] is not None:
        return f"{name} t={cell['threshold']:g}"
    return name


# ---------------------------------------------------------------- seed 004's files


def seed004_lines(problems) -> list[dict]:
    """A guide job's problems table as seed 004's JSONL records (`eval.py` + `stats_analysis.py`
    fields): c, k, base_model_id, oracle_model_id, prompt, result, ground_truth, parsed_answer,
    interleaved_outputs, cheat_positions, total_tokens_generated, analysis_result (per
    consultation: position, entropy, varentropy, top_prob, prob_top2_diff, attn_entropy,
    attn_varentropy, agreement — entropix's, the heads' agreement on where to attend —,
    interaction_strength) and acc; plus reasonlab's policy, cell, step_size and oracle_fraction.
    `c` and `k` are null for the oracle alone (seed 004's ∞)."""
    out = []
    for r in problems.iter_rows(named=True):
        cons = json.loads(r["consultations"] or "[]")
        out.append({
            "c": r["c"], "k": r["k"], "step_size": r["step_size"], "policy": r["policy"],
            "cell": r["cell"],
            "base_model_id": r["base"], "oracle_model_id": r["oracle"], "id": r["id"],
            "prompt": r["prompt"], "result": r["completion"], "ground_truth": r["reference"],
            "parsed_answer": r["answer"],
            "interleaved_outputs": [{"source": s["source"], "text": s["text"]}
                                    for s in json.loads(r["segments"] or "[]")],
            "cheat_positions": [x["position"] for x in cons],
            "total_tokens_generated": r["n_completion_tokens"],
            "oracle_fraction": r["oracle_fraction"],
            "analysis_result": [{
                "position": x["position"], "entropy": x.get("entropy"),
                "varentropy": x.get("varentropy"), "top_prob": x.get("top1"),
                "prob_top2_diff": x.get("top2_diff"), "attn_entropy": x.get("attn_entropy"),
                "attn_varentropy": x.get("attn_varentropy"), "agreement": x.get("attn_agreement"),
                "interaction_strength": x.get("interaction")} for x in cons],
            "acc": int(bool(r["correct"])),
        })  # fmt: skip
    return out


def export_seed004(problems_path, out_path) -> int:
    """Write a guide job's problems as seed 004's JSONL (atomically); returns the lines."""
    import os

    import polars as pl

    lines = seed004_lines(pl.read_parquet(problems_path))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    os.replace(tmp, out)
    return len(lines)
