"""The planning module: job lists, what each job receives, and re-run hygiene, without Snakemake."""

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from reasonlab import options, textsets
from reasonlab.activations import CaptureOptions
from reasonlab.config import config_hash, validate
from reasonlab.generate import GenOptions
from reasonlab.plan import Plan, as_json, canonical, results_config, table_paths
from reasonlab.report import activations as report_activations
from reasonlab.report import generate as report_generate
from reasonlab.report import overview as report_overview
from reasonlab.report import score as report_score
from reasonlab.report import traces as report_traces
from reasonlab.report import training as report_training
from reasonlab.score import ScoreOptions

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "config.yaml").read_text())


def plan_of(edit=None) -> Plan:
    cfg = copy.deepcopy(DEMO)
    if edit:
        edit(cfg)
    return Plan(validate(cfg))


def every_job_value(p: Plan) -> dict:
    """Every value the workflow hands to a job of the plan, keyed by job."""
    out = {}
    for m in p.models:
        for c in p.checkpoints(m):
            out[("resolve", m, c)] = (p.model_spec(m, c), p.model_inputs(m, c))
    for d in p.datasets:
        out[("prepare", d)] = (p.dataset_spec(d), p.dataset_inputs(d))
    for r in p.training:
        out[("train", r)] = (p.run_settings(r), p.run_select(r), p.selection_inputs(r))
    for j in p.gen_jobs:
        out[("generate", *dataclasses.astuple(j))] = (
            p.gen_options()[0], p.compute_dtype("generate", j.model)
        )  # fmt: skip
    for j in p.score_jobs:
        out[("score", *dataclasses.astuple(j))] = (
            p.score_options()[0], p.textset_input(j.textset), p.compute_dtype("score", j.model)
        )  # fmt: skip
    for j in p.capture_jobs:
        out[("capture", *dataclasses.astuple(j))] = (
            p.capture_options()[0], p.capture_set(j.promptset),
            p.capture_input(j.model, j.ckpt, j.promptset), p.compute_dtype("capture_activations", j.model),
        )  # fmt: skip
    for m, c, k in p.direction_jobs:
        out[("directions", m, c, k)] = (p.direction_options()[0], p.direction_spec(k),
                                        p.direction_inputs(m, c, k), p.compute_dtype("directions", m))  # fmt: skip
    for m, c in p.probe_jobs:
        out[("probes", m, c)] = (p.probe_settings(), p.probe_inputs(m, c))
    for m, c, d in p.lens_jobs:
        out[("lens", m, c, d)] = (p.lens_settings(), p.compute_dtype("lens", m))
    for j in p.cka_jobs:
        out[("cka", *j)] = p.cka_inputs(*j)
    for m, c, k in p.intervene_jobs:
        out[("intervene", m, c, k)] = (p.intervene_settings(k), p.intervene_inputs(m, c, k),
                                       p.compute_dtype("intervene", m))  # fmt: skip
    for j in p.transfer_jobs:
        out[("transfer", *j)] = (p.transfer_settings(*j[2:]), p.transfer_inputs(*j))
    for j in p.patch_jobs:
        out[("patch", *j)] = (p.patch_settings(), p.compute_dtype("patch", j[0]))
    for j in p.step_jobs:
        out[("trace_steps", *dataclasses.astuple(j))] = (
            p.step_settings(),
            p.step_inputs(*dataclasses.astuple(j)),
        )
    for j in p.embed_jobs:
        out[("embed", *dataclasses.astuple(j))] = (
            p.embed_settings(),
            p.embed_inputs(*dataclasses.astuple(j)),
        )
    for g, d in p.map_jobs:
        out[("trace_map", g, d)] = (p.map_settings(), p.map_members(g, d))
    for j in p.guided_jobs:
        out[("guide", *j)] = (p.guided_settings(j[4]), p.guided_inputs(*j[:5]),
                              p.compute_dtype("guide", j[0]), p.guided_backend(*j[:4]))  # fmt: skip
    return out


