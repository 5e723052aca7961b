"""Config validation: defaults, shorthands, presets, and one clear message per problem."""

import copy
from pathlib import Path

import pytest
import yaml

from reasonlab.config import ConfigError, config_hash, load, validate

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "config.yaml").read_text())


def minimal(**extra):
    return {
        "models": {"m": {"source": "org/model"}},
        "datasets": {"d": {"source": "data/x.jsonl", "format": "query"}},
        **extra,
    }


def error_of(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    return str(e.value)


def test_demo_config_is_valid():
    cfg = validate(DEMO)
    assert cfg["models"]["tiny-init"]["checkpoints"] == {"base": None}
    assert set(cfg["datasets"]) == {
        "demo-pool",
        "demo-eval",
        "demo-control",
        "demo-pretrain",
        "demo-traces",
        "demo-pairs",
    }
    # a list of checkpoint names becomes a mapping, each name to null (the run's own layout)
    names = DEMO["models"]["tiny"]["checkpoints"]
    assert isinstance(names, list)
    assert cfg["models"]["tiny"]["checkpoints"] == dict.fromkeys(names)


def test_defaults_filled_and_shorthands_normalized():
    cfg = validate(minimal())
    assert cfg["environments"] == {
        "core": ".venvs/core",
        "train": ".venvs/train",
        "gen": ".venvs/gen",
    }
    assert cfg["demo"]["sizes"]["eval"] == 60 and cfg["demo"]["model"]["hidden_size"] == 128
    assert cfg["models"]["m"]["checkpoints"] == {"base": None}
    assert cfg["models"]["m"]["dtype"] == "auto" and cfg["models"]["m"]["download"] is False
    assert cfg["datasets"]["d"]["split"] == "test" and cfg["datasets"]["d"]["num_samples"] is None
    cfg = validate(minimal(models={"m": {"source": "a/b", "checkpoints": ["base", "step-10"]}}))
    assert cfg["models"]["m"]["checkpoints"] == {"base": None, "step-10": None}


def test_validate_does_not_modify_its_input():
    raw = minimal()
    before = copy.deepcopy(raw)
    validate(raw)
    assert raw == before


def test_unknown_key_names_path_and_allowed_keys():
    cfg = minimal()
    cfg["datasets"]["d"]["num_sample"] = 3
    msg = error_of(cfg)
    assert "datasets.d: unknown key(s) 'num_sample'" in msg
    assert "allowed keys are: columns, config, format, num_samples, seed, source, split" in msg


def test_wrong_type_and_enum():
    cfg = minimal()
    cfg["datasets"]["d"]["num_samples"] = "ten"
    cfg["datasets"]["d"]["format"] = "mth"
    msg = error_of(cfg)
    assert "datasets.d.format: 'mth' is not one of" in msg
    assert "datasets.d.num_samples: 'ten' is not of type 'integer', 'null'" in msg
    assert len(msg.splitlines()) == 3  # heading + one line per problem


def test_missing_required_keys():
    assert "(top level): 'datasets' is a required property" in error_of(
        {"models": {"m": {"source": "a/b"}}}
    )
    msg = error_of(minimal(models={"m": {"checkpoints": ["base"]}}))
    assert (
        "models.m: give exactly one of `source` (a directory or hub id) or `run` (a training run)"
        in msg
    )


def test_bad_names_and_checkpoint_forms():
    msg = error_of(minimal(models={"bad name": {"source": "a/b"}}))
    assert "models: 'bad name' is not allowed; expected a short name: letters, digits" in msg
    msg = error_of(minimal(models={"m": {"source": "a/b", "checkpoints": "base"}}))
    assert "models.m.checkpoints" in msg and "expected name → what to load" in msg


def test_undefined_base_model_or_checkpoint():
    cfg = minimal(models={"m": {"source": "a/b"}, "lora": {"source": "/x", "base": "qwen"}})
    msg = error_of(cfg)
    assert (
        "models.lora.base: model 'qwen' is not defined under models; defined models are: lora, m"
        in msg
    )
    cfg = minimal(models={"m": {"source": "a/b"}, "lora": {"source": "/x", "base": "m/step-9"}})
    assert "checkpoint 'step-9' is not listed under models.m.checkpoints (base)" in error_of(cfg)
    validate(minimal(models={"m": {"source": "a/b"}, "lora": {"source": "/x", "base": "m/base"}}))


def test_presets_merge_and_cap_samples(tmp_path):
    cfg = load(ROOT / "config.yaml", ROOT / "resources/presets/quick.yaml")
    assert {d["num_samples"] for d in cfg["datasets"].values()} == {10}
    base = tmp_path / "c.yaml"
    base.write_text(
        yaml.safe_dump(
            minimal(datasets={"d": {"source": "x.jsonl", "format": "query", "num_samples": 3}})
        )
    )
    assert load(base, ROOT / "resources/presets/quick.yaml")["datasets"]["d"]["num_samples"] == 3
    assert load(base, ROOT / "resources/presets/full.yaml")["datasets"]["d"]["num_samples"] == 3
    for preset in (ROOT / "resources/presets").glob("*.yaml"):
        load(ROOT / "config.yaml", preset)  # every preset is valid over the demo


def test_load_reports_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(p)


def test_config_hash_ignores_key_order_but_not_values():
    a = minimal()
    b = {"datasets": a["datasets"], "models": a["models"]}
    assert config_hash(a) == config_hash(b)
    c = minimal()
    c["datasets"]["d"]["num_samples"] = 5
    assert config_hash(a) != config_hash(c)


def test_score_names_must_be_defined():
    msg = error_of(minimal(score={"textsets": ["d", "gsm8k"], "models": ["m", "qwen"]}))
    assert (
        "score.textsets[1]: dataset 'gsm8k' is not defined under datasets; defined datasets are: d"
        in msg
    )
    assert "score.models[1]: model 'qwen' is not defined under models; defined models are: m" in msg
    cfg = validate(minimal(score={"textsets": ["d"]}))
    assert (
        cfg["score"]["scope"] == "completion" and cfg["score"]["token_budget"] is None
    )  # sized per device
    assert "score.scope: 'some' is not one of" in error_of(minimal(score={"scope": "some"}))


def test_generated_textsets_name_a_dataset_model_and_checkpoint():
    ok = validate(minimal(score={"textsets": ["d@m@base", "d"]}))
    assert ok["score"]["textsets"] == ["d@m@base", "d"] and ok["score"]["generations"] is True
    for name, says in (
        ("d@m", "'d@m' is neither a dataset name nor '<dataset>@<model>@<ckpt>'"),
        ("x@m@base", "dataset 'x' of 'x@m@base' is not defined under datasets"),
        ("d@q@base", "model 'q' of 'd@q@base' is not defined under models"),
        ("d@m@step-9", "checkpoint 'step-9' of 'd@m@step-9' is not listed under models.m.checkpoints (base)"),
    ):  # fmt: skip
        assert f"score.textsets[0]: {says}" in error_of(minimal(score={"textsets": [name]}))


def run_config(**run):
    spec = {
        "base": "m",
        "data": "d",
        "llamafactory": {"stage": "sft", "save_steps": 10, "max_steps": 30},
        **run,
    }
    return minimal(
        models={"m": {"source": "a/b"}, "ft": {"run": "r", "checkpoints": ["step-10", "final"]}},
        training={"r": spec},
    )


def test_training_runs_are_checked():
    cfg = validate(run_config())
    assert cfg["training"]["r"]["select"] == {"keep": "all", "n": None, "by": "llh_mean", "seed": 0}
    assert "training.r.base: model 'qwen' is not defined under models" in error_of(
        run_config(base="qwen")
    )
    assert (
        "training.r.data: dataset 'pool' is not defined under datasets; defined datasets are: d"
        in error_of(run_config(data="pool"))
    )
    assert "training.r.select: keep high needs n" in error_of(run_config(select={"keep": "high"}))
    assert "training.r.llamafactory.stage: 'dpo' is not one of ['pt', 'sft']" in error_of(
        run_config(llamafactory={"stage": "dpo"})
    )
    cfg = run_config()
    cfg["models"]["ft"]["checkpoints"] = ["step-15", "step-40", "last"]
    msg = error_of(cfg)
    assert (
        "run 'r' saves every 10 steps up to 30, so it has no step-15" in msg
        and "so it has no step-40" in msg
    )
    assert "'last' is not a checkpoint of a run; use step-<N> or final" in msg
    cfg = run_config()
    cfg["models"]["ft"]["run"] = "other"
    assert (
        "models.ft.run: training run 'other' is not defined under training; defined runs are: r"
        in error_of(cfg)
    )
    cfg = run_config()
    cfg["models"]["ft"]["source"] = "x/y"
    assert "models.ft: give exactly one of `source`" in error_of(cfg)


def test_checkpoint_listed_twice_is_a_config_error():
    cfg = run_config()
    cfg["models"]["ft"]["checkpoints"] = ["step-10", "step-10"]  # a run's model (no source)
    msg = error_of(cfg)
    assert msg.splitlines()[1:] == [
        "  models.ft.checkpoints: 'step-10' is listed more than once; list each checkpoint once"
    ]
    cfg = minimal(models={"m": {"source": "org/model", "checkpoints": ["base", "v1", "base"]}})
    assert error_of(cfg).splitlines()[1:] == [
        "  models.m.checkpoints: 'base' is listed more than once; list each checkpoint once"
    ]


def training_output(root, steps, final=True):
    """A training output directory (LlamaFactory / Trainer layout): checkpoint-N sub-directories,
    each with a tiny config.json and a dummy weights file, and final weights in it when `final`."""
    for d in [root / f"checkpoint-{s}" for s in steps] + ([root] if final else []):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text('{"model_type": "qwen2"}')
        (d / "model.safetensors").write_bytes(b"\0" * 8)
    (root / "trainer_log.jsonl").write_text("")
    return root


def test_checkpoints_all_expands_a_training_output_directory(tmp_path, monkeypatch):
    out = training_output(tmp_path / "out", [200, 1000, 100])  # 1000 after 200: by N, not by name
    (out / "checkpoint-last").mkdir()  # not a checkpoint-<N>: ignored
    cfg = validate(minimal(models={"m": {"source": str(out), "checkpoints": "all"}}))
    assert cfg["models"]["m"]["checkpoints"] == {
        "step-100": str(out / "checkpoint-100"),
        "step-200": str(out / "checkpoint-200"),
        "step-1000": str(out / "checkpoint-1000"),
        "final": None,
    }
    # names of the expansion can be referred to like listed ones
    refs = minimal(
        models={"m": {"source": str(out), "checkpoints": "all"}, "n": {"source": "a/b"}},
        score={"textsets": ["d@m@step-200"]},
    )
    validate(refs)
    # a run still in progress: no final weights yet, only checkpoints; a relative source stays relative
    monkeypatch.chdir(tmp_path)
    training_output(tmp_path / "running", [10, 20], final=False)
    cfg = validate(minimal(models={"m": {"source": "running", "checkpoints": "all"}}))
    assert cfg["models"]["m"]["checkpoints"] == {
        "step-10": "running/checkpoint-10",
        "step-20": "running/checkpoint-20",
    }
    # only final weights, no checkpoint-N
    training_output(tmp_path / "final-only", [])
    cfg = validate(minimal(models={"m": {"source": "./final-only", "checkpoints": "all"}}))
    assert cfg["models"]["m"]["checkpoints"] == {"final": None}


def test_checkpoints_all_is_stable_as_a_run_saves_more(tmp_path):
    out = training_output(tmp_path / "out", [100, 200], final=False)
    cfg = minimal(models={"m": {"source": str(out), "checkpoints": "all"}})
    before = validate(cfg)["models"]["m"]["checkpoints"]
    training_output(out, [300], final=False)
    after = validate(cfg)["models"]["m"]["checkpoints"]
    assert list(after) == ["step-100", "step-200", "step-300"]
    assert {k: after[k] for k in before} == before  # exactly one checkpoint added, none changed
    training_output(out, [], final=True)  # training finished: its final weights join as `final`
    assert list(validate(cfg)["models"]["m"]["checkpoints"]) == [*after, "final"]


def test_checkpoints_all_errors_name_the_key_and_what_to_do(tmp_path):
    def one_line(models, **extra):
        lines = error_of(minimal(models=models, **extra)).splitlines()
        assert len(lines) == 2 and lines[0] == "invalid config:"
        return lines[1].strip()

    missing = tmp_path / "nope"
    assert one_line({"m": {"source": str(missing), "checkpoints": "all"}}) == (
        f"models.m.checkpoints: `all` needs models.m.source to be an existing local directory, "
        f"but {str(missing)!r} is not one; fix the path, or list the checkpoints by name"
    )
    msg = one_line({"m": {"source": "org/model", "checkpoints": "all"}})  # a hub id
    assert msg.startswith("models.m.checkpoints: `all` needs models.m.source to be an existing")
    assert "'org/model' is not one (relative to " in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "checkpoint-x").mkdir()
    (empty / "training_args.bin").write_bytes(b"\0")  # not weights
    (empty / "config.json").write_text("{}")
    assert one_line({"m": {"source": str(empty), "checkpoints": "all"}}) == (
        f"models.m.checkpoints: `all` found no checkpoint-<N> sub-directory and no weights "
        f"(config.json with *.safetensors or *.bin, or adapter_config.json) in {str(empty)!r}; "
        f"point models.m.source at a training output directory, or list the checkpoints"
    )
    cfg = run_config()
    cfg["models"]["ft"]["checkpoints"] = "all"
    assert error_of(cfg).splitlines()[1:] == [
        "  models.ft.checkpoints: `all` is only for a `source` directory of checkpoint-N folders; "
        "a run's model analyses the checkpoints its run saves: list the ones to analyse, "
        "e.g. [step-10, step-20, step-30, final]"
    ]
    assert "'al' is not valid under any of the given schemas; expected name → what to load" in (
        error_of(minimal(models={"m": {"source": str(empty), "checkpoints": "al"}}))
    )


