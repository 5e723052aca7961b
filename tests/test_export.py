"""The seeds' own file formats (reasonlab.export), on tables written by hand."""

import polars as pl
import pytest

from reasonlab.export import export_seed003, seed003_dynamics


def tables():
    by_type = pl.DataFrame({
        "model": ["m"] * 5 + ["other"],
        "ckpt": ["final", "step-10", "step-10", "final", "base", "step-10"],
        "textset": ["pool"] * 6,
        "type": ["a", "a", "b", "b", "a", "a"],
        "avg_perplexity": [1.5, 3.0, 4.0, 2.0, 9.0, 7.0],
        "avg_log_likelihood": [-5.0, -20.0, -30.0, -10.0, -90.0, -70.0],
    })  # fmt: skip
    ckpts = pl.DataFrame({"model": ["m", "m", "m"], "ckpt": ["final", "step-10", "base"],
                          "run": ["r"] * 3, "step": [40, 10, None]})  # fmt: skip
    return by_type, ckpts


def test_seed_003s_dynamics_follow_the_steps():
    by_type, ckpts = tables()
    got = seed003_dynamics(by_type, ckpts, "m", "pool")
    # the checkpoint without a step (the run's base) is left out; lists in step order
    assert got == {"steps": [10, 40], "results_by_type": {
        "a": {"avg_perplexity": [3.0, 1.5], "avg_log_likelihood": [-20.0, -5.0]},
        "b": {"avg_perplexity": [4.0, 2.0], "avg_log_likelihood": [-30.0, -10.0]}}}  # fmt: skip
    # a type missing at one checkpoint is a null in its place
    part = seed003_dynamics(by_type.filter(~((pl.col("type") == "b") & (pl.col("ckpt") == "final"))),
                            ckpts, "m", "pool")  # fmt: skip
    assert part["results_by_type"]["b"]["avg_perplexity"] == [4.0, None]


def test_export_writes_one_file_per_pair(tmp_path):
    import json

    by_type, ckpts = tables()
    by_type.write_parquet(tmp_path / "t.parquet")
    ckpts.write_parquet(tmp_path / "c.parquet")
    out = tmp_path / "x" / "m" / "pool_dynamics.json"
    export_seed003(tmp_path / "t.parquet", tmp_path / "c.parquet", ["m/pool"], [str(out)])
    assert json.loads(out.read_text())["steps"] == [10, 40]
    with pytest.raises(ValueError):
        export_seed003(tmp_path / "t.parquet", tmp_path / "c.parquet", ["m/pool"], [])
