"""Throughput and exactness of `reasonlab.score` against the way the seeds compute the same numbers.

    .venvs/core/bin/python benchmarks/score_throughput.py [--texts 160] [--threads 2]

On the demo texts (the training pool: chat prompt + worked solution), under (1) the demo model and
(2) a larger randomly initialised Qwen2 model (8 layers, hidden 512, ~17M parameters, where compute
rather than framework overhead dominates), it computes the per-token statistics

  (a) seed-style: one text at a time, one forward pass, then a Python loop over the completion's
      positions with a softmax, entropy, varentropy, rank and top-2 per step (seed 002's loop);
  (b) with `reasonlab.score.score_items` (length-sorted, token-budget batches, vectorized);

and prints tokens/s of each (for (b) with `compile=True`, the headline figures, and without it,
the `eager_*` figures; compilation time is reported apart), their ratio, the largest absolute difference of every statistic, and
the fraction of this machine's measured matmul FLOP/s that (b) reaches. It also compares sequence
log-likelihoods with a straightforward batched implementation that encodes prompt + completion
jointly and takes len(tokenize(prompt)) as the boundary (a common shortcut), to show how much the
tokenization boundary moves the numbers. The last line is one JSON object.
"""

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from reasonlab import demo, synth  # noqa: E402
from reasonlab.score import ScoreOptions, TextItem, score_items  # noqa: E402

LARGE = demo.TinyModelSpec(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=1024,
)
STATS = ("logprob", "entropy", "varentropy", "margin", "top1_prob")


def matmul_flops(seconds: float = 1.0, rounds: int = 3) -> float:
    """This machine's fp32 matmul FLOP/s (torch, current thread count): the best rate over a few
    timed windows and matrix sizes, so that a busy moment does not lower the roofline."""
    best = 0.0
    for _ in range(rounds):
        for n in (512, 1024, 2048):
            a, b = torch.randn(n, n), torch.randn(n, n)
            a @ b
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                a @ b
                reps += 1
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def step_stats(it_id, step_logits, c):
    """Seed 002's per-step statistics: a softmax, entropy, varentropy, rank and top-2 per position."""
    rows = []
    for step, logits in enumerate(step_logits, 1):
        probs = torch.softmax(logits, dim=-1)
        logp = torch.log(probs)
        entropy = -(probs * logp).sum().item()
        varentropy = (probs * (-logp - entropy) ** 2).sum().item()
        tok_id = c[step - 1]
        sorted_p, sorted_i = torch.sort(probs, descending=True)
        rank = int((sorted_i == tok_id).nonzero()[0]) + 1
        rows.append((it_id, step, math.log(probs[tok_id].item()), entropy, varentropy,
                     (sorted_p[0] - sorted_p[1]).item(), sorted_p[0].item(), rank))  # fmt: skip
    return rows


class ForceTokens:
    """A logits processor that makes generate() emit the given tokens (the text being scored)."""

    def __init__(self, tokens, prompt_len):
        self.tokens, self.prompt_len = tokens, prompt_len

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[input_ids.shape[1] - self.prompt_len]] = 0.0
        return forced


def seed_generate(model, tok, items):
    """Seed 002's way: one prompt at a time, generate() with the step logits, statistics per step.
    The generated tokens are forced to the text's, so that the same tokens are scored."""
    rows = []
    with torch.no_grad():
        for it in items:
            p = tok(it.prompt, add_special_tokens=False)["input_ids"]
            c = tok(it.completion, add_special_tokens=False)["input_ids"]
            out = model.generate(
                input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=len(c), min_new_tokens=len(c), do_sample=False, output_logits=True,
                return_dict_in_generate=True, logits_processor=[ForceTokens(c, len(p))],
                pad_token_id=tok.pad_token_id, eos_token_id=None,
            )  # fmt: skip
            assert out.sequences[0, len(p) :].tolist() == c
            rows.extend(step_stats(it.id, [lg[0] for lg in out.logits], c))
    return rows


def seed_forward(model, tok, items):
    """Seed 003's way: one text at a time, one forward pass, then the per-step statistics loop."""
    rows = []
    with torch.no_grad():
        for it in items:
            p = tok(it.prompt, add_special_tokens=False)["input_ids"]
            c = tok(it.completion, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([p + c])).logits[0]
            rows.extend(step_stats(it.id, logits[len(p) - 1 : -1], c))
    return rows


