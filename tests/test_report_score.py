"""The score stage's aggregation, checked against direct computations on hand-made tables, and its
report section on empty, all-null and all-empty-generation tables."""

import math

import polars as pl
import pytest

from reasonlab.report import score
from reasonlab.report.html import render, unpacked
from reasonlab.report.score import ScoreJob, aggregate_scores
from reasonlab.textsets import label as textset_label

OUT_KEYS = score.TABLES + score.OPTIONAL_TABLES


def short(name: str) -> str:
    return name.removeprefix("score_")


def write_job(tmp_path, ckpt, order, entropies, textset="set", gen_shift=None):
    """A score job with two texts: 'a' (type x) and 'b' (type y), and an empty text 'c'.
    With `gen_shift`, the tokens carry a generator log-probability of logprob + shift."""
    rows = []
    for tid, ents in entropies.items():
        for pos, e in enumerate(ents, 1):
            rows.append({"id": tid, "position": pos, "token": f"<{tid}{pos}>", "logprob": -e / 2, "prob": 0.5,
                         "entropy": e, "varentropy": 0.1, "rank": 1 if e < 1 else 2, "top1_token": "t",
                         "is_prompt": False})  # fmt: skip
            if gen_shift is not None:
                rows[-1]["gen_logprob"] = -e / 2 + gen_shift(tid, pos)
    tokens = pl.DataFrame(rows)
    seqs = (
        tokens.group_by("id")
        .agg(
            n_tokens=pl.len(),
            llh_sum=pl.col("logprob").sum(),
            entropy_mean=pl.col("entropy").mean(),
        )
        .with_columns(llh_mean=pl.col("llh_sum") / pl.col("n_tokens"))
        .with_columns(perplexity=(-pl.col("llh_mean")).exp())
        .join(pl.DataFrame({"id": ["a", "b"], "type": ["x", "y"]}), on="id")
        .sort("id")
    )
    seqs = pl.concat(
        [seqs, pl.DataFrame({"id": ["c"], "n_tokens": [0], "type": ["x"]})], how="diagonal_relaxed"
    )
    t, s = tmp_path / f"{ckpt}.tokens.parquet", tmp_path / f"{ckpt}.sequences.parquet"
    tokens.write_parquet(t)
    seqs.write_parquet(s)
    return ScoreJob("m", ckpt, order, textset, t, s)


@pytest.fixture
def aggregated(tmp_path):
    jobs = [
        write_job(tmp_path, "base", 0, {"a": [4.0, 3.0, 2.0], "b": [5.0, 1.0]}),
        write_job(tmp_path, "final", 1, {"a": [0.5, 0.2, 0.1], "b": [0.4, 0.3]}),
    ]
    out = {k: tmp_path / f"agg_{k}.parquet" for k in OUT_KEYS}
    aggregate_scores(jobs, out, sample_prompts=1, extremes=2, detailed=True)
    return {short(k): pl.read_parquet(v) for k, v in out.items()}


def test_per_checkpoint_statistics(aggregated):
    ck = aggregated["checkpoints"].sort("ckpt_order")
    assert ck["n_tokens"].to_list() == [5, 5] and ck["n_texts"].to_list() == [3, 3]
    assert ck["entropy_mean"].to_list() == pytest.approx([3.0, 0.3])
    assert ck["entropy_max"].to_list() == [5.0, 0.5] and ck["entropy_min"].to_list() == [1.0, 0.1]
    assert ck["top1_match"].to_list() == pytest.approx([0.0, 1.0])


def test_histogram_counts_every_token_once(aggregated):
    h = aggregated["entropy_hist"]
    assert h.group_by("ckpt").agg(pl.col("count").sum()).sort("ckpt")["count"].to_list() == [5, 5]
    density_integral = h.with_columns(
        area=pl.col("density") * (pl.col("bin_end") - pl.col("bin_start"))
    )
    assert density_integral.group_by("ckpt").agg(pl.col("area").sum())[
        "area"
    ].to_list() == pytest.approx([1.0, 1.0])


def test_by_type_dynamics(aggregated):
    bt = aggregated["by_type"].sort("type", "ckpt_order")
    # type x is text a only (text c is empty and has no statistics)
    assert bt.filter(pl.col("type") == "x")["avg_log_likelihood"].to_list() == pytest.approx(
        [-4.5, -0.4]
    )
    assert bt.filter(pl.col("type") == "y")["avg_log_likelihood"].to_list() == pytest.approx(
        [-3.0, -0.35]
    )
    assert bt["n_texts"].to_list() == [1, 1, 1, 1]


