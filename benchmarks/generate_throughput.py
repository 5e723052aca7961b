"""Generation throughput on the demo model and eval set: vLLM vs transformers (batched) vs the
seeds' one-prompt-at-a-time `generate`, in one run. Run it with the gen environment's Python:

    .venvs/gen/bin/python benchmarks/generate_throughput.py [--prompts 60] [--max-new-tokens 96]

Builds the demo tokenizer and a tiny model (random init unless --model points at a trained one),
generates greedily with each way, and checks that all three produce the same tokens. On a machine
with CUDA every way runs on the GPU (`--dtype`, default float32: the three must give the same
tokens). Everything the engines log goes to stderr; stdout gets only the JSON object, as its last
(and only) line, also after vLLM's shutdown.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main():
    # stdout is kept for the JSON line: the engines' logs (vLLM writes to stdout, also at exit) go
    # to stderr
    result_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    result = run()
    result_out.write(json.dumps(result) + "\n")
    result_out.flush()


def run() -> dict:
    import torch

    from reasonlab import compute as cp
    from reasonlab import demo, synth
    from reasonlab.generate import GenOptions, TransformersBackend, VllmBackend
    from reasonlab.models import load_model, resolve

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--prompts", type=int, default=60)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", help="a model directory (default: a fresh random demo model)")
    p.add_argument("--dtype", default="float32", choices=cp.DTYPES[1:])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = synth.build_demo_data(0, synth.DemoSizes())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            demo.build_tokenizer(synth.corpus_texts(data), Path(tmp) / "tok")
            demo.build_tiny_model(
                Path(tmp) / "tok", Path(tmp) / "model", demo.TinyModelSpec(), seed=0
            )
            model_dir = str(Path(tmp) / "model")
        h = resolve(
            "bench",
            "base",
            {"source": model_dir, "checkpoints": {"base": None}, "dtype": "float32"},
        )
        machine = cp.Machine.detect()
        req = cp.request({"dtype": args.dtype}, {}, "generation", None, "bench", len(machine.gpus))
        placement = cp.resolve(req, machine, cp.checkpoint_dtype(model_dir))
        _, tok = load_model(h)
        prompts = [synth.chatml(None, r["problem"]) for r in data["eval"][: args.prompts]]
        # ignore_eos would need backend-specific flags; greedy with a fixed budget is compared as is
        opts = GenOptions(max_new_tokens=args.max_new_tokens, batch_size=args.prompts)

        t0 = time.perf_counter()
        vllm = VllmBackend(h, opts, placement)
        start = time.perf_counter() - t0
        vllm.generate(prompts[:4])  # warm-up
        t0 = time.perf_counter()
        v_out = vllm.generate(prompts)
        v_s = time.perf_counter() - t0
        vllm.close()
        del vllm

        hf = TransformersBackend(h, opts, placement)
        t0 = time.perf_counter()
        t_out = hf.generate(prompts)
        t_s = time.perf_counter() - t0

        model = hf.model
        t0 = time.perf_counter()
        s_out = []
        with torch.inference_mode():
            for prompt in prompts:  # the seeds' way: one prompt at a time
                ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
                ids = ids.to(hf.device)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                     do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
                new = out[0, ids.shape[1] :].tolist()
                s_out.append(
                    new[
                        : next(
                            (k + 1 for k, t in enumerate(new) if t == tok.eos_token_id), len(new)
                        )
                    ]
                )
        s_s = time.perf_counter() - t0

    v_tokens = [s[0]["token_ids"] for s in v_out]
    t_tokens = [s[0]["token_ids"] for s in t_out]
    n = sum(map(len, v_tokens))
    result = {
        "prompts": len(prompts),
        "completion_tokens": n,
        "vllm_tokens_per_s": round(n / v_s, 1),
        "transformers_tokens_per_s": round(sum(map(len, t_tokens)) / t_s, 1),
        "seed_style_tokens_per_s": round(sum(map(len, s_out)) / s_s, 1),
        "vllm_startup_s": round(start, 1),
        "same_tokens_vllm_transformers": v_tokens == t_tokens,
        "same_tokens_transformers_seed_style": t_tokens == s_out,
        "device": placement.device,
        "dtype": placement.dtype,
        "gpu": machine.gpus[0].name if placement.on_gpu else None,
    }
    print(f"vLLM {result['vllm_tokens_per_s']} tok/s (start-up {start:.0f} s), transformers batched "
          f"{result['transformers_tokens_per_s']} tok/s, seed-style {result['seed_style_tokens_per_s']} tok/s", file=sys.stderr, flush=True)  # fmt: skip
    return result


if __name__ == "__main__":
    main()
