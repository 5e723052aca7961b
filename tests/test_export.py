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


# ------------------------------------------------------------------------------ seed 002


def test_qcut_codes_are_pandas_qcut():
    import numpy as np

    from reasonlab.export import qcut_codes

    # by hand: ten distinct values, one per decile; equal values leave no bin
    ranks = [3, 1, 2, 0, 9, 8, 4, 5, 7, 6]
    assert qcut_codes([float(r) for r in ranks]) == ranks
    assert qcut_codes([1.0, 1.0, 1.0]) == [None, None, None]
    assert qcut_codes([]) == []
    pd = pytest.importorskip("pandas")  # an independent computation where pandas is installed
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 10, 11, 57, 500):
        for x in (rng.gamma(1.0, size=n), rng.integers(0, 4, size=n).astype(float),
                  np.round(rng.normal(size=n), 1)):  # fmt: skip
            want = pd.qcut(x, 10, labels=False, duplicates="drop")
            want = [None if np.isnan(v) else int(v) for v in np.asarray(want, dtype=float)]
            assert qcut_codes(x) == want, (n, x)


def seed002_tables():
    """Two checkpoints' own generations: `a` on prompts p1, p2; `b` on p2 and p3 (a new prompt).
    `a`'s score table also holds prompt rows (score.scope all) and an appended end-of-sequence
    token, neither of them generated; rows come in no particular order."""
    gen_schema = {"id": pl.String, "sample": pl.Int64, "prompt": pl.String, "completion": pl.String,
                  "prompt_ids": pl.List(pl.Int64), "token_ids": pl.List(pl.Int64)}  # fmt: skip
    long = "Q3 " + "x" * 1500
    a_gen = pl.DataFrame({"id": ["p1", "p2"], "sample": [0, 0], "prompt": ["Q1", "Q2"],
                          "completion": ["xy", "z"], "prompt_ids": [[1, 2, 3], [1, 4]],
                          "token_ids": [[5, 6], [7]]}, schema=gen_schema)  # fmt: skip
    a_tok = pl.DataFrame({
        "id": ["p2", "p1", "p1", "p1", "p1", "p1"],
        "position": [1, 2, 3, 1, 1, 2],
        "token": ["z", "y", "<eos>", "x", "b", "c"],
        "logprob": [-1.0, -0.25, -3.0, -0.5, -2.0, -2.0],
        "entropy": [0.5, 2.0, 9.0, 1.0, 7.0, 7.0],
        "is_prompt": [False, False, False, False, True, True],
    })  # fmt: skip
    b_gen = pl.DataFrame({"id": ["p2", "p3"], "sample": [0, 0], "prompt": ["Q2", long],
                          "completion": ["zz", "w"], "prompt_ids": [[1, 4], [9]],
                          "token_ids": [[7, 7], [8]]}, schema=gen_schema)  # fmt: skip
    b_tok = pl.DataFrame({"id": ["p2", "p2", "p3"], "position": [1, 2, 1], "token": ["z", "z", "w"],
                          "logprob": [-0.1, -0.2, -0.3], "entropy": [0.1, 0.3, 0.7],
                          "is_prompt": [False] * 3})  # fmt: skip
    return {
        "a": {"tokens": a_tok, "generations": a_gen, "first_inputs": {"p1": "c", "p2": "d"},
              "path": "/models/a"},
        "b": {"tokens": b_tok, "generations": b_gen, "first_inputs": {"p2": "d", "p3": "q"},
              "path": "org/b"},
    }, long  # fmt: skip