def test_activation_analyses_name_what_they_use():
    cfg = copy.deepcopy(DEMO)
    cfg["activations"]["models"] = ["tiny", "ghost"]
    cfg["activations"]["positions"] = ["last_prompt", "middle"]
    cfg["activations"]["prompt_sets"]["gens2"] = {"generations": "demo-pool"}
    cfg["directions"]["contrasts"]["bad"] = {"positive": "reasoning", "negative": "nowhere:x"}
    cfg["probes"]["tasks"]["p"] = {"set": "missing", "label": "level"}
    cfg["lens"]["datasets"] = ["demo-eval", "nope"]
    cfg["activations"]["prompt_sets"]["generations"] = {"generations": "demo-eval"}
    cfg["cka"]["set"] = "generations"
    cfg["activations"]["prompt_sets"]["generations"]["solution"] = True
    cfg["probes"]["tasks"]["q"] = {"set": "control", "label": "type", "position": "completion_mean"}
    err = error_of(cfg)
    assert "activations.models[1]: model 'ghost' is not defined under models" in err
    assert "activations.positions: unknown position 'middle'" in err
    assert (
        "activations.prompt_sets.gens2: generations of 'demo-pool' need 'demo-pool' in generation.datasets"
        in err
    )
    assert (
        "directions.contrasts.bad.negative: prompt set 'nowhere' is not defined under activations.prompt_sets"
        in err
    )
    assert "probes.tasks.p.set: prompt set 'missing' is not defined" in err
    assert "lens.datasets[1]: dataset 'nope' is not defined under datasets" in err
    assert "cka.set: 'generations' is a generations set" in err
    assert "activations.prompt_sets.generations: solution applies to dataset prompt sets" in err
    assert (
        "probes.tasks.q.position: completion_mean needs completions, but prompt set 'control' has "
        "prompts only; set activations.prompt_sets.control.solution: true" in err
    )
    cfg = copy.deepcopy(DEMO)
    cfg["activations"]["models"] = []
    assert "activations.models, which lists none" in error_of(cfg)