def test_extremes_with_context_and_steps(aggregated):
    ext = aggregated["extremes"].filter(pl.col("ckpt") == "base")
    high = ext.filter(pl.col("which") == "highest").sort("entropy", descending=True)
    assert high["entropy"].to_list() == [5.0, 4.0]
    low = ext.filter(pl.col("which") == "lowest").sort("entropy")
    assert low["entropy"].to_list() == [1.0, 2.0]
    assert low.row(0, named=True)["context"] == "<b1>"  # the token before b's second token
    assert low.row(1, named=True)["context"] == "<a1><a2>"
    assert high.row(0, named=True)["context"] is None  # the first token has no context
    steps = aggregated["steps"]
    assert set(steps["id"]) == {"a"} and steps.filter(pl.col("ckpt") == "final")[
        "entropy"
    ].to_list() == [0.5, 0.2, 0.1]


def test_detailed_tokens_only_on_request(aggregated, tmp_path):
    assert aggregated["tokens"].height == 10 and set(aggregated["tokens"]["ckpt"]) == {
        "base",
        "final",
    }
    job = write_job(tmp_path, "base", 0, {"a": [1.0], "b": [2.0]})
    out = {k: tmp_path / f"x_{k}.parquet" for k in score.TABLES}
    aggregate_scores([job], out, detailed=False)
    assert not (tmp_path / "x_score_tokens.parquet").exists()
    assert pl.read_parquet(out["score_agreement"]).height == 0  # no generated set: an empty table
    with pytest.raises(KeyError, match="no output path for table.*score_tokens"):
        aggregate_scores([job], out, detailed=True)


def test_textset_labels():
    assert textset_label("eval@m@final", "m", "final") == "eval@self"
    assert textset_label("eval@m@final", "m", "base") == "eval@m@final"  # cross-scored
    assert textset_label("eval@m@final", "other", "final") == "eval@m@final"
    assert textset_label("eval", "m", "final") == "eval"


