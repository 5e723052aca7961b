"""The generation stage's aggregation (accuracy overall and per level, with Wilson intervals),
checked against plain-Python counts, and its report section on empty and all-null tables."""

import polars as pl
import pytest

from reasonlab.grading import wilson
from reasonlab.report import generate
from reasonlab.report.generate import GenJob, aggregate_generations
from reasonlab.report.html import Html, render, unpacked

LEVELS = ["Level 1", "Level 2", "Level 10", None]


def graded_rows(n: int, seed: int, with_levels: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"id": f"q{i}", "sample": 0, "prompt": f"p{i}", "completion": "c",
                     "reasoning": "r", "answer": "1", "reference": "1", "correct": (i * seed) % 3 == 0,
                     "grade_flag": "no answer" if i == 0 else None, "n_completion_tokens": 10 + i,
                     "finish_reason": "length" if i % 4 == 0 else "stop"}
                    | ({"level": LEVELS[i % 4], "type": None} if with_levels else {}))  # fmt: skip
    return rows


def write(tmp_path, name, rows):
    path = tmp_path / f"{name}.parquet"
    pl.DataFrame(rows, schema_overrides={"grade_flag": pl.String, "level": pl.String,
                                         "type": pl.String}).write_parquet(path)  # fmt: skip
    return path


@pytest.fixture
def jobs(tmp_path):
    rows = {("m", "base", 0): graded_rows(23, 1), ("m", "final", 1): graded_rows(17, 2)}
    out = [GenJob(m, c, o, "math", write(tmp_path, f"{m}_{c}", r)) for (m, c, o), r in rows.items()]
    # a dataset without levels, graded before graded tables carried the level: no level column
    out.append(GenJob("m", "final", 1, "gsm", write(tmp_path, "gsm", graded_rows(9, 5, False))))
    return out, rows


@pytest.fixture
def aggregated(jobs, tmp_path):
    out = {k: tmp_path / f"agg_{k}.parquet" for k in generate.TABLES}
    aggregate_generations(jobs[0], out)
    return {k: pl.read_parquet(v) for k, v in out.items()}


def test_accuracy_with_wilson_interval(aggregated, jobs):
    acc = aggregated["gen_accuracy"]
    for (_, c, _), rows in jobs[1].items():
        k = sum(r["correct"] for r in rows)
        row = acc.filter((pl.col("ckpt") == c) & (pl.col("dataset") == "math")).row(0, named=True)
        assert (row["n"], row["correct"], row["accuracy"]) == (len(rows), k, k / len(rows))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson(k, len(rows)))
        assert row["flagged"] == 1 and row["finished"] == sum(
            r["finish_reason"] == "stop" for r in rows
        )


def test_accuracy_per_level(aggregated, jobs):
    levels = aggregated["gen_levels"]
    assert set(levels["dataset"]) == {"math"}  # gsm has no levels: no rows
    for (_, c, _), rows in jobs[1].items():
        for level in LEVELS:
            mine = [r for r in rows if r["level"] == level]
            k = sum(r["correct"] for r in mine)
            where = pl.col("level").is_null() if level is None else pl.col("level") == level
            row = levels.filter((pl.col("ckpt") == c) & where).row(0, named=True)
            assert (row["n"], row["correct"]) == (len(mine), k)
            assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson(k, len(mine)))
    assert levels.group_by("ckpt").agg(pl.col("n").sum()).sort("ckpt")["n"].to_list() == [23, 17]


def test_lengths_and_traces_keep_the_level(aggregated):
    lengths, traces = aggregated["gen_lengths"], aggregated["gen_traces"]
    assert lengths.height == 23 + 17 + 9
    assert lengths.filter(pl.col("dataset") == "gsm")["level"].null_count() == 9
    assert traces.height == 3 * generate.TRACES_PER_JOB
    assert traces.filter(pl.col("ckpt") == "base")["level"].to_list() == LEVELS[:3]


def test_missing_output_path_is_a_clear_error(jobs, tmp_path):
    out = {k: tmp_path / f"{k}.parquet" for k in generate.TABLES if k != "gen_levels"}
    with pytest.raises(KeyError, match="no output path for table.*gen_levels"):
        aggregate_generations(jobs[0], out)


def test_no_jobs_gives_empty_tables_and_a_note(tmp_path):
    out = {k: tmp_path / f"{k}.parquet" for k in generate.TABLES}
    aggregate_generations([], out)
    tables = {k: pl.read_parquet(v) for k, v in out.items()}
    assert all(t.height == 0 for t in tables.values())
    assert "accuracy" in tables["gen_accuracy"].columns
    blocks = generate.section(tables, {})
    assert len(blocks) == 1 and "Nothing to show" in blocks[0].markup


def all_null(df: pl.DataFrame, rows: int = 3) -> pl.DataFrame:
    return pl.DataFrame({c: pl.Series(c, [None] * rows, dtype=t) for c, t in df.schema.items()})


def test_section_on_empty_and_all_null_tables(aggregated):
    for tables in (
        {k: v.clear() for k, v in aggregated.items()},
        {k: all_null(v) for k, v in aggregated.items()},
    ):
        doc = unpacked(render([(generate.KEY, generate.TITLE, generate.section(tables, {}))], "t"))
        assert "Nothing to show" in doc and "const charts" not in doc


def test_section_shows_levels_in_natural_order(aggregated):
    blocks = generate.section(aggregated, {})
    doc = unpacked(render([(generate.KEY, generate.TITLE, blocks)], "t"))
    assert "Accuracy per level" in doc and generate.NO_LEVEL in doc
    chart = next(b for b in blocks if hasattr(b, "spec") and "level" in str(b.spec["title"]))
    colour = chart.spec["layer"][1]["encoding"]["color"] if "layer" in chart.spec else None
    colour = colour or chart.spec["spec"]["layer"][1]["encoding"]["color"]
    assert colour["field"] == "level"
    assert colour["sort"] == ["Level 1", "Level 2", "Level 10", generate.NO_LEVEL]
    # only the levels dataset has a levels chart; the traces follow the selectors
    assert doc.count('<details class="rl-row"') == 3 * generate.TRACES_PER_JOB
    assert not any(
        isinstance(b, Html) and "no dataset has difficulty levels" in b.markup for b in blocks
    )
