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

Status: the library loop with its policies, budget accounting, agreement at consultation points
and quantile thresholds (tested). Not yet built: the workflow rule, the server oracle backend, the
attention statistics at consultation points, the report (see the issue's closing note).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from reasonlab import ReasonlabError

POLICIES = ("never", "always", "random", "entropy", "varentropy", "top1", "structural")


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
                    position_stats: bool = False) -> list[dict]:  # fmt: skip
    """Generate a completion of every prompt (token ids) with the base consulting the oracle under
    `policy`. Per row: tokens, their source, the consultations (position, the base's next-token
    statistics there, the base–oracle agreement), oracle tokens, the oracle-token fraction, the
    finish reason; with `position_stats`, the base's statistics at every position it wrote (for
    `quantile_threshold`)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    n = len(prompts)
    b, o = Stream(base, pad, n), Stream(oracle, pad, n)
    b.feed([list(p) for p in prompts])
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
        return torch.full(st["entropy"].shape, always, dtype=torch.bool, device=st["entropy"].device)

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
        o.sync()
        for r in sorted(triggered):  # where the two models stand before the oracle writes
            rows[r].consultations[-1].update(agreement(b.last[r], o.last[r]))
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
