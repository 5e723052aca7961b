"""Guided inference: reasonlab's batched, cached loop against a seed-004-style loop.

    make demo                                    # once: the trained demo checkpoints
    .venvs/core/bin/python benchmarks/guided_throughput.py [--problems 60] [--runs 3]

One grid cell (an entropy trigger fired at the base's own 0.9 quantile, c = 4, k = 8, step 8,
greedy, 64 new tokens) over `--problems` demo problems, on (1) the trained demo pair — base
`tiny/step-200`, oracle `tiny/final` (from `make demo`'s results/training/tiny-pt/output) — and
(2) a random Qwen2 of a realistic shape (8 layers, hidden 512, the 151 936-token vocabulary) as
both base and oracle. (a) The seed-style loop: one problem at a time; every base step and every
oracle chunk is a fresh `generate` call on the whole prefix (a cache inside the call, none across
calls), which is what seed 004's calls to its servers amount to; the entropy is read from the
step's scores and the step cut where it fires. (b) `reasonlab.guided.guided_generate`: every
problem in one batch, one KV cache per model kept across rounds. Timed after load and warm-up,
median of `--runs` alternating runs, 2 threads; `identical`: the same tokens from both loops on
the trained pair (random weights have near-ties that batching may flip). The last line is one
JSON object.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from workers import alternate, demo_and_large_models, demo_prompts  # benchmarks/workers.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def seed_style(base, oracle, prompts, threshold, c, k, step, max_new, eos, device="cpu"):
    """One problem at a time; fresh `generate` calls on the full prefix for every step and chunk."""
    import torch

    from reasonlab.guided import next_token_stats

    out = []
    for p in prompts:
        toks, used = [], 0
        while len(toks) < max_new and (not toks or toks[-1] != eos):
            ids = torch.tensor([p + toks], device=device)
            n = min(step, max_new - len(toks))
            with torch.no_grad():
                g = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  do_sample=False, output_scores=True, return_dict_in_generate=True,
                                  pad_token_id=eos)  # fmt: skip
            new = g.sequences[0, ids.shape[1] :].tolist()
            cut = None
            for j, score in enumerate(g.scores[: len(new)]):
                if used < c and next_token_stats(score[0])["entropy"] > threshold:
                    cut = j
                    break
            if cut is None:
                toks += new
                continue
            toks += new[:cut]
            if eos in toks:
                break
            used += 1
            ids = torch.tensor([p + toks], device=device)
            with torch.no_grad():
                o = oracle.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=min(k, max_new - len(toks)), do_sample=False,
                                    pad_token_id=eos)  # fmt: skip
            toks += o[0, ids.shape[1] :].tolist()
        if eos in toks:
            toks = toks[: toks.index(eos) + 1]
        out.append(toks[:max_new])
    return out


def run_pair(base_dir, oracle_dir, prompts, a, check: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasonlab.guided import Policy, guided_generate, quantile_threshold

    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval().to(a.device)
    oracle = (
        AutoModelForCausalLM.from_pretrained(oracle_dir, dtype=torch.float32).eval().to(a.device)
    )
    eos = tok.eos_token_id
    free = guided_generate(
        base, oracle, tok, prompts, Policy("never"), a.max_new, position_stats=True
    )
    threshold = quantile_threshold([s for r in free for s in r["position_stats"]], "entropy", 0.1)
    policy = Policy("entropy", c=4, k=8, step_size=8, threshold=threshold)

    def ours():
        return [
            r["token_ids"] for r in guided_generate(base, oracle, tok, prompts, policy, a.max_new)
        ]

    def seed():
        return seed_style(base, oracle, prompts, threshold, 4, 8, 8, a.max_new, eos, a.device)

    ours(), seed()  # warm-up
    times, got = alternate({"reasonlab": ours, "seed_style": seed}, a.runs, a.device)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = sum(len(t) for t in got["reasonlab"])
    same = sum(x == y for x, y in zip(got["reasonlab"], got["seed_style"], strict=True))
    res = {"tokens": tokens, "threshold": round(threshold, 4),
           "reasonlab_s": round(med["reasonlab"], 3), "seed_style_s": round(med["seed_style"], 3),
           "ratio": round(med["seed_style"] / med["reasonlab"], 2),
           "identical_rows": f"{same}/{len(prompts)}"}  # fmt: skip
    if check:
        res["identical"] = same == len(prompts)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=60)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (float32)")
    ap.add_argument("--pairs", nargs="+", default=["demo", "large"], choices=["demo", "large"])
    ap.add_argument("--base", default=str(ROOT / "results/training/tiny-pt/output/checkpoint-200"))
    ap.add_argument("--oracle", default=str(ROOT / "results/training/tiny-pt/output"))
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    results = {}
    if "demo" not in a.pairs:
        pass
    elif Path(a.base).is_dir() and Path(a.oracle).is_dir():
        prompts = demo_prompts(a.oracle, a.problems)
        results["demo_pair"] = run_pair(a.base, a.oracle, prompts, a, check=True)
        print(f"trained demo pair: {results['demo_pair']}", flush=True)
    else:
        print(f"no trained demo pair at {a.base} / {a.oracle}: run `make demo` first", flush=True)
    if "large" in a.pairs:
        with tempfile.TemporaryDirectory() as tmp:
            models = demo_and_large_models(Path(tmp))
            prompts = demo_prompts(str(models["large"]), a.problems)
            results["large"] = run_pair(models["large"], models["large"], prompts, a, check=False)
            print(f"hidden-512 x 8-layer pair: {results['large']}", flush=True)
    head = results.get("demo_pair") or results.get("large") or {}
    results["device"] = a.device
    print(json.dumps({"ratio": head.get("ratio"), "identical": results.get("demo_pair", {}).get("identical"),
                      "large_ratio": results.get("large", {}).get("ratio"), **results}))  # fmt: skip


if __name__ == "__main__":
    main()