def test_demo_jobs():
    p = plan_of()
    ckpts = DEMO["models"]["tiny"]["checkpoints"]
    assert [(j.model, j.ckpt, j.dataset) for j in p.gen_jobs] == [
        ("tiny", c, "demo-eval") for c in ckpts
    ]
    # every model x checkpoint x configured text set, plus each generation job's own generations
    n_ckpts = sum(len(s["checkpoints"]) for s in DEMO["models"].values())
    assert len(p.score_jobs) == n_ckpts * len(DEMO["score"]["textsets"]) + len(p.gen_jobs)
    own = [j for j in p.score_jobs if textsets.parse(j.textset).generated]
    assert {(j.model, j.ckpt, j.textset) for j in own} == {
        ("tiny", c, f"demo-eval@tiny@{c}") for c in ckpts
    }
    # canonical order: models by name, checkpoints as listed, text sets by name
    keys = [(j.model, p.order(j.model, j.ckpt), j.textset) for j in p.score_jobs]
    assert keys == sorted(keys)
    assert len(p.score_outputs("tokens")) == len(set(p.score_outputs("tokens")))
    words = p.score_job_args()
    assert all(w.count("/") == 3 for w in words)
    assert [w.split("/")[2] for w in words] == [str(p.order(j.model, j.ckpt)) for j in p.score_jobs]


def test_adding_a_checkpoint_plans_only_its_jobs():
    before = every_job_value(plan_of())
    after = every_job_value(
        plan_of(lambda c: c["models"]["tiny-high"]["checkpoints"].append("step-30"))
    )
    added = set(after) - set(before)
    assert added == {("resolve", "tiny-high", "step-30")} | {
        ("score", "tiny-high", "step-30", t) for t in DEMO["score"]["textsets"]
    }
    assert all(after[k] == before[k] for k in before), "an existing job's values changed"


def test_key_order_changes_no_value():
    def reorder(cfg):
        for section in ("models", "datasets", "training", "generation", "score"):
            cfg[section] = dict(reversed(list(cfg[section].items())))
        for spec in cfg["training"].values():
            spec["llamafactory"] = dict(reversed(list(spec["llamafactory"].items())))

    assert every_job_value(plan_of(reorder)) == every_job_value(plan_of())


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("score", "token_budget", 8192),
        ("score", "max_batch", 7),
        ("score", "compile", True),
        ("score", "compile_stats", True),
        ("score", "head_positions", 256),
        ("score", "chunk_elements", 2**20),
        ("score", "threads", 8),
        ("generation", "batch_size", 3),
        ("generation", "kv_cache_gib", 9),
        ("generation", "threads", 8),
        ("generation", "gpu_memory_utilization", 0.5),
        ("generation", "enforce_eager", True),
        ("generation", "tensor_parallel_size", 4),
        ("compute", "device", "cpu"),  # the same as auto on a machine without a GPU
        ("compute", "device_map", "auto"),
        ("score", "device_map", "auto"),
        ("generation", "device", "cpu"),
        ("activations", "batch_size", 3),
        ("activations", "threads", 2),
        ("activations", "store", "/scratch/store"),
        ("activations", "device", "cpu"),
        ("directions", "batch_size", 2),
        ("directions", "threads", 2),
        ("lens", "threads", 2),
        ("lens", "device_map", "auto"),
        ("interventions", "batch_size", 3),
        ("interventions", "threads", 2),
        ("interventions", "device", "cpu"),
        ("embed", "batch_size", 8),
        ("embed", "threads", 2),
        ("embed", "device", "cpu"),
        ("guided", "batch_size", 3),
        ("guided", "threads", 2),
        ("guided", "device", "cpu"),
    ],
)
def test_speed_settings_change_no_job_value(section, key, value):
    def edit(cfg):
        cfg.setdefault(section, {})[key] = value

    base, changed = plan_of(), plan_of(edit)
    assert every_job_value(changed) == every_job_value(base)
    assert config_hash(results_config(changed.config)) == config_hash(results_config(base.config))
    # ... yet the job still receives the setting, on its command line
    rules = {"generation": "generate", "activations": "capture_activations",
             "interventions": "intervene", "embed": "embed", "guided": "guide"}  # fmt: skip
    if key in ("device", "device_map"):
        rule = rules.get(section, section if section in ("directions", "lens") else "score")
        assert json.loads(changed.compute_placement(rule, "tiny"))[key] == value
    elif key not in ("threads", "store") and section not in ("interventions", "embed", "guided"):
        projection = {"score": changed.score_options, "generation": changed.gen_options,
                      "activations": changed.capture_options, "directions": changed.direction_options}  # fmt: skip
        assert json.loads(projection[section]()[1])[key] == value


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("score", "scope", "all"),
        ("score", "append_eos", True),
        ("generation", "temperature", 0.7),
        ("generation", "max_new_tokens", 17),
        ("generation", "max_model_len", 512),
        ("score", "dtype", "bfloat16"),
        ("generation", "dtype", "float16"),
    ],  # fmt: skip
)
def test_result_settings_change_their_jobs(section, key, value):
    def edit(cfg):
        cfg[section][key] = value

    base, changed = every_job_value(plan_of()), every_job_value(plan_of(edit))
    stage = "score" if section == "score" else "generate"
    differ = {k for k in base if base[k] != changed[k]}
    assert differ and {k[0] for k in differ} == {stage}
    assert all(k[0] == stage for k in differ)


