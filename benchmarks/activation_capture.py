"""Activation capture: reasonlab against a plain `output_hidden_states` loop and nnsight, side by side.

    bash envs/setup.sh peers                     # once: nnsight 0.8 in .venvs/peers
    .venvs/core/bin/python benchmarks/activation_capture.py [--prompts 500 4000] [--runs 3]

Every layer's residual stream (the input of each decoder layer and the last layer's output) at
the last prompt token of chat-formatted demo problems, under (1) the demo model and (2) a randomly
initialised Qwen2 with 8 layers, hidden 512 and a real 151 936-token vocabulary. Each method runs
in its own process with the same threads and the same batch size over the same prompts (left
padded): (a) `reasonlab.activations.capture` into a fresh store (its shards written to disk), (b) a
loop calling the model with `output_hidden_states=True` and keeping every batch's last-token
states in memory, (c) nnsight's `trace` with one `.save()` per layer (from the optional peers
environment). Both peers run the whole model, output head included; capture stops after the
deepest requested layer. Timed after load and warm-up, median of `--runs` alternating runs, for
each prompt count; peak RSS is each worker's own (VmHWM), per prompt count in fresh workers. The
peers run at the smallest prompt count only unless `--peers-at-all` (on 2 CPU threads the large
model's head makes 4 000 prompts take minutes per run). The last line is one JSON object.
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


def worker(kind: str, model_dir: str, prompts_file: str, threads: int, batch: int) -> None:
    """Serve `run` on stdin: capture every prompt, answer seconds and a checksum row."""
    import shutil

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = json.loads(Path(prompts_file).read_text())
    n_layers = model.config.num_hidden_layers
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def left_padded(batch_ids):
        width = max(map(len, batch_ids))
        ids = torch.full((len(batch_ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(batch_ids):
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        return ids, mask

    if kind == "reasonlab":
        sys.path.insert(0, str(ROOT / "src"))
        from reasonlab.activations import CaptureOptions, Store, Text, capture, index_frame, load

        texts = [Text(str(i), p, len(p)) for i, p in enumerate(prompts)]
        opts = CaptureOptions(positions=["last_prompt"], batch_size=batch, padding_side="left",
                              progress=False)  # fmt: skip
        tmp = Path(tempfile.mkdtemp())

        def run(items):
            store = tmp / "store"
            shutil.rmtree(store, ignore_errors=True)
            res = capture(model, tok, items, Store(store), opts)
            # the first text's vector, for the cross-check (read back from the store)
            return load(index_frame(items[:1], res["index"]), store, "last_prompt")[0]

        warm = lambda: run(texts[:batch])  # noqa: E731
        full = lambda: run(texts)  # noqa: E731
    else:
        batches = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        if kind == "nnsight":
            import nnsight
            from nnsight import LanguageModel

            lm = LanguageModel(model, tokenizer=tok)

        def run(bs):
            kept = []
            for b in bs:
                ids, mask = left_padded(b)
                if kind == "hidden_states":
                    with torch.inference_mode():
                        hs = model(input_ids=ids, attention_mask=mask,
                                   output_hidden_states=True).hidden_states  # fmt: skip
                    # every layer's input, then the last layer's output (before the final norm)
                    kept.append(torch.stack([h[:, -1] for h in hs[:n_layers]], 1))
                else:
                    with (
                        torch.inference_mode(),
                        lm.trace({"input_ids": ids, "attention_mask": mask}),
                    ):
                        saved = nnsight.save([])  # nnsight 0.8: save the container, append
                        for i in range(n_layers):
                            saved.append(lm.model.layers[i].input[:, -1])
                    kept.append(torch.stack(list(saved), 1))
            return torch.cat(kept)[0].numpy()

        warm = lambda: run(batches[:1])  # noqa: E731
        full = lambda: run(batches)  # noqa: E731
    warm()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            t0 = time.perf_counter()
            first = full()
            out = {"seconds": time.perf_counter() - t0,
                   "first": np.asarray(first)[:n_layers].tolist()}  # fmt: skip
        else:
            out = {"rss_mb": rss_mb()}
        print(json.dumps(out), flush=True)


def compare(model_dir, label, counts, runs, threads, batch, peers_at_all) -> dict:
    import numpy as np

    med = statistics.median
    out = {"model": label, "batch_size": batch, "threads": threads, "runs": runs, "by_prompts": {}}
    for n in counts:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(demo_prompts(model_dir, n), f)
        kinds = ["reasonlab"]
        if peers_at_all or n == min(counts):
            kinds += ["hidden_states"] + (["nnsight"] if PEERS_PY.exists() else [])
        ws = {k: Worker([PEERS_PY if k == "nnsight" else sys.executable, __file__, "--worker", k,
                         "--model", model_dir, "--prompts-file", f.name, "--threads", threads,
                         "--batch", batch]) for k in kinds}  # fmt: skip
        times = {k: [] for k in kinds}
        firsts = {}
        for r in range(runs):
            for k in kinds if r % 2 == 0 else kinds[::-1]:
                a = ws[k].ask("run")
                times[k].append(a["seconds"])
                firsts[k] = np.array(a["first"])
        rss = {k: w.close()["rss_mb"] for k, w in ws.items()}
        row = {f"{k}_prompts_per_s": round(n / med(times[k]), 1) for k in kinds}
        row |= {f"{k}_peak_rss_mb": round(rss[k]) for k in kinds}
        if "hidden_states" in kinds:
            ref = firsts["hidden_states"]
            rel = np.abs(firsts["reasonlab"] - ref).max() / np.abs(ref).max()
            row["ratio_vs_hidden_states"] = round(
                med(times["hidden_states"]) / med(times["reasonlab"]), 2
            )
            row["max_abs_diff_vs_hidden_states"] = float(rel)
        if "nnsight" in kinds:
            row["ratio_vs_nnsight"] = round(med(times["nnsight"]) / med(times["reasonlab"]), 2)
        out["by_prompts"][n] = row
        print(f"[{label}] {n} prompts: {row}", file=sys.stderr, flush=True)
    lo, hi = min(counts), max(counts)
    out["rss_ratio_4000_vs_500"] = round(
        out["by_prompts"][hi]["reasonlab_peak_rss_mb"] / out["by_prompts"][lo]["reasonlab_peak_rss_mb"], 3
    )  # fmt: skip
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[500, 4000])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--peers-at-all", action="store_true", help="peers at every prompt count")
    p.add_argument(
        "--worker", choices=["reasonlab", "hidden_states", "nnsight"], help=argparse.SUPPRESS
    )
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.model, a.prompts_file, a.threads, a.batch)
    sys.path.insert(0, str(ROOT / "src"))
    models = demo_and_large_models(Path(tempfile.mkdtemp()))
    results = {
        label: compare(path, label, a.prompts, a.runs, a.threads, a.batch, a.peers_at_all)
        for label, path in models.items()
    }
    large, lo = results["large"], str(min(a.prompts))
    row = large["by_prompts"][min(a.prompts)]
    summary = {
        "prompts_per_s": row["reasonlab_prompts_per_s"],
        "ratio_vs_hidden_states": row.get("ratio_vs_hidden_states"),
        "ratio_vs_nnsight": row.get("ratio_vs_nnsight"),
        "rss_ratio_4000_vs_500": large["rss_ratio_4000_vs_500"],
        "max_abs_diff_vs_hidden_states": row.get("max_abs_diff_vs_hidden_states"),
        "vocab": VOCAB,
        "prompts": lo,
    }
    print(json.dumps(summary | {k: v for k, v in results.items()}, default=str))


if __name__ == "__main__":
    main()