def naive_batched_llh(model, tok, items, batch=16):
    """Length-sorted batches, joint encoding, boundary = number of tokens of the prompt alone."""
    out = {}
    order = sorted(items, key=lambda it: -len(it.prompt + it.completion))
    with torch.no_grad():
        for s in range(0, len(order), batch):
            chunk = order[s : s + batch]
            enc = tok(
                [it.prompt + it.completion for it in chunk],
                add_special_tokens=False,
                padding=True,
                return_tensors="pt",
            )
            lp = torch.log_softmax(model(**enc).logits.float(), -1)
            for r, it in enumerate(chunk):
                n_p = len(tok(it.prompt, add_special_tokens=False)["input_ids"])
                n = int(enc["attention_mask"][r].sum())
                ids = enc["input_ids"][r, n_p:n]
                out[it.id] = float(lp[r, n_p - 1 : n - 1].gather(-1, ids[:, None]).sum())
    return out


def flops_per_token(model, mean_len: float, scored_fraction: float) -> float:
    """Forward FLOPs per processed token: 2 x matmul parameters of the body, the output head on the
    scored share of tokens, and attention scores/values over the mean causal context."""
    cfg = model.config
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    body_matmul = body if model.config.tie_word_embeddings else body - head
    attention = 4 * cfg.num_hidden_layers * cfg.hidden_size * (mean_len / 2)
    return 2 * body_matmul + 2 * head * scored_fraction + attention