def test_dtype_is_a_param_resolved_by_precedence_and_gpus():
    def edit(cfg):
        cfg["compute"] = {"dtype": "bfloat16"}
        cfg["score"]["dtype"] = "float16"
        cfg["models"]["tiny-init"]["dtype"] = "float32"

    p = plan_of(edit)
    # a model's own dtype, then the stage's, then compute's
    assert p.compute_dtype("score", "tiny-init") == "float32"
    assert p.compute_dtype("score", "tiny") == "float16"
    assert p.compute_dtype("generate", "tiny") == "bfloat16"
    keys = dict(json.loads(p.compute_placement("score", "tiny"))["keys"])
    assert keys["dtype"] == "score.dtype" and keys["device"] == "compute.device"
    # auto: float32 for a job planned on a CPU, the checkpoint's own for one planned on a GPU;
    # moving a job to a GPU therefore re-runs it (its results change), placement alone does not
    cpu, gpu = (
        Plan(validate(copy.deepcopy(DEMO))),
        Plan(validate(copy.deepcopy(DEMO)), {"score": 1}),
    )
    assert cpu.compute_dtype("score", "tiny") == "float32"
    assert gpu.compute_dtype("score", "tiny") == "auto"
    assert gpu.compute_dtype("generate", "tiny") == "float32"
    assert json.loads(gpu.compute_placement("score", "tiny"))["gpu_planned"] is True
    # an explicit dtype is the same wherever the job runs
    fixed = copy.deepcopy(DEMO)
    fixed["compute"] = {"dtype": "float32"}
    assert (
        Plan(validate(copy.deepcopy(fixed)), {"score": 4}).compute_dtype("score", "tiny")
        == "float32"
    )


def test_compute_records_cover_every_model_loading_job():
    p = plan_of()
    records = p.compute_records()
    n = (len(p.gen_jobs) + len(p.score_jobs) + len(p.capture_jobs) + len(p.direction_jobs)
         + len(p.lens_jobs) + len(p.intervene_jobs) + len(p.transfer_jobs) + len(p.patch_jobs)
         + len(p.embed_jobs) + len(p.guided_jobs))  # fmt: skip
    assert len(records) == len(set(records)) == n and len(p.capture_jobs) == 3 * 3  # 3 sets
    assert len(p.direction_jobs) == len(p.lens_jobs) == len(p.probe_jobs) == 3
    assert len(p.intervene_jobs) == 3 * 3  # tiny's checkpoints x the demo's three specs
    assert len(p.transfer_jobs) == 3 * 2 and len(p.patch_jobs) == 3
    assert p.intervene_inputs("tiny", "final", "steer")["chosen"] == (
        "results/directions/tiny/final/reasoning/chosen.json"
    )
    assert p.cka_jobs == [
        ("tiny", "step-200", "tiny", "step-500"),
        ("tiny", "step-500", "tiny", "final"),
    ]
    assert p.compute_record("score", "tiny", "final", "demo-pool") in records
    assert p.compute_record("capture_activations", "tiny", "final", "control") in records


