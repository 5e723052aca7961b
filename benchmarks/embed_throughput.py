"""Trace embedding and mapping: the `embed` rule's code against seed 000's one-text-at-a-time loop.

    .venvs/core/bin/python benchmarks/embed_throughput.py [--synthetic 1000] [--runs 3]
        [--map-sizes 1000 10000] [--threads 2]

Texts: the demo's worked solutions (`traces`, 240) plus `--synthetic` traces of about 250
MiniLM tokens (demo problems' solutions strung together, within the model's 256-token window so
that both sides embed the same tokens). Both sides use the same loaded all-MiniLM-L6-v2 (bundled,
offline) and threads: (a) `reasonlab.embed.embed_texts` (batches of `--batch-size`, sorted by
length by sentence-transformers, windows mean-pooled), (b) a plain loop of
`SentenceTransformer.encode([text], batch_size=1)` (seed 000's default batch size 1). Timed after
load and warm-up, median of `--runs` alternating runs; every embedding's cosine to the loop's must
be ≥ 0.9999. Then the map: `reasonlab.tracemap.project` (t-SNE, 2-D and 3-D) and the K-means
silhouette search on 1 000 and 10 000 embeddings (the texts' embeddings, repeated with small noise
to reach the size). The last line is one JSON object.
"""

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from workers import alternate  # benchmarks/workers.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def texts(tokenizer, n_synthetic: int, budget: int = 250, seed: int = 0) -> list[str]:
    """The demo's worked solutions, then `n_synthetic` traces of demo solutions strung together up
    to `budget` MiniLM tokens (inside its 256-token window)."""
    from reasonlab import synth

    data = synth.build_demo_data(
        seed, synth.DemoSizes(pool_per_type=1, eval=1, control=1, pretrain=1)
    )
    out = [t["output"] for t in data["traces"]]
    stream = synth.problems(seed + 99)
    rng = random.Random(seed)
    n_tokens = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    while len(out) < len(data["traces"]) + n_synthetic:
        trace = ""
        while True:
            s = synth.solution(next(stream), rng.choice(["canonical", "paraphrase"]), rng)
            longer = f"{trace}\n{s}" if trace else s
            if n_tokens(longer) > budget:
                break
            trace = longer
        out.append(trace)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--map-sizes", type=int, nargs="*", default=[1000, 10000])
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (float32)")
    ap.add_argument("--model", default=None, help="a sentence-transformers directory (default: "
                    "the bundled all-MiniLM-L6-v2)")  # fmt: skip
    a = ap.parse_args()

    import numpy as np
    import torch

    from reasonlab.embed import embed_texts, load_embedder, resolve_embedder
    from reasonlab.tracemap import MapOptions, cluster, project

    torch.set_num_threads(a.threads)
    model = load_embedder(resolve_embedder(a.model), a.device)
    xs = texts(model.tokenizer, a.synthetic)
    n_tok = [len(i) for i in model.tokenizer(xs, add_special_tokens=False)["input_ids"]]
    long = sum(n > model.max_seq_length - 2 for n in n_tok)

    def ours():
        return embed_texts(model, xs, a.batch_size)[0]

    def loop():
        return np.stack([model.encode([t], batch_size=1, normalize_embeddings=True)[0] for t in xs])

    ours(), loop()  # warm-up
    times, got = alternate({"reasonlab": ours, "loop": loop}, a.runs, a.device)
    mine, ref = got["reasonlab"], got["loop"]
    cos = (mine * ref).sum(1) / (np.linalg.norm(mine, axis=1) * np.linalg.norm(ref, axis=1))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(xs)} traces (median {int(np.median(n_tok))} tokens, {long} over the window): "
          f"reasonlab {len(xs) / med['reasonlab']:.1f}/s, loop {len(xs) / med['loop']:.1f}/s; "
          f"min cosine {cos.min():.6f}", flush=True)  # fmt: skip
    maps = {}
    rng = np.random.default_rng(0)
    for n in a.map_sizes:
        x = mine[rng.integers(0, len(mine), n)] + rng.normal(scale=0.01, size=(n, mine.shape[1]))
        row = {}
        for dims in (2, 3):
            t0 = time.perf_counter()
            out, note = project(x, dims, MapOptions())
            row[f"tsne_{dims}d"] = round(time.perf_counter() - t0, 2)
            assert note is None and out.shape == (n, dims)
        t0 = time.perf_counter()
        cluster(x, MapOptions())
        row["kmeans_silhouette"] = round(time.perf_counter() - t0, 2)
        maps[n] = row
        print(f"map of {n}: {row}", flush=True)
    result = {
        "traces": len(xs),
        "median_tokens": int(np.median(n_tok)),
        "threads": a.threads,
        "device": a.device,
        "batch_size": a.batch_size,
        "reasonlab_per_s": round(len(xs) / med["reasonlab"], 2),
        "loop_per_s": round(len(xs) / med["loop"], 2),
        "ratio": round(med["loop"] / med["reasonlab"], 2),
        "min_cosine": round(float(cos.min()), 7),
        "runs": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "maps": maps,
        "map_seconds_10000": round(sum(maps[10000].values()), 2) if 10000 in maps else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
