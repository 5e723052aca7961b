"""One joint map of reasoning traces across models and checkpoints (seed 000's analysis half).

`trace_map_job` reads the trace embeddings of every (model, checkpoint) of a group, projects them
together to 2-D and 3-D (t-SNE with a perplexity and a seed; UMAP when configured and installed),
clusters them with K-means (k from the config, or the k of the best silhouette in a range), and
describes each cluster: its top n-grams (scikit-learn's CountVectorizer over the reasoning, words
only), the most common step openings (the first words of each step), example traces, and its
composition by checkpoint. Length statistics (tokens, words, steps) per model × checkpoint ×
correctness come with it. Everything is deterministic for a seed. A group too small for the map or
the clustering gets a note (in the job's JSON and the report), not a crash.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MapOptions:
    method: str = "tsne"  # tsne | umap
    perplexity: float = 30.0
    neighbors: int = 15  # umap
    seed: int = 0
    k: int | None = None  # None: the best silhouette over k_range
    k_range: tuple[int, int] = (2, 8)
    ngram_range: tuple[int, int] = (2, 3)
    top_ngrams: int = 10
    top_openings: int = 8
    examples: int = 3


def project(x: np.ndarray, dims: int, opts: MapOptions) -> tuple[np.ndarray | None, str | None]:
    """(the [n, dims] map, or None with a note saying why) of the rows of `x`."""
    n = len(x)
    if opts.method == "umap":
        try:
            import umap
        except ImportError:
            return None, ("traces.map.method is umap but umap-learn is not installed in the core "
                          "environment (pip install umap-learn), or use tsne")  # fmt: skip
        if n <= max(opts.neighbors, dims + 1):
            return None, (f"traces.map.neighbors {opts.neighbors}: a UMAP needs more than that many "
                          f"traces; this group has {n}")  # fmt: skip
        reducer = umap.UMAP(n_components=dims, n_neighbors=opts.neighbors, random_state=opts.seed)
        return np.asarray(reducer.fit_transform(x), dtype=np.float64), None
    from sklearn.manifold import TSNE

    if n <= opts.perplexity:
        return None, (f"traces.map.perplexity {opts.perplexity:g} must be below the number of "
                      f"traces ({n}): lower it for this group")  # fmt: skip
    tsne = TSNE(n_components=dims, perplexity=opts.perplexity, random_state=opts.seed,
                init="pca", learning_rate="auto", method="barnes_hut" if dims <= 3 else "exact")  # fmt: skip
    return np.asarray(tsne.fit_transform(x), dtype=np.float64), None


def cluster(x: np.ndarray, opts: MapOptions) -> tuple[np.ndarray | None, dict, str | None]:
    """(K-means labels, {k: silhouette} of the tried k, a note when clustering is impossible)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(x)
    if opts.k is not None:
        if opts.k > n:
            return None, {}, f"traces.k {opts.k} is more than the group's {n} traces"
        labels = KMeans(n_clusters=opts.k, random_state=opts.seed, n_init=10).fit_predict(x)
        sil = {opts.k: float(silhouette_score(x, labels)) if 1 < opts.k < n else None}
        return labels, sil, None
    lo, hi = opts.k_range
    ks = [k for k in range(max(2, lo), hi + 1) if k < n]
    if not ks:
        return None, {}, f"traces.k_range {list(opts.k_range)}: the group's {n} traces are too few"
    fits = {k: KMeans(n_clusters=k, random_state=opts.seed, n_init=10).fit_predict(x) for k in ks}
    sil = {k: float(silhouette_score(x, lab)) for k, lab in fits.items()}
    best = max(ks, key=lambda k: (sil[k], -k))
    return fits[best], sil, None