def test_options_come_from_the_dataclasses():
    # every option field the config has reaches the job, split by the field's declaration alone
    for cls, section in ((ScoreOptions, "score"), (GenOptions, "generation"),
                         (CaptureOptions, "activations")):  # fmt: skip
        p = plan_of()
        results, speed = (
            json.loads(s)
            for s in getattr(
                p,
                {
                    "score": "score_options",
                    "generation": "gen_options",
                    "activations": "capture_options",
                }[section],
            )()  # fmt: skip
        )
        fields = {f.name: options.is_speed(f) for f in dataclasses.fields(cls)}
        in_config = set(p.config[section]) & set(fields)
        assert set(results) | set(speed) == in_config
        assert all(not fields[k] for k in results) and all(fields[k] for k in speed)
        # non-fields (job selection, threads) never reach the options
        assert not ({"datasets", "models", "textsets", "threads", "prompt_sets", "store"}
                    & (set(results) | set(speed)))  # fmt: skip
    assert set(options.speed_fields(ScoreOptions)) >= {"token_budget", "max_batch", "compile"}
    assert set(options.speed_fields(GenOptions)) == {
        "batch_size", "kv_cache_gib", "gpu_memory_utilization", "enforce_eager", "tensor_parallel_size"
    }  # fmt: skip


def test_split_follows_a_new_field():
    @dataclasses.dataclass(frozen=True)
    class Opts:
        a: int = 1
        b: int = options.speed(2)

    assert options.split(Opts, {"a": 5, "b": 6, "other": 7}) == ({"a": 5}, {"b": 6})


def test_inputs_of_runs_and_models():
    p = plan_of()
    assert p.model_inputs("tiny", p.checkpoints("tiny")[0]) == {
        "weights": "results/training/tiny-pt/output",
        "base": "results/models/tiny-init/base.json",
    }
    assert p.model_inputs("tiny-init", "base") == {"weights": "results/demo/model-init"}
    assert p.selection_inputs("sft-high") == {
        "data": "results/data/demo-pool.parquet",
        "scores": "results/scores/tiny/final/demo-pool.sequences.parquet",
    }
    assert p.selection_inputs("sft-random") == {"data": "results/data/demo-pool.parquet"}
    assert p.run_base_handle("tiny-pt") == "results/models/tiny-init/base.json"
    assert p.split_ref("tiny") == ("tiny", p.checkpoints("tiny")[0])
    spec = p.model_spec("tiny", "final")
    assert (
        spec["checkpoints"] == {"final": None}
        and spec["run_output"] == "results/training/tiny-pt/output"
    )
    assert list(spec) == sorted(spec)


def test_textset_inputs_and_grammar():
    p = plan_of()
    assert p.textset_input("demo-eval") == "results/data/demo-eval.parquet"
    assert (
        p.textset_input("demo-eval@tiny@final")
        == "results/generations/tiny/final/demo-eval.parquet"
    )
    t = textsets.parse("demo-eval@tiny@final")
    assert (t.dataset, t.generator, str(t)) == ("demo-eval", "tiny/final", "demo-eval@tiny@final")
    assert textsets.label("demo-eval@tiny@final", "tiny", "final") == "demo-eval@self"
    assert textsets.label("demo-eval@tiny@final", "tiny-high", "final") == "demo-eval@tiny@final"
    for bad in ("a@b", "a@@c", "@a@b", "a@b@c@d", "a b"):
        with pytest.raises(ValueError):
            textsets.parse(bad)
    # the wildcard constraint is the same grammar
    assert re.fullmatch(textsets.TEXTSET, "demo-eval@tiny@step-10")
    assert not re.fullmatch(textsets.TEXTSET, "demo-eval@tiny")