def test_seed_002s_token_rows_are_the_generated_tokens():
    import numpy as np

    from reasonlab.export import SEED002_TOKEN_COLUMNS, seed002_files

    runs, _ = seed002_tables()
    got = seed002_files(runs, 8)
    a = got["detailed"]["a"]
    assert a.columns == [*SEED002_TOKEN_COLUMNS, "prompt_index"]
    assert a.rows() == [
        ("c", "x", 1.0, pytest.approx(np.exp(-0.5)), 1, 0),
        ("x", "y", 2.0, pytest.approx(np.exp(-0.25)), 2, 0),
        ("d", "z", 0.5, pytest.approx(np.exp(-1.0)), 1, 1),
    ]
    assert got["detailed"]["b"].select("current_token", "next_token", "prompt_index").rows() == [
        ("d", "z", 1), ("z", "z", 1), ("q", "w", 2)]  # fmt: skip
    stats = got["token_stats"]["a"]
    assert stats.columns == [*SEED002_TOKEN_COLUMNS, "entropy_qcut"]
    # deciles of (1.0, 2.0, 0.5): 0.5 is the lowest edge, 1.0 the median edge, 2.0 the top one
    assert stats["entropy_qcut"].to_list() == [4, 9, 0]


def test_seed_002s_prompt_level_results_and_summary():
    import numpy as np

    from reasonlab.export import seed002_files

    runs, long = seed002_tables()
    got = seed002_files(runs, 8)
    level = got["prompt_level"]
    stats = ["text", "num_tokens", "mean_entropy", "std_entropy", "median_entropy"]
    assert level.columns == ["prompt_index", "prompt", *(f"{m}_{s}" for m in "ab" for s in stats)]
    assert level["prompt_index"].to_list() == [0, 1, 2]
    assert level["prompt"].to_list() == ["Q1", "Q2", long[:1000]]
    assert level["a_text"].to_list() == ["xy", "z", None]
    assert level["a_num_tokens"].to_list() == [2, 1, None]
    assert level["a_mean_entropy"].to_list() == [1.5, 0.5, None]
    std = pytest.approx(np.std([1.0, 2.0], ddof=1))
    assert level["a_std_entropy"].to_list() == [std, None, None]
    assert level["a_median_entropy"].to_list() == [1.5, 0.5, None]
    assert level["b_num_tokens"].to_list() == [None, 2, 1]
    assert level["b_mean_entropy"].to_list() == [None, pytest.approx(0.2), 0.7]
    std = pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert level["b_std_entropy"].to_list() == [None, std, None]
    summary = got["summary"]
    assert list(summary) == ["model_paths", "num_examples_processed", "max_new_tokens", *(
        f"{m}_{s}" for m in "ab" for s in ("total_tokens", "mean_entropy", "std_entropy",
                                           "median_entropy", "min_entropy", "max_entropy"))]  # fmt: skip
    assert summary["model_paths"] == {"a": "/models/a", "b": "org/b"}
    assert summary["num_examples_processed"] == 3 and summary["max_new_tokens"] == 8
    e = np.array([1.0, 2.0, 0.5])
    assert summary["a_total_tokens"] == 3
    assert summary["a_mean_entropy"] == pytest.approx(e.mean())
    assert summary["a_std_entropy"] == pytest.approx(e.std(ddof=1))
    assert [summary[f"a_{s}_entropy"] for s in ("median", "min", "max")] == [1.0, 0.5, 2.0]


def test_seed_002_uses_the_first_sample_of_each_prompt():
    from reasonlab.export import seed002_tokens

    gen = pl.DataFrame({"id": ["p1", "p1"], "sample": [0, 1], "prompt": ["Q"] * 2,
                        "completion": ["a", "bc"], "prompt_ids": [[1], [1]],
                        "token_ids": [[2], [3, 4]]})  # fmt: skip
    tok = pl.DataFrame({"id": ["p1#0", "p1#1", "p1#1"], "position": [1, 1, 2],
                        "token": ["a", "b", "c"], "logprob": [0.0] * 3, "entropy": [0.1, 0.2, 0.3],
                        "is_prompt": [False] * 3})  # fmt: skip
    got = seed002_tokens(tok, gen, {"p1": "<q>"}, {"p1": 0})
    assert got.select("current_token", "next_token", "entropy").rows() == [("<q>", "a", 0.1)]


