"""The trace explorer: steps, step statistics, embeddings, maps, phrases and its report section,
against hand computations and the reference libraries."""

import json

import numpy as np
import polars as pl
import pytest

from reasonlab.embed import EmbedError, embed_texts, load_embedder, resolve_embedder
from reasonlab.report.html import unpacked
from reasonlab.steps import (
    StepRules,
    Trace,
    rating_correlation,
    split_steps,
    step_table,
    token_steps,
)
from reasonlab.tracemap import MapOptions, cluster, project, top_ngrams, top_openings

RULES = StepRules()


# ------------------------------------------------------------------ steps


def test_steps_split_at_blank_lines_step_numbers_and_hesitations():
    text = (
        "<think>\nStep 1: 2 * 3 = 6.\nStep 2: 6 / 2 = 3. Wait, check it.\n\nSo it is 3.\n</think>"
    )
    assert split_steps(text, RULES) == [
        "<think>\nStep 1: 2 * 3 = 6.",  # a tag-only segment joins the step after it
        "Step 2: 6 / 2 = 3.",
        "Wait, check it.",
        "So it is 3.\n</think>",
    ]
    assert split_steps("no boundary at all, just words", RULES) == [
        "no boundary at all, just words"
    ]
    assert split_steps("Waiting is fine. Hmm.", RULES) == [
        "Waiting is fine.",
        "Hmm.",
    ]  # whole words
    assert split_steps("a\n\nb", StepRules(blank_line=False, step_n=False, hesitation=())) == [
        "a\n\nb"
    ]
    assert split_steps("", RULES) == []


def test_a_token_belongs_to_the_step_in_which_it_starts():
    tokens = ["Step", " 1", ": x.", "\n", "Step", " 2", ".", " Wait", ",", " no", "\n\n", "Ok"]
    index, texts = token_steps(tokens, RULES)
    # the newline before "Step 2", the space of " Wait" and the blank line open the new steps
    assert index == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3]
    assert [t.strip() for t in texts] == ["Step 1: x.", "Step 2.", "Wait, no", "Ok"]
    # a dataset's own step offsets win over the rules (a labelled step may hold a blank line)
    index, texts = token_steps(["ab", "\n\n", "cd", "\n\n", "ef"], RULES, starts=[0, 4])
    assert index == [0, 0, 1, 1, 1] and texts == ["ab\n\n", "cd\n\nef"]


def tokens_frame(traces: dict[str, list[tuple[str, float, float]]]):
    rows = []
    for tid, toks in traces.items():
        rows.append(
            {
                "id": tid,
                "position": 0,
                "token": "<p>",
                "entropy": 9.0,
                "varentropy": 9.0,
                "is_prompt": True,
            }
        )
        for i, (t, e, v) in enumerate(toks, 1):
            rows.append(
                {
                    "id": tid,
                    "position": i,
                    "token": t,
                    "entropy": e,
                    "varentropy": v,
                    "is_prompt": False,
                }
            )
    return pl.DataFrame(rows)


def test_step_statistics_equal_the_token_table_aggregated_by_hand():
    toks = {
        "a": [
            ("Step 1", 0.1, 0.01),
            (": 2.", 0.3, 0.02),
            ("\nStep 2", 2.0, 0.5),
            (": 4.", 0.2, 0.1),
        ],
        "b": [("Wait", 1.5, 0.3), (" no", 0.5, 0.2)],
    }
    table, threshold = step_table(tokens_frame(toks), [Trace("a", "a", 0, True), Trace("b", "b", 0, False)],
                                  StepRules(quantile=0.5))  # fmt: skip
    all_e = [0.1, 0.3, 2.0, 0.2, 1.5, 0.5]  # the prompt's tokens are not counted
    assert threshold == pytest.approx(float(np.quantile(all_e, 0.5)))
    rows = {(r["id"], r["step"]): r for r in table.to_dicts()}
    assert set(rows) == {("a", 0), ("a", 1), ("b", 0)}
    a1 = rows[("a", 1)]
    assert (
        a1["n_tokens"] == 2
        and a1["entropy_mean"] == pytest.approx(1.1)
        and a1["entropy_max"] == 2.0
    )
    assert a1["varentropy_mean"] == pytest.approx(0.3) and a1["forking_share"] == pytest.approx(0.5)
    assert rows[("a", 0)]["forking_share"] == 0.0 and rows[("a", 0)]["opening"] == "step"
    assert (
        rows[("b", 0)]["entropy_mean"] == pytest.approx(1.0) and rows[("b", 0)]["correct"] is False
    )
    assert a1["n_steps"] == 2 and a1["rating"] is None