def test_report_tables_follow_the_active_stages():
    p = plan_of()
    tables = p.report_tables()
    for stage in (
        report_overview,
        report_generate,
        report_score,
        report_training,
        report_traces,
        report_activations,
    ):
        assert set(table_paths(stage.TABLES)) <= set(tables)
    assert all(path == f"results/aggregate/{n}.parquet" for n, path in tables.items())

    def no_training_no_generation(cfg):
        cfg["training"] = {}
        cfg["generation"]["datasets"] = []
        cfg["generation"]["models"] = None
        cfg["models"] = {"tiny-init": cfg["models"]["tiny-init"]}
        for key in (
            "activations",
            "directions",
            "probes",
            "lens",
            "cka",
            "interventions",
            "traces",
            "guided",
        ):
            cfg[key] = {}

    q = plan_of(no_training_no_generation)
    assert q.gen_jobs == [] and all(not textsets.parse(j.textset).generated for j in q.score_jobs)
    names = set(q.report_tables())
    assert names == set(report_overview.TABLES) | set(report_score.TABLES)
    assert "score_tokens" not in p.score_tables()
    assert (
        "score_tokens" in plan_of(lambda c: c["score"].update(detailed_tokens=True)).score_tables()
    )


def test_canonical_and_json():
    a = {"b": [{"y": 1, "x": 2}], "a": None}
    assert list(canonical(a)) == ["a", "b"] and list(canonical(a)["b"][0]) == ["x", "y"]
    assert as_json(a) == as_json(dict(reversed(list(a.items()))))


def test_transfer_and_patching_plan_only_their_pairs_and_checkpoints():
    p = plan_of()
    ckpts = DEMO["models"]["tiny"]["checkpoints"]
    assert sorted(p.transfer_jobs) == sorted(
        ("tiny", t, "steer", "tiny", s) for t in ckpts for s in ckpts if s != t
    )
    assert p.transfer_inputs("tiny", "final", "steer", "tiny", "step-200") == {
        "handle": "results/models/tiny/final.json",
        "data": "results/data/demo-eval.parquet",
        "chosen": "results/directions/tiny/step-200/reasoning/chosen.json",
        "pt": "results/directions/tiny/step-200/reasoning/reasoning_directions.pt",
    }
    t = json.loads(p.transfer_settings("steer", "tiny", "step-200"))
    assert t["source"] == "tiny/step-200" and t["layers"] == "chosen"
    assert t["strengths"] == DEMO["interventions"]["transfer"]["strengths"]
    assert p.patch_jobs == [("tiny", c, "demo-pairs") for c in ckpts]

    def more(cfg):  # one more checkpoint: only the jobs that involve it are new
        cfg["models"]["tiny"]["checkpoints"] = [*ckpts, "step-600"]
        cfg["training"]["tiny-pt"]["llamafactory"]["save_steps"] = 100

    q = plan_of(more)
    new = set(q.transfer_jobs) - set(p.transfer_jobs)
    assert set(p.transfer_jobs) <= set(q.transfer_jobs)
    assert new and all("step-600" in (j[1], j[4]) for j in new) and len(new) == 2 * len(ckpts)
    assert set(q.patch_jobs) - set(p.patch_jobs) == {("tiny", "step-600", "demo-pairs")}

    def pairs(cfg):
        cfg["interventions"]["transfer"] = {"spec": "steer", "pairs": [["tiny/final", "tiny/step-200"]],
                                            "strengths": None}  # fmt: skip
        cfg["interventions"]["patching"]["batch_size"] = 7

    r = plan_of(pairs)
    assert r.transfer_jobs == [("tiny", "step-200", "steer", "tiny", "final")]
    assert (
        json.loads(r.transfer_settings("steer", "tiny", "final"))["strengths"]
        == (DEMO["interventions"]["specs"]["steer"]["strengths"])
    )  # null: the spec's
    # the patching batch size is speed only: no job value or report hash changes
    assert r.patch_settings() == p.patch_settings()
    assert "batch_size" not in results_config(r.config)["interventions"]["patching"]