def test_export_seed002_writes_the_seeds_files(tmp_path, tiny_model_dir):
    import csv
    import json

    from reasonlab.export import export_seed002
    from reasonlab.models import load_tokenizer, resolve, write_handle

    h = resolve("m", "base", {"source": str(tiny_model_dir), "checkpoints": {"base": None}})
    write_handle(h, tmp_path / "h.json")
    runs, _ = seed002_tables()
    paths = []
    for name, r in runs.items():
        r["tokens"].write_parquet(tmp_path / f"{name}.tokens.parquet")
        r["generations"].write_parquet(tmp_path / f"{name}.parquet")
        paths.append((str(tmp_path / f"{name}.tokens.parquet"), str(tmp_path / f"{name}.parquet")))
    out = tmp_path / "export" / "d"
    summary = export_seed002(["a", "b"], [t for t, _ in paths], [g for _, g in paths],
                             [str(tmp_path / "h.json")] * 2, 8, out)  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "a_all_tokens_detailed.csv", "a_token_stats.csv", "b_all_tokens_detailed.csv",
        "b_token_stats.csv", "prompt_level_results.csv", "results_summary.json"]  # fmt: skip
    assert json.loads((out / "results_summary.json").read_text()) == summary
    assert summary["model_paths"] == {"a": str(tiny_model_dir), "b": str(tiny_model_dir)}
    rows = list(csv.DictReader((out / "a_token_stats.csv").open()))
    assert list(rows[0]) == ["current_token", "next_token", "entropy", "probability_of_next_token",
                             "generation_step", "entropy_qcut"]  # fmt: skip
    # the first step reads the prompt's last token, decoded by the checkpoint's tokenizer
    tok = load_tokenizer(h)
    assert [r["current_token"] for r in rows] == [tok.decode([3]), "x", tok.decode([4])]
    assert [r["entropy_qcut"] for r in rows] == ["4", "9", "0"]
    detailed = list(csv.DictReader((out / "a_all_tokens_detailed.csv").open()))
    assert [r["prompt_index"] for r in detailed] == ["0", "0", "1"]
    level = list(csv.DictReader((out / "prompt_level_results.csv").open()))
    assert len(level) == 3 and level[2]["a_text"] == "" and level[0]["a_std_entropy"] != ""
    assert not list(out.glob("*.tmp"))


# ------------------------------------------------------------------------------ seed 001


def test_seed_001s_intervention_results_by_strength():
    from reasonlab.export import seed001_interventions

    settings = pl.DataFrame({
        "setting": ["baseline", "steer -0.4", "steer +0.4", "steer +1", "steer +0"],
        "order": [0, 1, 2, 3, 4],
        "kind": ["baseline", "steer", "steer", "steer", "steer"],
        "strength": [None, -0.4, 0.4, 1.0, -0.0],
        "status": ["ok", "ok", "ok", "failed: non-finite logits at generated token 3", "ok"],
    })  # fmt: skip
    table = pl.DataFrame({
        "setting": ["baseline", "baseline", "steer -0.4", "steer -0.4", "steer +0.4", "steer +0.4",
                    "steer +0", "steer +0"],
        "completion": ["b1", "b2", "n1", "n2", "p1", "p2", "z1", "z2"],
    })  # fmt: skip
    got = seed001_interventions(table, settings)
    # strengths ascending as Python prints them; the baseline is 0.0 (a swept 0 is the baseline
    # again); a failed setting has no texts
    assert got == {"-0.4": ["n1", "n2"], "0.0": ["b1", "b2"], "0.4": ["p1", "p2"], "1.0": []}
    assert list(got) == ["-0.4", "0.0", "0.4", "1.0"]


def cka_table():
    import numpy as np

    rng = np.random.default_rng(1)
    values = rng.uniform(0.1, 1.0, size=(3, 4))
    values[0, 0] = np.nan  # a layer that does not vary over the inputs
    rows = [{"layer_a": a, "layer_b": b, "cka": float(values[a, b]), "position": "last_prompt"}
            for a in range(3) for b in range(4)]  # fmt: skip
    return pl.DataFrame(rows[::-1]), values