def test_presets_of_seed_001_are_valid():
    for name in ("quick", "full", "layer_specific"):
        cfg = load(ROOT / "config.yaml", ROOT / f"resources/presets/{name}.yaml")
        assert cfg["activations"]["layers"] == "all" or isinstance(
            cfg["activations"]["layers"], list
        )


def test_intervention_specs_name_what_they_use():
    cfg = copy.deepcopy(DEMO)
    cfg["interventions"]["models"] = ["tiny", "tiny-high"]
    cfg["interventions"]["dataset"] = "nope"
    cfg["interventions"]["specs"] = {
        "s": {"kind": "steer", "contrast": "other"},
        "l": {"kind": "ablate_layer"},
    }
    err = error_of(cfg)
    assert "interventions.dataset: 'nope' is not defined under datasets" in err
    assert (
        "interventions.specs.s.contrast: 'other' is not a contrast under directions.contrasts"
        in err
    )
    assert "interventions.specs.s: model(s) tiny-high are not in activations.models" in err
    assert "interventions.specs.s.strengths: give the strengths to sweep" in err
    assert "interventions.specs.l.layers: list the decoder layers to ablate" in err
    assert "interventions.specs.l.methods: give zero, mean or both" in err


def test_transfer_and_patching_name_what_they_use():
    cfg = copy.deepcopy(DEMO)
    cfg["interventions"]["transfer"] = {"spec": "ablate",
                                        "pairs": [["tiny/nope", "tiny/final"], ["tiny-high/final", "tiny/final"]]}  # fmt: skip
    cfg["interventions"]["patching"] = {"dataset": "nope"}
    err = error_of(cfg)
    assert (
        "interventions.transfer.spec: 'ablate' is not a steer spec under interventions.specs (steer specs: steer)"
        in err
    )
    assert (
        "interventions.transfer.pairs[0][0]: 'tiny/nope' is not a <model>/<ckpt> defined under models"
        in err
    )
    assert (
        "interventions.transfer.pairs[1][0]: model 'tiny-high' is not in activations.models" in err
    )
    assert "interventions.patching.dataset: 'nope' is not defined under datasets" in err