def test_trace_explorer_jobs_follow_the_checkpoints_and_groups():
    p = plan_of()
    ckpts = DEMO["models"]["tiny"]["checkpoints"]
    assert [(j.model, j.ckpt, j.textset) for j in p.step_jobs] == [
        ("tiny", c, f"demo-eval@tiny@{c}") for c in ckpts
    ]
    assert [(j.model, j.ckpt, j.dataset) for j in p.embed_jobs] == [
        ("tiny", c, "demo-eval") for c in ckpts
    ]
    assert p.map_jobs == [("tiny", "demo-eval")]
    assert p.step_inputs("tiny", "final", "demo-eval@tiny@final") == {
        "tokens": "results/scores/tiny/final/demo-eval@tiny@final.tokens.parquet",
        "sequences": "results/scores/tiny/final/demo-eval@tiny@final.sequences.parquet",
        "labels": "results/generations/tiny/final/demo-eval.parquet",
    }
    members = json.loads(p.map_members("tiny", "demo-eval"))
    assert [(m["ckpt"], m["order"]) for m in members] == [(c, i) for i, c in enumerate(ckpts)]
    words, paths = p.trace_jobs_arg()
    assert (
        len(words) == len(paths) == len(ckpts) + 1
        and paths[-1] == "results/traces/tiny/demo-eval.points.parquet"
    )

    def grouped(cfg):  # a configured group, a scored dataset's solutions, and one more checkpoint
        cfg["traces"]["groups"] = {"late": ["tiny/step-500", "tiny/final"]}
        cfg["traces"]["textsets"] = ["demo-pool"]
        cfg["models"]["tiny"]["checkpoints"] = [*ckpts, "step-600"]

    q = plan_of(grouped)
    assert q.map_jobs == [("late", "demo-eval")]
    assert ("tiny", "final", "demo-pool") in {(j.model, j.ckpt, j.textset) for j in q.step_jobs}
    assert q.step_inputs("tiny", "final", "demo-pool")["labels"] == "results/data/demo-pool.parquet"
    new = {dataclasses.astuple(j) for j in q.step_jobs} - {
        dataclasses.astuple(j) for j in p.step_jobs
    }
    assert {j for j in new if j[1] == "step-600"} == {("tiny", "step-600", "demo-eval@tiny@step-600"),
                                                     ("tiny", "step-600", "demo-pool")}  # fmt: skip


def test_guided_jobs_are_per_pair_dataset_and_policy():
    p = plan_of()
    pols = DEMO["guided"]["policies"]
    assert p.guided_jobs == [("tiny", "step-200", "tiny", "final", "demo-eval", q) for q in pols]
    assert p.guided_inputs("tiny", "step-200", "tiny", "final", "demo-eval") == {
        "base": "results/models/tiny/step-200.json", "oracle": "results/models/tiny/final.json",
        "data": "results/data/demo-eval.parquet"}  # fmt: skip
    s = json.loads(p.guided_settings("demo-eval"))
    assert s["max_new_tokens"] == DEMO["guided"]["max_new_tokens"] and s["format"] == "math"
    assert "batch_size" not in s and "threads" not in s and "policies" not in s
    words, paths = p.guided_jobs_arg()
    assert words[0] == "tiny/step-200/tiny/final/demo-eval/never"
    assert paths[0] == "results/guided/tiny/step-200/tiny/final/demo-eval/never.cells.parquet"
    assert "guided_cells" in p.report_tables()

    def more(cfg):  # another pair plans only its own jobs; a budget change re-plans guided only
        cfg["guided"]["pairs"].append({"base": "tiny/step-500", "oracle": "tiny/final"})

    q = plan_of(more)
    assert set(q.guided_jobs) - set(p.guided_jobs) == {
        ("tiny", "step-500", "tiny", "final", "demo-eval", x) for x in pols}  # fmt: skip
    before, after = (
        every_job_value(p),
        every_job_value(plan_of(lambda c: c["guided"].update(budgets=[0.3]))),
    )
    assert {k[0] for k in before if before[k] != after[k]} == {"guide"}


def test_an_oracle_server_is_a_backend_param_and_its_url_speed_only():
    def served(url):
        def edit(cfg):
            cfg["guided"]["pairs"][0]["server"] = {"url": url}

        return edit

    p, q, r = plan_of(), plan_of(served("http://a:8000/v1")), plan_of(served("http://b:9000/v1"))
    job = ("tiny", "step-200", "tiny", "final")
    assert p.guided_backend(*job) == "local" and json.loads(p.guided_server(*job)) == {}
    assert q.guided_backend(*job) == r.guided_backend(*job) == "server"
    assert json.loads(q.guided_server(*job)) == {
        "url": "http://a:8000/v1",
        "model": None,
        "top_logprobs": 20,
    }
    # moving the server re-runs nothing; switching the oracle to a server re-runs the pair's jobs
    assert every_job_value(q) == every_job_value(r)
    assert config_hash(results_config(q.config)) == config_hash(results_config(r.config))
    a, b = every_job_value(p), every_job_value(q)
    assert {k[0] for k in a if a[k] != b[k]} == {"guide"}