def compare(tokens, rows):
    """Largest absolute difference of each statistic, and rank mismatches (near-ties), vs seed rows."""
    ref = {(r[0], r[1]): r for r in rows}
    mine = tokens.filter(tokens["id"].is_in(list({r[0] for r in rows})))
    assert len(ref) == mine.height, "both ways must score the same tokens"
    diffs, mismatches = dict.fromkeys(STATS, 0.0), 0
    for r in mine.iter_rows(named=True):
        b = ref[(r["id"], r["position"])]
        for k, v in zip(STATS, b[2:7], strict=True):
            diffs[k] = max(diffs[k], abs(r[k] - v))
        mismatches += r["rank"] != b[7]
    return diffs, mismatches


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def run(model_dir, items, boundary_items, label, peak, baseline_texts, token_budget):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lengths = [
        len(tok(it.prompt + it.completion, add_special_tokens=False)["input_ids"]) for it in items
    ]
    n_tokens = sum(lengths)

    opts = ScoreOptions(progress=False, token_budget=token_budget)
    score_items(model, tok, items[:8], opts)  # warm-up
    (tokens, seqs), eager = timed(score_items, model, tok, items, opts)
    compiled_opts = ScoreOptions(progress=False, token_budget=token_budget, compile=True)
    _, compile_s = timed(score_items, model, tok, items[:8], compiled_opts)  # pays the compilation
    (ctokens, _), fast = timed(score_items, model, tok, items, compiled_opts)
    compiled_diff = float((ctokens["entropy"] - tokens["entropy"]).abs().max())

    sub = items[:baseline_texts]
    sub_tokens = sum(lengths[: len(sub)])
    gen_rows, gen_s = timed(seed_generate, model, tok, sub)
    fwd_rows, fwd_s = timed(seed_forward, model, tok, sub)
    diffs, mismatches = compare(tokens, gen_rows)
    compiled_diffs, _ = compare(ctokens, gen_rows)
    diffs = {k: max(diffs[k], compiled_diffs[k]) for k in diffs}  # both ways must be exact
    diffs_fwd, _ = compare(tokens, fwd_rows)

    # the tokenization boundary: separate encoding vs joint encoding, on prompts that end in a space
    _, sep = score_items(model, tok, boundary_items, ScoreOptions(progress=False))
    _, joint = score_items(
        model, tok, boundary_items, ScoreOptions(progress=False, boundary="joint")
    )
    naive = naive_batched_llh(model, tok, boundary_items)
    sep_llh = dict(zip(sep["id"], sep["llh_sum"], strict=True))
    joint_diff = [abs(a - b) for a, b in zip(joint["llh_sum"], sep["llh_sum"], strict=True)]
    naive_diff = [abs(naive[i] - sep_llh[i]) for i in sep_llh]
    naive_vs_joint = max(
        abs(naive[i] - j) for i, j in zip(joint["id"], joint["llh_sum"], strict=True)
    )

    scored = tokens.height / n_tokens
    fpt = flops_per_token(model, statistics.mean(lengths), scored)
    tps, gen_tps, fwd_tps = n_tokens / fast, sub_tokens / gen_s, sub_tokens / fwd_s
    eager_tps = n_tokens / eager
    result = {
        "model": label,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.config.vocab_size,
        "texts": len(items),
        "tokens": n_tokens,
        "token_budget": token_budget,
        "tokens_per_s": round(tps, 1),
        "baseline_tokens_per_s": round(gen_tps, 1),
        "ratio": round(tps / gen_tps, 1),
        "compile_seconds": round(compile_s, 1),
        "compiled_vs_eager_max_entropy_diff": compiled_diff,
        "eager_tokens_per_s": round(eager_tps, 1),
        "eager_ratio": round(eager_tps / gen_tps, 1),
        "eager_roofline_fraction": None,
        "seed_forward_tokens_per_s": round(fwd_tps, 1),
        "ratio_vs_seed_forward": round(tps / fwd_tps, 1),
        "max_abs_diff": max(diffs.values()),
        "max_abs_diff_by_stat": diffs,
        "max_abs_diff_vs_seed_forward": max(diffs_fwd.values()),
        "rank_mismatches": mismatches,
        "flops_per_token": round(fpt),
        "roofline_fraction": round(fpt * tps / peak, 3),
        "boundary_texts": len(boundary_items),
        "llh_joint_vs_separate_max_nats": round(max(joint_diff), 3),
        "llh_joint_vs_separate_mean_nats": round(statistics.mean(joint_diff), 3),
        "llh_shortcut_vs_separate_max_nats": round(max(naive_diff), 3),
        "llh_shortcut_vs_joint_max_nats": round(naive_vs_joint, 3),
    }
    result["eager_roofline_fraction"] = round(fpt * eager_tps / peak, 3)
    print(f"[{label}] {result['parameters'] / 1e6:.1f}M params, {n_tokens} tokens: reasonlab {tps:.0f} tok/s "
          f"(compiled; eager {eager_tps:.0f}, {result['eager_ratio']}x); "
          f"seed generate() {gen_tps:.0f} tok/s ({result['ratio']}x); seed forward+loop {fwd_tps:.0f} tok/s "
          f"({result['ratio_vs_seed_forward']}x); max |diff| {result['max_abs_diff']:.2e}; roofline "
          f"{result['roofline_fraction']:.2f}; joint vs separate boundary: up to "
          f"{result['llh_joint_vs_separate_max_nats']} nats", flush=True)  # fmt: skip
    return result


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--texts", type=int, default=160)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--baseline-texts", type=int, default=40, help="texts timed the seed ways (they are slow)"
    )
    p.add_argument("--token-budget", type=int, default=ScoreOptions().token_budget)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = synth.build_demo_data(0, synth.DemoSizes())
    items = [
        TextItem(str(i), synth.chatml(None, f"{r['instruction']}\n{r['input']}"), r["output"])
        for i, r in enumerate(data["pool"][: args.texts])
    ]
    # prompts that end in a space, so a token can straddle the prompt/completion boundary
    boundary_items = [
        TextItem(f"b{i}", f"Question: {r['input']}\nAnswer: ", r["output"].split("</think>\n")[-1])
        for i, r in enumerate(data["pool"][: args.texts])
    ]
    peak = matmul_flops()
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo.build_tokenizer(synth.corpus_texts(data), tmp / "tok")
        demo.build_tiny_model(tmp / "tok", tmp / "demo", demo.TinyModelSpec(), seed=0)
        demo.build_tiny_model(tmp / "tok", tmp / "large", LARGE, seed=0)
        common = (items, boundary_items)
        small = run(tmp / "demo", *common, "demo", peak, args.baseline_texts, args.token_budget)
        large = run(tmp / "large", *common, "large", peak, args.baseline_texts, args.token_budget)
    out = {
        k: large[k]
        for k in (
            "tokens_per_s",
            "baseline_tokens_per_s",
            "ratio",
            "max_abs_diff",
            "roofline_fraction",
        )
    }
    out.update(matmul_gflops=round(peak / 1e9, 1), large=large, demo=small)
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
