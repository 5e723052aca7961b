"""The training stage's aggregation (loss curves, run checkpoints' steps, selections) on hand-made
run directories, and its report section on real, empty and all-null tables."""

import json

import polars as pl
import pytest

from reasonlab.models import Handle, write_handle
from reasonlab.report import training
from reasonlab.report.html import render, unpacked
from reasonlab.training import TrainingError

FINAL = {"r1": 30, "r2": 20}


def handle(model, ckpt, path):
    return Handle(model=model, ckpt=ckpt, kind="local", path=str(path), hub_id=None, revision=None,
                  commit=None, content_hash="sha256:0", tokenizer=None, dtype="float32",
                  is_adapter=False, base=None, architecture=None, model_type=None,
                  num_hidden_layers=None, hidden_size=None, vocab_size=None)  # fmt: skip


@pytest.fixture
def runs(tmp_path):
    outputs, selections, handles = [], [], []
    for run, final in FINAL.items():
        out = tmp_path / run / "output"
        (out / "checkpoint-10").mkdir(parents=True)
        history = [{"step": s, "loss": 4.0 / s, "learning_rate": 1e-3, "epoch": s / final}
                   for s in range(5, final + 1, 5)]  # fmt: skip
        history.append({"step": final, "eval_loss": 0.5})  # an evaluation entry: not a loss row
        (out / "trainer_state.json").write_text(
            json.dumps({"global_step": final, "log_history": history})
        )
        sel = tmp_path / f"{run}.selection.parquet"
        pl.DataFrame({"id": ["a", "b", "c"], "type": ["x", "y", "y"], "score": [-1.0, -2.0, -4.0],
                      "selected": [True, True, False]}).write_parquet(sel)  # fmt: skip
        outputs.append(out)
        selections.append(sel)
        for ckpt, where in (("step-10", out / "checkpoint-10"), ("final", out)):
            h = tmp_path / "handles" / f"tiny-{run}" / f"{ckpt}.json"
            write_handle(handle(f"tiny-{run}", ckpt, where), h)
            handles.append(h)
    return list(FINAL), outputs, selections, handles


@pytest.fixture
def aggregated(runs, tmp_path):
    out = {k: tmp_path / f"agg_{k}.parquet" for k in training.TABLES}
    training.aggregate_training(*runs, out)
    return {k: pl.read_parquet(v) for k, v in out.items()}


def test_checkpoints_get_their_run_and_step(aggregated):
    ck = aggregated["training_checkpoints"].sort("model", "step")
    assert ck.rows() == [
        ("tiny-r1", "step-10", "r1", 10), ("tiny-r1", "final", "r1", FINAL["r1"]),
        ("tiny-r2", "step-10", "r2", 10), ("tiny-r2", "final", "r2", FINAL["r2"]),
    ]  # fmt: skip


def test_loss_curves_and_selections(aggregated):
    loss = aggregated["training_loss"]
    for run, final in FINAL.items():
        mine = loss.filter(pl.col("run") == run).sort("step")
        assert mine["step"].to_list() == list(range(5, final + 1, 5))  # the eval entry is left out
        assert mine["loss"].to_list() == pytest.approx([4.0 / s for s in range(5, final + 1, 5)])
    sel = aggregated["training_selection"]
    assert sel.group_by("run").agg(pl.col("selected").sum()).sort("run").rows() == [
        ("r1", 2),
        ("r2", 2),
    ]


def test_handle_outside_every_run_is_a_clear_error(runs, tmp_path):
    names, outputs, selections, handles = runs
    stray = tmp_path / "stray.json"
    write_handle(handle("other", "step-10", tmp_path / "elsewhere"), stray)
    out = {k: tmp_path / f"{k}.parquet" for k in training.TABLES}
    with pytest.raises(
        TrainingError, match="other/step-10: its weights .* are in none of the runs"
    ):
        training.aggregate_training(names, outputs, selections, [*handles, stray], out)
    with pytest.raises(KeyError, match="no output path for table.*training_loss"):
        training.aggregate_training(names, outputs, selections, handles, {})


def by_type(ck):
    """score_by_type rows for every run checkpoint: two sample types, log-likelihood = -step/10."""
    return pl.DataFrame(
        [
            {
                "model": m,
                "ckpt": c,
                "ckpt_order": int(c == "final"),
                "textset": "pool",
                "type": t,
                "n_texts": 2,
                "avg_log_likelihood": -s / 10,
                "avg_llh_per_token": -s / 100 - (t == "y"),
                "avg_perplexity": 2.0,
                "avg_entropy": 1.0,
            }
            for m, c, _, s in ck.iter_rows()
            for t in ("x", "y")
        ]  # fmt: skip
    )


def test_section_draws_the_dynamics_over_steps(aggregated):
    tables = aggregated | {"score_by_type": by_type(aggregated["training_checkpoints"])}
    blocks = training.section(tables, {"models": ["tiny-r1", "tiny-r2", "untrained"]})
    specs = {b.spec["title"]["text"]: b.spec for b in blocks if hasattr(b, "spec")}
    dyn = specs["Mean log-probability per token, by sample type"]
    drawn = {(r["model"], r["step"], r["type"]): r["avg_llh_per_token"]
             for r in dyn["datasets"][dyn["data"]["name"]]}  # fmt: skip
    assert drawn[("tiny-r1", FINAL["r1"], "y")] == pytest.approx(-FINAL["r1"] / 100 - 1)
    assert len(drawn) == 4 * 2 and dyn["spec"]["layer"][0]["encoding"]["x"]["field"] == "step"
    loss = specs["Training loss"]
    assert {r["model"] for r in loss["datasets"][loss["data"]["name"]]} == {"tiny-r1", "tiny-r2"}
    colour = loss["encoding"]["color"]  # one panel: the loss has no text set
    assert colour["field"] == "model" and colour["scale"]["domain"] == [
        "tiny-r1",
        "tiny-r2",
        "untrained",
    ]


def all_null(df: pl.DataFrame, rows: int = 3) -> pl.DataFrame:
    return pl.DataFrame({c: pl.Series(c, [None] * rows, dtype=t) for c, t in df.schema.items()})


def test_section_on_empty_and_all_null_tables(aggregated):
    full = aggregated | {"score_by_type": by_type(aggregated["training_checkpoints"])}
    for tables in (
        {k: v.clear() for k, v in full.items()},
        {k: all_null(v) for k, v in full.items()},
    ):
        doc = unpacked(render([(training.KEY, training.TITLE, training.section(tables, {}))], "t"))
        assert "Nothing to show" in doc and "const charts" not in doc


def test_the_text_set_with_most_sample_types_is_shown_first(aggregated):
    """Two text sets: "a-eval" (no sample types) sorts first by name, "pool" (two types) is the one
    whose dynamics by type compare something, so the selector starts there."""
    rows = by_type(aggregated["training_checkpoints"])
    plain = rows.with_columns(textset=pl.lit("a-eval"), type=pl.lit(None, pl.String)).unique(
        ["model", "ckpt"]
    )
    tables = aggregated | {"score_by_type": pl.concat([plain, rows])}
    blocks = training.section(tables, {})
    bar = next(b.markup for b in blocks if hasattr(b, "markup") and 'data-sel="set"' in b.markup)
    assert '<option value="pool" selected>' in bar and '<option value="a-eval">' in bar
