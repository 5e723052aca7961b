"""Steered and ablated generation against plain batched generation, side by side.

    .venvs/core/bin/python benchmarks/intervention_throughput.py [--prompts 64] [--runs 3]
    bash envs/setup.sh peers   # optional: adds nnsight 0.8 steering (.venvs/peers) to the comparison

Batched greedy generation with the transformers backend (KV cache, left padding, a fixed number of
new tokens per prompt) over chat-formatted demo problems, under (1) the demo model and (2) a
randomly initialised Qwen2 with 8 layers, hidden 512 and a real 151 936-token vocabulary. Each
setting runs in its own process with the same threads, batch size and prompts: plain generation;
steering at one layer (`reasonlab.intervene.InterventionHandler`: a vector added to the layer's
input in the prompt pass and at every decode step); directional ablation at every layer
(`DirectionAblator`: the direction projected out of every layer's input, attention and MLP output
and the last layer's output); and, when the peers environment exists, the same steering through
nnsight's `generate` with `tracer.iter[:new_tokens]`. Timed after load and warm-up, median of `--runs` alternating
runs. The last line is one JSON object with `steer_ratio` and `ablate_ratio` (hooked tokens/s ÷
plain tokens/s, on the large model).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from workers import (  # benchmarks/workers.py
    VOCAB,
    Worker,
    demo_and_large_models,
    demo_prompts,
    rss_mb,
)

ROOT = Path(__file__).resolve().parents[1]
PEERS_PY = ROOT / ".venvs" / "peers" / "bin" / "python"
KINDS = ("plain", "steer", "ablate")


def worker(kind, model_dir, prompts_file, threads, batch, new_tokens) -> None:
    """Serve `run` on stdin: generate for every prompt, answer seconds and the first sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = json.loads(Path(prompts_file).read_text())
    hidden, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    direction = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    direction = 0.01 * direction / direction.norm()  # small: the tokens stay comparable
    layer = n_layers // 2
    batches = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]

    def left_padded(b):
        width = max(map(len, b))
        ids = torch.zeros((len(b), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(b):
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        return ids, mask

    def gen(b):
        ids, mask = left_padded(b)
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  pad_token_id=0)[:, ids.shape[1]:]  # fmt: skip

    if kind == "nnsight":
        from nnsight import LanguageModel
        from transformers import AutoTokenizer

        lm = LanguageModel(model, tokenizer=AutoTokenizer.from_pretrained(model_dir))
        vec = direction

        def one(b):
            ids, mask = left_padded(b)
            with lm.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0) as tracer:  # fmt: skip
                for _ in tracer.iter[:new_tokens]:  # every step: the prompt pass, each decode step
                    site = lm.model.layers[layer]
                    site.input = site.input + vec
                out = tracer.result.save()
            return out[:, ids.shape[1] :]
    else:
        sys.path.insert(0, str(ROOT / "src"))
        from reasonlab.intervene import DirectionAblator, InterventionHandler

        def one(b):
            if kind == "steer":
                with InterventionHandler(model, direction, [layer], strength=1.0):
                    return gen(b)
            if kind == "ablate":
                with DirectionAblator(model, direction):
                    return gen(b)
            return gen(b)

    def run(bs):
        return [one(b) for b in bs]

    run(batches[:1])  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            t0 = time.perf_counter()
            outs = run(batches)
            seconds = time.perf_counter() - t0
            n_tokens = sum(int(o.numel()) for o in outs)
            out = {"seconds": seconds, "tokens": n_tokens, "first": outs[0][0].tolist()}
        else:
            out = {"rss_mb": rss_mb()}
        print(json.dumps(out), flush=True)


def compare(model_dir, label, n, runs, threads, batch, new_tokens, peers) -> dict:
    med = statistics.median
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(demo_prompts(model_dir, n), f)
    kinds = list(KINDS) + (["nnsight"] if peers and PEERS_PY.exists() else [])
    ws = {k: Worker([PEERS_PY if k == "nnsight" else sys.executable, __file__, "--worker", k,
                     "--model", model_dir, "--prompts-file", f.name, "--threads", threads,
                     "--batch", batch, "--new-tokens", new_tokens]) for k in kinds}  # fmt: skip
    rates = {k: [] for k in kinds}
    firsts = {}
    for r in range(runs):
        for k in kinds if r % 2 == 0 else kinds[::-1]:
            a = ws[k].ask("run")
            rates[k].append(a["tokens"] / a["seconds"])
            firsts[k] = a["first"]
    rss = {k: w.close()["rss_mb"] for k, w in ws.items()}
    row = {"model": label, "prompts": n, "batch_size": batch, "new_tokens": new_tokens,
           "threads": threads, "runs": runs}  # fmt: skip
    row |= {f"{k}_tokens_per_s": round(med(rates[k]), 1) for k in kinds}
    row |= {f"{k}_peak_rss_mb": round(rss[k]) for k in kinds}
    row["steer_ratio"] = round(med(rates["steer"]) / med(rates["plain"]), 3)
    row["ablate_ratio"] = round(med(rates["ablate"]) / med(rates["plain"]), 3)
    if "nnsight" in kinds:
        row["nnsight_steer_ratio"] = round(med(rates["nnsight"]) / med(rates["plain"]), 3)
        row["steer_vs_nnsight"] = round(med(rates["steer"]) / med(rates["nnsight"]), 2)
        row["nnsight_same_tokens"] = firsts["nnsight"] == firsts["steer"]
    print(f"[{label}] {row}", file=sys.stderr, flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-peers", action="store_true", help="leave nnsight out")
    p.add_argument("--worker", choices=[*KINDS, "nnsight"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.model, a.prompts_file, a.threads, a.batch, a.new_tokens)
    sys.path.insert(0, str(ROOT / "src"))
    models = demo_and_large_models(Path(tempfile.mkdtemp()))
    results = {
        label: compare(
            path, label, a.prompts, a.runs, a.threads, a.batch, a.new_tokens, not a.no_peers
        )
        for label, path in models.items()
    }
    big = results["large"]
    summary = {
        "steer_ratio": big["steer_ratio"],
        "ablate_ratio": big["ablate_ratio"],
        "tokens_per_s": big["plain_tokens_per_s"],
        "nnsight_steer_ratio": big.get("nnsight_steer_ratio"),
        "vocab": VOCAB,
    }
    print(json.dumps(summary | results, default=str))


if __name__ == "__main__":
    main()
