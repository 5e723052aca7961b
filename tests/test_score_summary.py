"""Aggregations of score tables, checked against direct computations on hand-made tables."""

import polars as pl
import pytest

from reasonlab.score_summary import ScoreJob, aggregate_scores, textset_label

OUT_KEYS = (
    "sequences", "checkpoints", "entropy_hist", "steps", "extremes", "by_type", "agreement", "tokens",
)  # fmt: skip


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
    return {k: pl.read_parquet(v) for k, v in out.items()}


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
    out = {k: tmp_path / f"x_{k}.parquet" for k in OUT_KEYS[:-1]}
    aggregate_scores([job], out, detailed=False)
    assert not (tmp_path / "x_tokens.parquet").exists()
    assert pl.read_parquet(out["agreement"]).height == 0  # no generated text set: an empty table


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
    out = {k: tmp_path / f"g_{k}.parquet" for k in OUT_KEYS[:-1]}
    aggregate_scores([cross, own], out)
    agree = pl.read_parquet(out["agreement"])
    assert agree["ckpt"].to_list() == ["final"] and agree["textset"].to_list() == ["ev@self"]
    row = agree.row(0, named=True)
    assert row["n_compared"] == 5 and row["max_abs_diff"] == pytest.approx(0.004)
    assert row["mean_abs_diff"] == pytest.approx((0.004 + 2e-4 + 3e-6) / 5)
    assert row["within_tolerance"] == pytest.approx(4 / 5)
    seqs = pl.read_parquet(out["sequences"])
    assert set(seqs["textset"]) == {"ev@self", "ev@m@final"}