def top_ngrams(texts: list[str], labels, ngram_range=(2, 3), top: int = 10) -> list[dict]:
    """Per cluster: its `top` most frequent word n-grams (CountVectorizer, letters-only words,
    lower-cased: numbers differ between traces of one style), with their count, the share of the
    cluster's traces that contain them, and the lift over the whole group."""
    from sklearn.feature_extraction.text import CountVectorizer

    vec = CountVectorizer(ngram_range=tuple(ngram_range), lowercase=True,
                          token_pattern=r"(?u)\b[^\W\d_]{2,}\b")  # fmt: skip
    try:
        counts = vec.fit_transform(texts)
    except ValueError:  # no word at all
        return []
    names = vec.get_feature_names_out()
    present = (counts > 0).astype(np.float64)
    overall = np.asarray(present.mean(axis=0)).ravel()
    labels = np.asarray(labels)
    rows = []
    for c in sorted(set(labels.tolist())):
        sel = labels == c
        total = np.asarray(counts[sel].sum(axis=0)).ravel()
        share = np.asarray(present[sel].mean(axis=0)).ravel()
        for j in np.argsort(-total, kind="stable")[:top]:
            if total[j] == 0:
                break
            rows.append({"cluster": int(c), "kind": "ngram", "text": str(names[j]),
                         "count": int(total[j]), "share": float(share[j]),
                         "lift": float(share[j] / overall[j]) if overall[j] else None})  # fmt: skip
    return rows


def top_openings(openings: list[str], labels, top: int = 8) -> list[dict]:
    """Per cluster: the most common step openings (the first words of each step) with their count
    and share of the cluster's steps."""
    from collections import Counter

    by: dict[int, Counter] = {}
    for o, c in zip(openings, labels, strict=True):
        if o:
            by.setdefault(int(c), Counter())[o] += 1
    rows = []
    for c in sorted(by):
        n = sum(by[c].values())
        for text, k in sorted(by[c].items(), key=lambda kv: (-kv[1], kv[0]))[:top]:
            rows.append({"cluster": c, "kind": "opening", "text": text, "count": k,
                         "share": k / n, "lift": None})  # fmt: skip
    return rows


def length_stats(points) -> list[dict]:
    """Per model × checkpoint × correctness: traces and the mean / median tokens, words, steps."""
    import polars as pl

    return (
        points.group_by("model", "ckpt", "ckpt_order", "correct")
        .agg(
            n=pl.len(),
            tokens_mean=pl.col("n_tokens").mean(),
            tokens_median=pl.col("n_tokens").median(),
            words_mean=pl.col("n_words").mean(),
            words_median=pl.col("n_words").median(),
            steps_mean=pl.col("n_steps").mean(),
            steps_median=pl.col("n_steps").median(),
        )
        .sort("model", "ckpt_order", "correct")
        .to_dicts()
    )