def test_agreement_of_own_generations_only(tmp_path):
    def shift(tid, pos):
        return {("a", 2): 0.004, ("b", 1): -2e-4}.get((tid, pos), 1e-6)

    own = write_job(
        tmp_path, "final", 1, {"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0]}, "ev@m@final", shift
    )
    cross = write_job(tmp_path, "base", 0, {"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0]}, "ev@m@final",
                      lambda *_: 1.0)  # fmt: skip
    out = {k: tmp_path / f"g_{k}.parquet" for k in score.TABLES}
    aggregate_scores([cross, own], out)
    agree = pl.read_parquet(out["score_agreement"])
    assert agree["ckpt"].to_list() == ["final"] and agree["textset"].to_list() == ["ev@self"]
    row = agree.row(0, named=True)
    assert row["n_compared"] == 5 and row["max_abs_diff"] == pytest.approx(0.004)
    assert row["mean_abs_diff"] == pytest.approx((0.004 + 2e-4 + 3e-6) / 5)
    assert row["within_tolerance"] == pytest.approx(4 / 5)
    seqs = pl.read_parquet(out["score_sequences"])
    assert set(seqs["textset"]) == {"ev@self", "ev@m@final"}


def test_agreement_tolerance_follows_the_coarser_dtype():
    # 100 tokens: 99 off by 0.01 nats, one by 0.6: fine for bfloat16 (99th percentile), not float32
    diffs = [0.01] * 99 + [0.6]
    tokens = pl.DataFrame({"is_prompt": [False] * 100, "logprob": [-1.0] * 100,
                           "gen_logprob": [-1.0 - d for d in diffs]})  # fmt: skip
    assert score.coarsest("float32", "bfloat16") == "bfloat16"
    assert score.coarsest(None, "float16") == "float16" and score.coarsest() == "float32"
    f32 = score.agreement(tokens, "float32").row(0, named=True)
    bf16 = score.agreement(tokens, "bfloat16").row(0, named=True)
    assert (f32["judged_by"], f32["agrees"]) == ("max_abs_diff", False)
    assert (bf16["judged_by"], bf16["tolerance"], bf16["agrees"]) == ("p99_abs_diff", 0.25, True)
    expected_p99 = sorted(diffs)[98]  # polars' nearest-rank quantile
    assert bf16["p99_abs_diff"] == pytest.approx(expected_p99, abs=1e-9)
    assert bf16["within_tolerance"] == pytest.approx(0.99)
    # the dtypes come from the score job's sequences (scorer) and the generations (generator)
    assert score.tolerance("float16") == ("p99_abs_diff", 0.05)


def all_null(df: pl.DataFrame, rows: int = 3) -> pl.DataFrame:
    """A table of `df`'s columns and types whose every value is null."""
    return pl.DataFrame({c: pl.Series(c, [None] * rows, dtype=t) for c, t in df.schema.items()})


def rendered(blocks) -> str:
    return unpacked(render([(score.KEY, score.TITLE, blocks)], "t"))


def test_generations_with_only_empty_completions_render(tmp_path):
    """A generation job whose completions are all empty: its own-generations text set has no
    completion token, so no log-probability is compared (the report used to fail formatting the
    largest difference, None, with a TypeError)."""
    tokens = pl.DataFrame(
        {"id": ["a", "b"], "position": [0, 0], "token": ["<p>", "<p>"], "logprob": [-1.0, -1.0],
         "prob": [0.4, 0.4], "entropy": [1.0, 1.0], "varentropy": [0.1, 0.1], "rank": [1, 1],
         "top1_token": ["t", "t"], "is_prompt": [True, True], "gen_logprob": [None, None]},
        schema_overrides={"gen_logprob": pl.Float64},
    )  # fmt: skip
    nulls = {"llh_sum": None, "llh_mean": None, "perplexity": None, "entropy_mean": None}
    seqs = pl.DataFrame(
        [{"id": i, "n_tokens": 0, "type": "incorrect"} | nulls for i in ("a", "b")],
        schema_overrides=dict.fromkeys(nulls, pl.Float64),
    )
    tokens.write_parquet(tmp_path / "t.parquet")
    seqs.write_parquet(tmp_path / "s.parquet")
    out = {k: tmp_path / f"{k}.parquet" for k in score.TABLES}
    job = ScoreJob("m", "final", 1, "ev@m@final", tmp_path / "t.parquet", tmp_path / "s.parquet")
    aggregate_scores([job], out)
    tables = {k: pl.read_parquet(v) for k, v in out.items()}
    row = tables["score_agreement"].row(0, named=True)
    assert (row["n_tokens"], row["n_compared"], row["max_abs_diff"]) == (0, 0, None)
    doc = rendered(score.section(tables, {}))
    assert "No token could be compared" in doc
    assert "Nothing to show: no completion token was scored" in doc


def test_section_on_empty_tables_is_a_note(aggregated):
    tables = {k: aggregated[short(k)].clear() for k in score.TABLES}
    blocks = score.section(tables, {})
    doc = rendered(blocks)
    assert len(blocks) == 1 and "Nothing to show" in doc and "const charts" not in doc


def test_section_on_all_null_tables_is_a_note(aggregated):
    tables = {k: all_null(aggregated[short(k)]) for k in score.TABLES}
    doc = rendered(score.section(tables, {}))
    assert "Nothing to show" in doc and "const charts" not in doc


def test_section_draws_the_aggregated_values(aggregated):
    tables = {k: aggregated[short(k)] for k in score.TABLES}
    blocks = score.section(tables, {})
    specs = {s.spec["title"]["text"]: s.spec for s in blocks if hasattr(s, "spec")}
    hist = specs["Token entropy distribution"]
    counts = {}
    for r in hist["datasets"][hist["data"]["name"]]:
        counts[r["ckpt"]] = counts.get(r["ckpt"], 0) + r["count"]
    assert counts == {"base": 5, "final": 5}  # every completion token of each checkpoint, once
    ent = specs["Mean token entropy (bars: 10th–90th percentile)"]
    drawn = {r["ckpt"]: r["entropy_mean"] for r in ent["datasets"][ent["data"]["name"]]}
    assert drawn == pytest.approx(
        {"base": (4 + 3 + 2 + 5 + 1) / 5, "final": (0.5 + 0.2 + 0.1 + 0.4 + 0.3) / 5}
    )
    assert not any(math.isnan(v) for v in drawn.values())