def test_ratings_join_their_steps_and_correlate():
    toks = {
        f"t{i}": [("s1.", 0.1 * (i + 1), 0.0), ("\n\n", 0.1, 0.0), ("bad.", 1.0 + i, 0.0)]
        for i in range(3)
    }
    traces = [Trace(f"t{i}", f"t{i}", 0, None, [1, -1], [0, 5]) for i in range(3)]
    table, _ = step_table(tokens_frame(toks), traces, RULES)
    assert table.filter(pl.col("step") == 1)["rating"].to_list() == [-1, -1, -1]
    corr = rating_correlation(table)
    assert (
        corr["n_steps"] == 6 and corr["entropy_mean"]["spearman"] < -0.8
    )  # uncertain steps rated -1
    from scipy.stats import spearmanr

    rho = spearmanr(table["entropy_mean"].to_numpy(), table["rating"].to_numpy())[0]
    assert corr["entropy_mean"]["spearman"] == pytest.approx(rho)
    assert rating_correlation(table.with_columns(rating=pl.lit(None, dtype=pl.Int64))) is None


# ------------------------------------------------------------------ embeddings


@pytest.fixture(scope="module")
def minilm():
    return load_embedder(resolve_embedder(None))


def test_the_default_model_loads_offline_and_batches_equal_one_at_a_time(minilm):
    from sentence_transformers import SentenceTransformer

    assert isinstance(minilm, SentenceTransformer)
    texts = ["Step 1: 2 * 6 = 12.", "Wait, that is not right.", "So the answer is 12.", "ok"]
    got, windows = embed_texts(minilm, texts, batch_size=3)
    assert got.shape == (4, 384) and windows == [1, 1, 1, 1]
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    for t, v in zip(texts, got, strict=True):
        ref = minilm.encode([t], batch_size=1, normalize_embeddings=True)[0]
        assert float(np.dot(v, ref)) >= 0.9999
    again, _ = embed_texts(minilm, texts, batch_size=4)
    assert np.allclose(again, got, atol=1e-5)  # deterministic, whatever the batch


def test_a_long_text_is_mean_pooled_over_windows(minilm):
    long = " ".join(f"word{i}" for i in range(400))
    got, windows = embed_texts(minilm, [long], batch_size=4, normalize=False)
    assert windows == [
        int(np.ceil(len(minilm.tokenizer(long, add_special_tokens=False)["input_ids"]) / 254))
    ]
    ids = minilm.tokenizer(long, add_special_tokens=False)["input_ids"]
    parts = [ids[i : i + 254] for i in range(0, len(ids), 254)]
    vecs = minilm.encode([minilm.tokenizer.decode(p) for p in parts], normalize_embeddings=False)
    want = sum(len(p) * v for p, v in zip(parts, vecs, strict=True)) / len(ids)
    assert np.allclose(got[0], want, atol=1e-5)


def test_missing_models_and_empty_texts_are_clear_errors(minilm):
    with pytest.raises(
        EmbedError, match="embed.model: 'nobody/nothing' is neither a local directory"
    ):
        resolve_embedder("nobody/nothing")
    with pytest.raises(EmbedError, match="1 empty text"):
        embed_texts(minilm, ["fine", "  "])


# ------------------------------------------------------------------ maps, clusters, phrases