def trace_map_job(group: str, members: list[dict], opts: MapOptions, out_prefix: str) -> dict:
    """One `trace_map` job over a group's members ({model, ckpt, order, embeddings, generations,
    steps}: paths). Writes `{out_prefix}.points.parquet` (one row per trace: tags, correctness,
    x, y, x3, y3, z3, cluster, the trace's start and answer, lengths), `.phrases.parquet` (per
    cluster n-grams and step openings), `.clusters.parquet` (per cluster × checkpoint counts and
    example traces) and `.json` (k, silhouettes, notes)."""
    import polars as pl

    frames, vecs, step_frames = [], [], []
    for m in members:
        emb = pl.read_parquet(m["embeddings"]).filter(pl.col("step").is_null())
        gen = pl.read_parquet(m["generations"]).select(
            "id", "sample", "reasoning", "completion", "answer", "correct", "n_completion_tokens"
        )
        steps = pl.read_parquet(m["steps"]) if m.get("steps") else None
        n_steps = (steps.group_by("id", "sample").agg(n_steps=pl.col("n_steps").first())
                   if steps is not None and steps.height else None)  # fmt: skip
        df = emb.join(gen, on=["id", "sample"], how="left")
        if n_steps is not None:
            df = df.join(n_steps, on=["id", "sample"], how="left")
        else:
            df = df.with_columns(n_steps=pl.lit(None, dtype=pl.Int64))
        text = pl.coalesce(pl.col("reasoning"), pl.col("completion")).fill_null("")
        df = df.with_columns(model=pl.lit(m["model"]), ckpt=pl.lit(m["ckpt"]),
                             ckpt_order=pl.lit(int(m["order"])), text=text,
                             n_words=text.str.count_matches(r"\S+"),
                             n_tokens=pl.col("n_completion_tokens"))  # fmt: skip
        vecs.append(np.stack(df["vector"].to_numpy()) if df.height else np.zeros((0, 1)))
        frames.append(df.drop("vector"))
        if steps is not None and steps.height:
            step_frames.append(steps.select("id", "sample", "opening").with_columns(
                model=pl.lit(m["model"]), ckpt=pl.lit(m["ckpt"])))  # fmt: skip
    points = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    x = (
        np.concatenate([v for v in vecs if len(v)])
        if any(len(v) for v in vecs)
        else np.zeros((0, 1))
    )
    if len(x) < 3:  # nothing to map or cluster: a note in the report, not a failed job
        xy = xyz = labels = None
        sil: dict = {}
        notes = [
            f"traces.groups.{group}: {len(x)} embedded trace(s); a map and clusters need several"
        ]
    else:
        xy, note2 = project(x, 2, opts)
        xyz, note3 = project(x, 3, opts)
        labels, sil, note_k = cluster(x, opts)
        notes = [n for n in (note2, note3, note_k) if n]
    nan = np.full(len(x), np.nan)
    points = points.with_columns(
        x=pl.Series(xy[:, 0] if xy is not None else nan), y=pl.Series(xy[:, 1] if xy is not None else nan),
        x3=pl.Series(xyz[:, 0] if xyz is not None else nan), y3=pl.Series(xyz[:, 1] if xyz is not None else nan),
        z3=pl.Series(xyz[:, 2] if xyz is not None else nan),
        cluster=pl.Series(labels if labels is not None else np.full(len(x), -1), dtype=pl.Int64),
        start=pl.col("text").str.slice(0, 120), group=pl.lit(group),
    )  # fmt: skip
    phrases = []
    if labels is not None:
        phrases = top_ngrams(points["text"].to_list(), labels, opts.ngram_range, opts.top_ngrams)
        if step_frames:
            st = pl.concat(step_frames).join(points.select("model", "ckpt", "id", "sample", "cluster"),
                                             on=["model", "ckpt", "id", "sample"])  # fmt: skip
            phrases += top_openings(
                st["opening"].to_list(), st["cluster"].to_list(), opts.top_openings
            )
    phrases_df = pl.DataFrame(phrases, schema={"cluster": pl.Int64, "kind": pl.String, "text": pl.String,
                                               "count": pl.Int64, "share": pl.Float64, "lift": pl.Float64})  # fmt: skip
    comp = (points.group_by("cluster", "model", "ckpt", "ckpt_order")
            .agg(n=pl.len(), correct=pl.col("correct").cast(pl.Float64).mean())
            .sort("cluster", "model", "ckpt_order"))  # fmt: skip
    # examples spread over the checkpoints: each checkpoint's first trace, then its second, ...
    examples = (points.sort("cluster", "model", "ckpt_order", "id", "sample")
                .with_columns(rank=pl.int_range(pl.len()).over("cluster", "model", "ckpt"))
                .sort("cluster", "rank", "model", "ckpt_order")
                .group_by("cluster", maintain_order=True).head(opts.examples)
                .select("cluster", "model", "ckpt", "id", "sample", "correct", "answer",
                        example=pl.col("text").str.slice(0, 600)))  # fmt: skip
    clusters = comp.join(examples.group_by("cluster").agg(pl.struct(pl.all().exclude("cluster")).alias("examples")),
                         on="cluster", how="left")  # fmt: skip
    points.drop("text", "reasoning", "completion").write_parquet(f"{out_prefix}.points.parquet")
    phrases_df.write_parquet(f"{out_prefix}.phrases.parquet")
    clusters.write_parquet(f"{out_prefix}.clusters.parquet")
    info = {"group": group, "traces": len(x), "method": opts.method, "perplexity": opts.perplexity,
            "k": int(labels.max()) + 1 if labels is not None else None,
            "silhouette": {str(k): v for k, v in sil.items()}, "notes": notes,
            "lengths": length_stats(points)}  # fmt: skip
    with open(f"{out_prefix}.json", "w") as f:
        json.dump(info, f, indent=1, default=str)
    log.info("trace map %s: %d traces, k %s (silhouettes %s); notes: %s", group, len(x), info["k"],
             {k: round(v, 3) for k, v in sil.items() if v is not None}, notes or "none")  # fmt: skip
    return info