def test_seed_formats_plan_the_seeds_files_per_dataset_and_job():
    off = plan_of(lambda c: c["export"].update(seed_formats=False))
    assert off.seed_exports() == []
    assert off.final_outputs() == ["results/report.html", "results/figures/index.json"]
    assert off.seed002_names == [] and off.seed001_steering_jobs == off.seed001_alignment_jobs == []
    p = plan_of()  # the demo sets export.seed_formats
    tiny = DEMO["models"]["tiny"]["checkpoints"]
    exports = p.seed_exports()
    assert set(exports) <= set(p.final_outputs()) and len(set(exports)) == len(exports)
    # seed 002: per generation dataset, every generating checkpoint whose own generations are scored
    assert p.seed002_datasets == ["demo-eval"]
    assert p.seed002_names == [f"tiny_{c}" for c in tiny]
    d = "results/export/seed002/demo-eval"
    assert p.seed002_outputs("demo-eval") == [
        *(f"{d}/tiny_{c}_{k}.csv" for c in tiny for k in ("token_stats", "all_tokens_detailed")),
        f"{d}/prompt_level_results.csv", f"{d}/results_summary.json"]  # fmt: skip
    assert p.seed002_inputs("demo-eval")["tokens"] == [
        p.score_output("tiny", c, f"demo-eval@tiny@{c}", "tokens") for c in tiny]  # fmt: skip
    # the rule's inputs and outputs are patterns over its one wildcard
    assert {s.count("{dataset}") for s in p.seed002_outputs() + p.seed002_inputs()["tokens"]} == {1}
    assert all(p.seed002_inputs()[k] for k in ("tokens", "generations", "handles"))
    # seed 001: each steering job (not the ablations), each CKA pair with both sides' directions
    assert p.seed001_steering_jobs == [("tiny", c, "steer") for c in tiny]
    pairs = [("tiny", a, "tiny", b) for a, b in zip(tiny, tiny[1:], strict=False)]
    assert p.seed001_alignment_jobs == p.cka_jobs == pairs
    assert p.seed001_intervention_output("tiny", "final", "steer") in exports
    assert p.seed001_alignment_output(*p.cka_jobs[0]) in exports
    assert p.seed001_alignment_inputs() == {
        "table": "results/cka/{model}/{ckpt}/{model2}/{ckpt2}.parquet",
        "directions": ["results/directions/{model}/{ckpt}/reasoning/reasoning_directions.pt",
                       "results/directions/{model2}/{ckpt2}/reasoning/reasoning_directions.pt"]}  # fmt: skip

    def no_generations_scored(cfg):
        cfg["score"]["generations"] = False
        cfg["traces"]["models"] = []  # the trace explorer needs them

    assert plan_of(no_generations_scored).seed002_datasets == []

    def no_contrasts(cfg):  # no directions: the CKA alone
        cfg["directions"]["contrasts"] = {}
        cfg["interventions"]["specs"] = {"layers": cfg["interventions"]["specs"]["layers"]}
        cfg["interventions"]["transfer"] = {"spec": None}

    q = plan_of(no_contrasts)
    assert q.seed001_alignment_inputs()["directions"] == [] and q.seed001_steering_jobs == []

    def clash(cfg):  # x + b_c and x_b + c would write the same seed 002 files
        cfg["models"]["x"] = {**cfg["models"]["tiny-init"], "checkpoints": ["b_c"]}
        cfg["models"]["x_b"] = {**cfg["models"]["tiny-init"], "checkpoints": ["c"]}
        cfg["generation"]["models"] = ["tiny", "x", "x_b"]

    with pytest.raises(ValueError, match="x_b_c"):
        _ = plan_of(clash).seed002_runs