def blobs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:3] * 10
    x = np.concatenate([c + rng.normal(size=(n // 3, 8)) for c in centres])
    return x, np.repeat([0, 1, 2], n // 3)


def test_maps_and_clusters_are_reproducible_and_find_planted_groups():
    x, truth = blobs()
    a, note = project(x, 2, MapOptions(perplexity=10))
    b, _ = project(x, 2, MapOptions(perplexity=10))
    assert note is None and a.shape == (60, 2) and np.array_equal(a, b)
    c3, _ = project(x, 3, MapOptions(perplexity=10))
    assert c3.shape == (60, 3)
    labels, sil, note = cluster(x, MapOptions())
    assert note is None and max(sil, key=sil.get) == 3
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, labels) == 1.0
    # too few traces: a note naming the key, not a crash
    assert project(x[:5], 2, MapOptions())[1].startswith("traces.map.perplexity 30 must be below")
    assert cluster(x[:3], MapOptions(k=5))[2] == "traces.k 5 is more than the group's 3 traces"


def test_ngrams_and_openings_on_known_text():
    texts = ["first we add the numbers", "first we add them", "then we multiply 3 by 4"]
    rows = top_ngrams(texts, [0, 0, 1], ngram_range=(2, 2), top=2)
    c0 = [(r["text"], r["count"], r["share"]) for r in rows if r["cluster"] == 0]
    assert c0 == [("first we", 2, 1.0), ("we add", 2, 1.0)]
    c1 = {r["text"] for r in rows if r["cluster"] == 1}
    assert c1 <= {"then we", "we multiply", "multiply by"}  # numbers are not words
    assert rows[0]["lift"] == pytest.approx(1.0 / (2 / 3))
    op = top_openings(["step", "step", "wait", "so the"], [0, 0, 0, 1])
    assert [(r["cluster"], r["text"], r["count"]) for r in op] == [
        (0, "step", 2),
        (0, "wait", 1),
        (1, "so the", 1),
    ]


# ------------------------------------------------------------------ the report section


def study(tmp_path, ckpts, correct=True):
    """Map and steps outputs as the jobs write them, for `ckpts`, aggregated."""
    from reasonlab.report import traces

    rng = np.random.default_rng(0)
    words, paths = [], []
    pts = []
    for o, c in enumerate(ckpts):
        steps = pl.DataFrame({"id": ["1", "1", "2"], "sample": [0, 0, 0], "step": [0, 1, 0], "n_steps": [2, 2, 1],
                              "text": ["a", "b", "c"], "opening": ["step", "wait", "step"], "n_tokens": [3, 2, 4],
                              "entropy_mean": [0.1, 0.9, 0.2], "entropy_max": [0.2, 1.5, 0.3],
                              "varentropy_mean": [0.0, 0.1, 0.0], "varentropy_max": [0.0, 0.2, 0.0],
                              "forking_share": [0.0, 0.5, 0.0], "correct": [correct, correct, False],
                              "rating": pl.Series([None, None, None], dtype=pl.Int64)})  # fmt: skip
        p = tmp_path / f"s{o}.parquet"
        steps.write_parquet(p)
        (tmp_path / f"s{o}.json").write_text(json.dumps({"ratings": None}))
        words.append(f"steps/m/{c}/{o}/d@m@{c}")
        paths.append(p)
        for i in ("1", "2"):
            pts.append({"model": "m", "ckpt": c, "ckpt_order": o, "id": i, "sample": 0,
                        "correct": correct if i == "1" else False, "answer": "4", "n_tokens": 5, "n_words": 3,
                        "n_steps": 2 if i == "1" else 1, "x": rng.normal(), "y": rng.normal(), "x3": 0.0,
                        "y3": 1.0, "z3": 2.0, "cluster": int(i) - 1, "start": "Step 1 <b>", "group": "g"})  # fmt: skip
    prefix = tmp_path / "map"
    pl.DataFrame(pts).write_parquet(f"{prefix}.points.parquet")
    pl.DataFrame({"cluster": [0], "kind": ["ngram"], "text": ["step one"], "count": [2], "share": [1.0],
                  "lift": [1.0]}).write_parquet(f"{prefix}.phrases.parquet")  # fmt: skip
    comp = (
        pl.DataFrame(pts)
        .group_by("cluster", "model", "ckpt", "ckpt_order")
        .agg(n=pl.len(), correct=pl.col("correct").cast(pl.Float64).mean())
    )
    ex = (
        pl.DataFrame(pts)
        .group_by("cluster")
        .agg(
            pl.struct(
                "model", "ckpt", "id", "sample", "correct", "answer", example=pl.col("start")
            ).alias("examples")
        )
    )
    comp.join(ex, on="cluster").write_parquet(f"{prefix}.clusters.parquet")
    (tmp_path / "map.json").write_text(json.dumps({"traces": len(pts), "k": 2, "method": "tsne",
                                                   "silhouette": {"2": 0.5}, "notes": []}))  # fmt: skip
    words.append("map/g/-/0/d")
    paths.append(f"{prefix}.points.parquet")
    out = {t: tmp_path / f"{t}.parquet" for t in traces.TABLES}
    traces.aggregate_traces(words, paths, out)
    return out


@pytest.mark.parametrize("ckpts,correct", [(["final"], True), ([f"step-{i}" for i in range(1, 9)], True),
                                           (["a", "b"], False)])  # fmt: skip
def test_the_section_renders_with_one_many_and_no_correct_trace(tmp_path, ckpts, correct):
    from reasonlab.report import build, traces

    out = study(tmp_path, ckpts, correct)
    steps = pl.read_parquet(out["tr_steps"])
    # per step index and correctness: the mean of the steps' means
    wrong0 = steps.filter((pl.col("ckpt") == ckpts[0]) & (pl.col("step") == 0) & ~pl.col("correct"))
    # trace 2 (wrong, 0.2) alone, or pooled with trace 1 (0.1) when that one is wrong too
    assert wrong0["entropy_mean"].to_list() == [pytest.approx(0.2 if correct else 0.15)]
    assert wrong0["n"].to_list() == [1 if correct else 2]
    sc = pl.read_parquet(out["tr_step_clusters"])
    assert set(sc["cluster"]) == {0, 1} and sc["steps"].sum() == 3 * len(ckpts)
    doc_path = tmp_path / "r.html"
    built = build.build_report(out, {"title": "t"}, doc_path)
    assert built == ["traces"]
    doc = unpacked(doc_path.read_text())
    assert (
        doc.count("Plotly.newPlot(") == 1
        and "Step 1 &lt;b&gt;" in doc
        and "Nothing to show" not in doc
    )
    assert "Map of the traces" in doc and "Cluster composition by checkpoint" in doc
    assert '<option value="g · d">' in doc  # the map selector offers the map
    assert traces.section({t: pl.read_parquet(p) for t, p in out.items()}, {})


def test_prm800k_steps_are_split_where_labelled_and_correlated(tiny_model_dir, tmp_path):
    """A PRM800K file prepared, its solutions scored under a model, split at the labelled steps
    (one holds a blank line) and joined with their ratings."""
    from test_data_prm800k import FOUND_ERROR, HUMAN, SOLVED
    from test_intervene import job_inputs

    from reasonlab.score import score_textset
    from reasonlab.steps import steps_job

    job_inputs(tiny_model_dir, tmp_path, [SOLVED, FOUND_ERROR, HUMAN] * 2, "prm", fmt="prm800k")
    score_textset(tmp_path / "h.json", tmp_path / "prm.parquet", tmp_path / "t.parquet",
                  tmp_path / "q.parquet", {}, name="prm")  # fmt: skip
    info = steps_job(tmp_path / "t.parquet", tmp_path / "q.parquet", tmp_path / "prm.parquet",
                     RULES, tmp_path / "steps.parquet", tmp_path / "steps.json")  # fmt: skip
    steps = pl.read_parquet(tmp_path / "steps.parquet").sort("id", "step")
    first = steps.filter(pl.col("id") == "1")
    # "2+3 is 5." and "# Answer\n\n5": two labelled steps, the blank line inside the second kept
    assert first["text"].to_list() == ["2+3 is 5.", "# Answer\n\n5"] and first[
        "rating"
    ].to_list() == [1, 1]
    assert steps.filter(pl.col("id") == "2")["rating"].to_list() == [0, -1]
    assert steps.filter(pl.col("id") == "3")["rating"].to_list() == [None, 1]
    tokens = pl.read_parquet(tmp_path / "t.parquet").filter(~pl.col("is_prompt"))
    one = tokens.filter(pl.col("id") == "1")
    assert first["n_tokens"].sum() == one.height  # every solution token in one step
    assert info["ratings"]["n_steps"] == 10 and set(info["ratings"]) >= {
        "entropy_mean",
        "by_rating",
    }


def test_a_group_too_small_to_map_gets_a_note_not_a_failure(tmp_path):
    from reasonlab.report import traces
    from reasonlab.tracemap import trace_map_job

    pl.DataFrame({"id": ["1"], "sample": [0], "step": pl.Series([None], dtype=pl.Int64), "kind": ["reasoning"],
                  "n_windows": [1], "vector": [[0.6, 0.8]]}).write_parquet(tmp_path / "e.parquet")  # fmt: skip
    pl.DataFrame({"id": ["1"], "sample": [0], "reasoning": ["Step 1: 2."], "completion": ["Step 1: 2."],
                  "answer": ["2"], "correct": [True], "n_completion_tokens": [4]}).write_parquet(tmp_path / "g.parquet")  # fmt: skip
    member = {"model": "m", "ckpt": "c", "order": 0, "embeddings": str(tmp_path / "e.parquet"),
              "generations": str(tmp_path / "g.parquet"), "steps": None}  # fmt: skip
    info = trace_map_job("solo", [member], MapOptions(), str(tmp_path / "map"))
    assert info["k"] is None and info["notes"] == [
        "traces.groups.solo: 1 embedded trace(s); a map and clusters need several"
    ]
    out = {t: tmp_path / f"{t}.parquet" for t in traces.TABLES}
    traces.aggregate_traces(["map/solo/-/0/d"], [tmp_path / "map.points.parquet"], out)
    blocks = traces.section({t: pl.read_parquet(p) for t, p in out.items()}, {})
    html = "".join(b.markup for b in blocks if hasattr(b, "markup"))
    assert "a map and clusters need several" in html