def test_the_trace_explorer_names_what_it_needs():
    cfg = copy.deepcopy(DEMO)
    cfg["traces"] = {"models": ["nope", "tiny-high"], "textsets": ["demo-traces"],
                     "groups": {"g": ["tiny/final"]}, "k_range": [5, 2]}  # fmt: skip
    err = error_of(cfg)
    assert "traces.models[0]: model 'nope' is not defined under models" in err
    assert (
        "traces.models[1]: 'tiny-high' generates nothing (generation.models / generation.datasets)"
        in err
    )
    assert "traces.textsets[0]: 'demo-traces' is not in score.textsets" in err
    assert (
        "traces.groups.g[0]: 'tiny/final' is not a <model>/<ckpt> of a model in traces.models"
        in err
    )
    assert "traces.k_range: [5, 2] is not [low, high]" in err
    cfg = copy.deepcopy(DEMO)
    cfg["score"]["generations"] = False
    assert (
        "traces.models[0]: 'tiny''s generations are not scored (set score.generations: true"
        in error_of(cfg)
    )


def test_guided_inference_names_what_it_uses():
    cfg = copy.deepcopy(DEMO)
    cfg["guided"]["pairs"] = [{"base": "tiny/step-7", "oracle": "tiny/final"},
                              {"base": "tiny/step-200", "oracle": "nope/final"},
                              {"base": "tiny/step-7", "oracle": "tiny/final"}]  # fmt: skip
    cfg["guided"]["datasets"] = ["demo-eval", "nope"]
    cfg["guided"]["budgets"] = []
    err = error_of(cfg)
    assert "guided.pairs[0].base: 'tiny/step-7' is not a <model>/<ckpt> defined under models" in err
    assert (
        "guided.pairs[1].oracle: 'nope/final' is not a <model>/<ckpt> defined under models" in err
    )
    assert "guided.pairs[2]: tiny/step-7 + tiny/final is listed twice" in err
    assert "guided.datasets[1]: 'nope' is not defined under datasets" in err
    assert "guided.policies: entropy needs guided.budgets or guided.thresholds.entropy" in err
    cfg = copy.deepcopy(DEMO)
    cfg["guided"]["policies"] = ["sometimes"]
    assert "guided.policies.0: 'sometimes' is not one of" in error_of(cfg)


def test_the_guided_grid_preset_is_valid():
    cfg = load(ROOT / "config.yaml", ROOT / "resources/presets/guided-grid.yaml")
    assert cfg["guided"]["max_prompts"] is None and len(cfg["guided"]["grid"]["c"]) == 4
    assert "varentropy" in cfg["guided"]["policies"]
