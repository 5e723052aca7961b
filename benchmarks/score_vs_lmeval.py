"""reasonlab's scoring against lm-evaluation-harness, side by side in one run.

    bash envs/setup.sh peers                     # once: lm-evaluation-harness in .venvs/peers
    .venvs/core/bin/python benchmarks/score_vs_lmeval.py [--texts 160] [--threads 2] [--runs 5]

On the demo's pool texts (chat prompt + worked solution), under (1) the demo model and (2) a
randomly initialised Qwen2 of 8 layers, hidden 512 and a real vocabulary of 151 936 tokens, it times
`reasonlab.score.score_items` (every statistic: entropy, varentropy, log-probability, rank, top-2)
and lm-evaluation-harness's `HFLM._loglikelihood_tokens` (log-likelihood only; the method
`HFLM.loglikelihood` calls after tokenizing) on the same model, the same texts and the same
(context, continuation) token split, each in its own process (the core and the peers environment)
with the same threads. Protocol: both load the model and warm up (reasonlab's warm-up pays the
one-off compilation of its statistics, timed apart); lm-eval runs at its fastest batch size among
1, 8, 16 and 32 (each timed once after warm-up); then the two alternate `--runs` times and the
medians are compared. Without compilation (`compile_stats=False`) reasonlab is timed in the same
alternation. `stats_overhead` is the time of the output head with the statistics over the time of
the head alone (the same blocked matrix products), on the scored positions' hidden states, the two
alternating chunk by chunk of `head_positions` (which goes first alternates too), median of
`--runs`. Peak RSS is each worker process's own. The last line is one JSON object.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from workers import Worker, rss_mb  # benchmarks/workers.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
PEERS_PY = ROOT / ".venvs" / "peers" / "bin" / "python"
VOCAB = 151936
BATCH_SIZES = (1, 8, 16, 32)


# ------------------------------------------------------------------------------ workers


def reasonlab_worker(model_dir: str, requests: list, threads: int) -> None:
    """Serve `run <compile 0|1>` and `overhead <run>` on stdin; one JSON line per answer on stdout."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "src"))
    from reasonlab.score import ScoreOptions, TextItem, _head, head_stats, score_items, sized

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    items = [
        TextItem(str(i), "", prompt_ids=c, completion_ids=x) for i, (c, x) in enumerate(requests)
    ]
    opts = {
        True: ScoreOptions(progress=False),
        False: ScoreOptions(progress=False, compile_stats=False),
    }
    t0 = time.perf_counter()
    score_items(model, tok, items[:8], opts[True])  # warm-up, with the one-off compilation
    compile_s = time.perf_counter() - t0
    score_items(model, tok, items[:8], opts[False])
    # the scored positions' hidden states, for the head-alone comparison
    body, head, _ = _head(model)
    W = head.weight
    hs, ts = [], []
    with torch.inference_mode():
        for c, x in requests:
            ids = torch.tensor([c + x])
            h = body(input_ids=ids, use_cache=False).last_hidden_state[0]
            hs.append(h[len(c) - 1 : -1])
            ts.append(ids[0, len(c) :])
    H, T = torch.cat(hs), torch.cat(ts)
    o = sized(opts[True], model, W.device)
    block = max(128, o.chunk_elements // o.head_positions)

    def head_alone(s):
        for v0 in range(0, W.shape[0], block):
            torch.nn.functional.linear(H[s : s + o.head_positions], W[v0 : v0 + block])

    def with_stats(s):
        head_stats(H[s : s + o.head_positions], W, T[s : s + o.head_positions],
                   vocab_block=block, compiled=True)  # fmt: skip

    def overhead(run):
        """Head alone and head + statistics on each chunk of positions in turn, which first
        alternating from chunk to chunk and run to run (this machine's speed drifts)."""
        spent = {head_alone: 0.0, with_stats: 0.0}
        with torch.inference_mode():
            for i, s in enumerate(range(0, H.shape[0], o.head_positions)):
                pair = (head_alone, with_stats) if (i + run) % 2 == 0 else (with_stats, head_alone)
                for f in pair:
                    t0 = time.perf_counter()
                    f(s)
                    spent[f] += time.perf_counter() - t0
        return {"head_s": spent[head_alone], "head_stats_s": spent[with_stats]}

    print(json.dumps({"ready": True, "compile_s": compile_s}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            t0 = time.perf_counter()
            _, seqs = score_items(model, tok, items, opts[cmd[1] == "1"])
            out = {"seconds": time.perf_counter() - t0, "llh": seqs["llh_sum"].to_list()}
        elif cmd[0] == "overhead":
            out = overhead(int(cmd[1]))
        else:
            out = {"rss_mb": rss_mb()}
        print(json.dumps(out), flush=True)


def lmeval_worker(model_dir: str, requests: list, threads: int) -> None:
    """Serve `run <batch size>` on stdin with lm-eval's HFLM; one JSON line per answer."""
    import torch
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(threads)
    lm = HFLM(pretrained=model_dir, backend="causal", device="cpu", dtype="float32", batch_size=1)
    reqs = [(("", ""), c, x) for c, x in requests]
    lm.batch_size_per_gpu = 8
    lm._loglikelihood_tokens(reqs[:8], disable_tqdm=True)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            lm.batch_size_per_gpu = int(cmd[1])
            t0 = time.perf_counter()
            res = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
            out = {"seconds": time.perf_counter() - t0, "llh": [r[0] for r in res]}
        else:
            out = {"rss_mb": rss_mb()}
        print(json.dumps(out), flush=True)


# ------------------------------------------------------------------------------ the comparison


def compare(model_dir, requests_file, n_tokens, threads, runs, label) -> dict:
    med = statistics.median

    def worker(python, kind):
        return Worker([python, __file__, "--worker", kind, "--model", model_dir,
                       "--requests", requests_file, "--threads", threads], quiet=True)  # fmt: skip

    rl, lm = worker(sys.executable, "reasonlab"), worker(PEERS_PY, "lmeval")
    sizes = {bs: lm.ask(f"run {bs}")["seconds"] for bs in BATCH_SIZES}
    best = min(sizes, key=sizes.get)
    t_rl, t_eager, t_lm, heads, stats = [], [], [], [], []
    for run in range(runs):
        a = rl.ask("run 1")
        t_rl.append(a["seconds"])
        b = lm.ask(f"run {best}")
        t_lm.append(b["seconds"])
        t_eager.append(rl.ask("run 0")["seconds"])
        o = rl.ask(f"overhead {run}")
        heads.append(o["head_s"])
        stats.append(o["head_stats_s"])
    diff = max(abs(x - y) for x, y in zip(a["llh"], b["llh"], strict=True))
    rss_rl, rss_lm = rl.close()["rss_mb"], lm.close()["rss_mb"]
    out = {
        "model": label,
        "completion_tokens": n_tokens,
        "reasonlab_tokens_per_s": round(n_tokens / med(t_rl), 1),
        "reasonlab_eager_tokens_per_s": round(n_tokens / med(t_eager), 1),
        "lmeval_tokens_per_s": round(n_tokens / med(t_lm), 1),
        "lmeval_batch_size": best,
        "lmeval_seconds_by_batch_size": {k: round(v, 2) for k, v in sizes.items()},
        "ratio_vs_lmeval": round(med(t_lm) / med(t_rl), 3),
        "eager_ratio_vs_lmeval": round(med(t_lm) / med(t_eager), 3),
        "reasonlab_peak_rss_mb": round(rss_rl),
        "lmeval_peak_rss_mb": round(rss_lm),
        "rss_ratio_vs_lmeval": round(rss_rl / rss_lm, 3),
        "max_abs_llh_diff": diff,
        "stats_overhead": round(med([s / h for s, h in zip(stats, heads, strict=True)]), 3),
        "compile_s": round(rl.ready["compile_s"], 1),
        "runs": runs,
        "threads": threads,
    }
    print(f"[{label}] reasonlab {out['reasonlab_tokens_per_s']} tok/s (eager "
          f"{out['reasonlab_eager_tokens_per_s']}), lm-eval {out['lmeval_tokens_per_s']} tok/s "
          f"(batch {best}): x{out['ratio_vs_lmeval']}; RSS {out['reasonlab_peak_rss_mb']} vs "
          f"{out['lmeval_peak_rss_mb']} MB; max |Δllh| {diff:.2e}; stats overhead "
          f"{out['stats_overhead']}", file=sys.stderr, flush=True)  # fmt: skip
    return out


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--texts", type=int, default=160)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--worker", choices=["reasonlab", "lmeval"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--requests", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        requests = json.loads(Path(a.requests).read_text())
        (reasonlab_worker if a.worker == "reasonlab" else lmeval_worker)(
            a.model, requests, a.threads
        )
        return
    if not PEERS_PY.exists():
        sys.exit(
            f"no peers environment at {PEERS_PY.parent.parent}: run `bash envs/setup.sh peers`"
        )
    sys.path.insert(0, str(ROOT / "src"))
    from transformers import AutoTokenizer

    from reasonlab import demo, synth
    from reasonlab.score import ScoreOptions, TextItem, encode

    data = synth.build_demo_data(0, synth.DemoSizes())
    items = [
        TextItem(str(i), synth.chatml(None, f"{r['instruction']}\n{r['input']}"), r["output"])
        for i, r in enumerate(data["pool"][: a.texts])
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo.build_tokenizer(synth.corpus_texts(data), tmp / "tok")
        tok = AutoTokenizer.from_pretrained(tmp / "tok")
        # the token split both sides score: reasonlab's (prompt and completion encoded apart)
        enc = encode(items, tok, ScoreOptions(), 2**31)
        requests = [(e.ids[: e.n_prompt], e.ids[e.n_prompt :]) for e in enc]
        n_tokens = sum(len(x) for _, x in requests)
        (tmp / "requests.json").write_text(json.dumps(requests))
        large = demo.TinyModelSpec(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                   num_key_value_heads=4, intermediate_size=1024)  # fmt: skip
        demo.build_tiny_model(tmp / "tok", tmp / "demo", demo.TinyModelSpec(), seed=0)
        demo.build_tiny_model(tmp / "tok", tmp / "large", large, seed=0, vocab_size=VOCAB)
        for label in ("demo", "large"):
            results[label] = compare(tmp / label, tmp / "requests.json", n_tokens, a.threads, a.runs, label)  # fmt: skip
    keys = ("ratio_vs_lmeval", "rss_ratio_vs_lmeval", "max_abs_llh_diff", "stats_overhead",
            "eager_ratio_vs_lmeval", "reasonlab_tokens_per_s", "lmeval_tokens_per_s")  # fmt: skip
    print(json.dumps({k: results["large"][k] for k in keys} | {"vocab": VOCAB} | results))


if __name__ == "__main__":
    main()