def test_seed_001s_alignment_results():
    import numpy as np

    from reasonlab.export import seed001_alignment

    table, values = cka_table()
    rng = np.random.default_rng(2)
    da = {layer: rng.normal(size=8) for layer in (0, 1, 2)}
    db = {layer: rng.normal(size=8) for layer in (1, 2, 3)}
    got = seed001_alignment(table, da, db)
    assert list(got) == ["cka_matrix", "best_layer_alignments", "diagonal_cka", "mean_diagonal_cka",
                         "direction_similarities", "mean_direction_similarity", "cka_statistics"]  # fmt: skip
    assert list(got["cka_matrix"]) == [f"{a},{b}" for a in range(3) for b in range(4)]
    assert got["cka_matrix"]["0,0"] is None and got["cka_matrix"]["2,3"] == values[2, 3]
    for a in range(3):
        b = int(np.nanargmax(values[a]))
        want = {"aligned_layer": b, "cka_score": values[a, b]}
        assert got["best_layer_alignments"][str(a)] == want
    assert got["diagonal_cka"] == {"0": None, "1": values[1, 1], "2": values[2, 2]}
    assert got["mean_diagonal_cka"] == pytest.approx((values[1, 1] + values[2, 2]) / 2)
    cos = {str(k): da[k] @ db[k] / np.linalg.norm(da[k]) / np.linalg.norm(db[k]) for k in (1, 2)}
    assert got["direction_similarities"] == pytest.approx(cos)
    assert got["mean_direction_similarity"] == pytest.approx(np.mean(list(cos.values())))
    finite = values[~np.isnan(values)]
    assert got["cka_statistics"] == pytest.approx({
        "mean": finite.mean(), "std": finite.std(), "min": finite.min(), "max": finite.max(),
        "median": np.median(finite)})  # fmt: skip
    # without directions on both sides: no similarities
    assert "direction_similarities" not in seed001_alignment(table, da, None)


def test_export_seed001_alignment_reads_the_directions_at_the_ckas_position(tmp_path):
    import json

    import numpy as np
    import torch

    from reasonlab.export import export_seed001_alignment, export_seed001_interventions

    table, _ = cka_table()
    table.write_parquet(tmp_path / "cka.parquet")
    rng = np.random.default_rng(3)
    raw = {side: rng.normal(size=(6, 8)) for side in "ab"}
    for side in "ab":  # as the directions rule saves them: candidates x (position, layer)
        torch.save({"positions": ["last_prompt"] * 3 + ["completion_mean"] * 3,
                    "layers": [0, 1, 2] * 2, "raw": torch.tensor(raw[side]), "chosen": None,
                    "model": side, "contrast": "reasoning"}, tmp_path / f"{side}.pt")  # fmt: skip
    out = tmp_path / "x" / "alignment_results.json"
    export_seed001_alignment(tmp_path / "cka.parquet", out, [tmp_path / "a.pt", tmp_path / "b.pt"])
    got = json.loads(out.read_text())
    a, b = raw["a"][:3], raw["b"][:3]
    want = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert got["direction_similarities"] == pytest.approx({str(i): want[i] for i in range(3)})
    export_seed001_alignment(tmp_path / "cka.parquet", out, None)
    assert "direction_similarities" not in json.loads(out.read_text())
    settings = pl.DataFrame({"setting": ["baseline"], "order": [0], "kind": ["baseline"],
                             "strength": [None], "status": ["ok"]}, schema_overrides={"strength": pl.Float64})  # fmt: skip
    settings.write_parquet(tmp_path / "s.parquet")
    table = pl.DataFrame({"setting": ["baseline"], "completion": ["t"]})
    table.write_parquet(tmp_path / "t.parquet")
    path = tmp_path / "y" / "intervention_results.json"
    got = export_seed001_interventions(tmp_path / "t.parquet", tmp_path / "s.parquet", path)
    assert got == {"0.0": 1}
    assert json.loads(path.read_text()) == {"0.0": ["t"]}


# ------------------------------------------------------------------------------ on the demo


@pytest.mark.e2e
def test_seed_files_on_the_demo(demo_run):
    """export.seed_formats on the demo: seed 002's files of tiny's checkpoints' own generations
    (their rows and statistics recomputed from the score tables), seed 001's intervention and
    alignment results of tiny's steering jobs and CKA pairs."""
    import json
    from itertools import pairwise

    import numpy as np
    import yaml

    from reasonlab.export import SEED002_TOKEN_COLUMNS

    cfg = yaml.safe_load((demo_run / "config.yaml").read_text())
    tiny = cfg["models"]["tiny"]["checkpoints"]
    names = [f"tiny_{c}" for c in tiny]
    out = demo_run / "results/export/seed002/demo-eval"
    summary = json.loads((out / "results_summary.json").read_text())
    n_eval = cfg["demo"]["sizes"]["eval"]
    assert summary["num_examples_processed"] == n_eval
    assert summary["max_new_tokens"] == cfg["generation"]["max_new_tokens"]
    assert list(summary["model_paths"]) == names
    level = pl.read_csv(out / "prompt_level_results.csv")
    assert level.height == n_eval and level.columns[:2] == ["prompt_index", "prompt"]
    assert level.width == 2 + 5 * len(names)
    for name, ckpt in zip(names, tiny, strict=True):
        stats = pl.read_csv(out / f"{name}_token_stats.csv")
        detailed = pl.read_csv(out / f"{name}_all_tokens_detailed.csv")
        assert stats.columns == [*SEED002_TOKEN_COLUMNS, "entropy_qcut"]
        assert detailed.columns == [*SEED002_TOKEN_COLUMNS, "prompt_index"]
        assert set(stats["entropy_qcut"]) == set(range(10))
        gens = pl.read_parquet(demo_run / f"results/generations/tiny/{ckpt}/demo-eval.parquet")
        tokens = pl.read_parquet(
            demo_run / f"results/scores/tiny/{ckpt}/demo-eval@tiny@{ckpt}.tokens.parquet"
        ).filter(~pl.col("is_prompt"))
        assert stats.height == detailed.height == gens["n_completion_tokens"].sum()
        assert summary[f"{name}_total_tokens"] == stats.height
        e = tokens["entropy"].to_numpy()
        assert summary[f"{name}_mean_entropy"] == pytest.approx(e.mean())
        assert summary[f"{name}_std_entropy"] == pytest.approx(np.std(e, ddof=1))
        assert level[f"{name}_num_tokens"].to_list() == gens["n_completion_tokens"].to_list()
        steps = detailed.filter(pl.col("generation_step") > 1)  # read the token generated before
        previous = detailed.with_columns(pl.col("generation_step") + 1).select(
            "prompt_index", "generation_step", previous="next_token")  # fmt: skip
        joined = steps.join(previous, on=["prompt_index", "generation_step"])
        assert joined.height == steps.height
        assert (joined["current_token"] == joined["previous"]).all()
    specs = cfg["interventions"]["specs"]
    for ckpt in tiny:
        path = demo_run / f"results/export/seed001/tiny/{ckpt}/steer/intervention_results.json"
        got = json.loads(path.read_text())
        assert list(got) == [str(float(s)) for s in sorted([0.0, *specs["steer"]["strengths"]])]
        assert len(got["0.0"]) == cfg["interventions"]["max_prompts"]
        assert all(len(v) in (0, len(got["0.0"])) for v in got.values())
        assert not (path.parent.parent / "ablate").exists()
    for a, b in pairwise(tiny):
        path = demo_run / f"results/export/seed001/tiny/{a}/tiny/{b}/alignment_results.json"
        got = json.loads(path.read_text())
        cka = pl.read_parquet(demo_run / f"results/cka/tiny/{a}/tiny/{b}.parquet")
        assert len(got["cka_matrix"]) == cka.height
        layers = [str(x) for x in sorted(set(cka["layer_a"]))]
        assert list(got["diagonal_cka"]) == layers and list(got["best_layer_alignments"]) == layers
        assert set(got["direction_similarities"]) <= set(got["diagonal_cka"])
        assert all(-1 <= v <= 1 for v in got["direction_similarities"].values())
        assert set(got["cka_statistics"]) == {"mean", "std", "min", "max", "median"}
