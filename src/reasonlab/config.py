"""Validate and normalize a reasonlab config (the dict Snakemake loads from config.yaml).

`validate(config)` checks the config against `workflow/schemas/config.schema.yaml`, fills in the
schema's defaults, normalizes shorthand forms and checks every cross-reference. Any problem raises
`ConfigError` whose message names the key path and the expected form, one line per problem.
Cheap to import: no torch, no transformers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from reasonlab import ReasonlabError, textsets
from reasonlab.activations import parse_positions
from reasonlab.models import folder_checkpoints

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
MAX_ERRORS = 8


class ConfigError(ReasonlabError):
    """The config does not match the schema or names something it does not define."""


def load_schema(path: str | Path | None = None) -> dict:
    """The JSON schema of config.yaml (YAML-encoded)."""
    path = Path(path) if path else SCHEMA_PATH
    with open(path) as f:
        return yaml.safe_load(f)


def _validator_with_defaults(schema: dict):
    """A jsonschema validator class that fills in `default`s of properties while it validates."""
    from jsonschema import Draft202012Validator, validators

    validate_properties = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, sub):
        if isinstance(instance, dict):
            for prop, subschema in properties.items():
                if isinstance(subschema, dict) and "default" in subschema and prop not in instance:
                    instance[prop] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, sub)

    return validators.extend(Draft202012Validator, {"properties": set_defaults})(schema)


def _key_path(parts) -> str:
    return ".".join(str(p) for p in parts) or "(top level)"


def _explain(error) -> str:
    """One line for one schema violation: where, what was wrong, what is expected."""
    where = _key_path(error.absolute_path)
    sub = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties" and isinstance(sub.get("properties"), dict):
        extra = sorted(set(error.instance) - set(sub["properties"]))
        allowed = ", ".join(sorted(sub["properties"]))
        return f"{where}: unknown key(s) {', '.join(map(repr, extra))}; allowed keys are: {allowed}"
    if error.validator == "required":
        return f"{where}: {error.message}"
    if error.validator == "propertyNames":
        return f"{where}: name {error.instance!r} is not allowed; expected {sub.get('description', error.message)}"
    message = error.message
    if error.validator == "pattern":
        message = f"{error.instance!r} is not allowed"
    desc = sub.get("description")
    if error.validator in ("oneOf", "anyOf") or (desc and error.validator not in ("enum",)):
        return f"{where}: {message}; expected {desc}" if desc else f"{where}: {message}"
    if error.validator == "enum" and desc:
        return f"{where}: {message}; {desc}"
    return f"{where}: {message}"


def _check_schema(config: dict, schema: dict) -> None:
    validator = _validator_with_defaults(schema)
    errors = sorted(
        validator.iter_errors(config), key=lambda e: (list(map(str, e.absolute_path)), e.validator)
    )
    if errors:
        lines = [_explain(e) for e in errors[:MAX_ERRORS]]
        if len(errors) > MAX_ERRORS:
            lines.append(f"... and {len(errors) - MAX_ERRORS} more")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))


def _normalize(config: dict) -> None:
    problems = []
    for name, spec in config["models"].items():
        if ("source" in spec) == ("run" in spec):
            problems.append(
                f"models.{name}: give exactly one of `source` (a directory or hub id) or `run` (a training run)"
            )
            continue
        if "run" in spec and "checkpoints" not in spec:
            spec["checkpoints"] = ["final"]
        ckpts = spec.get("checkpoints")
        if ckpts is None:
            spec["checkpoints"] = {"base": None}
        elif ckpts == "all":
            expanded, problem = _all_checkpoints(name, spec, config.get("training", {}))
            if problem:
                problems.append(problem)
            spec["checkpoints"] = expanded
        elif isinstance(ckpts, list):
            twice = sorted({c for c in ckpts if ckpts.count(c) > 1}, key=ckpts.index)
            if twice:
                problems.append(
                    f"models.{name}.checkpoints: {', '.join(map(repr, twice))} "
                    f"{'is' if len(twice) == 1 else 'are'} listed more than once; list each checkpoint once"
                )
            spec["checkpoints"] = dict.fromkeys(ckpts)
        spec.setdefault("dtype", "auto")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    cap = config.get("max_samples")
    if cap:
        for spec in config["datasets"].values():
            n = spec.get("num_samples")
            spec["num_samples"] = cap if n is None else min(n, cap)


def _all_checkpoints(name: str, spec: dict, runs: dict) -> tuple[dict, str | None]:
    """`checkpoints: all` of a `models.<name>` entry: every checkpoint-N of its source directory as
    step-N (by N), then the directory itself as final when it holds weights; or a problem line."""
    key = f"models.{name}.checkpoints"
    if "run" in spec:
        lf = (runs.get(spec["run"]) or {}).get("llamafactory", {})
        every, last = lf.get("save_steps", 100), lf.get("max_steps")
        steps = [every * i for i in range(1, 4) if not last or every * i <= last]
        more = ", ..." if not last or last >= every * 4 else ""
        example = ", ".join(f"step-{s}" for s in steps) + more + ", final"
        return {}, (
            f"{key}: `all` is only for a `source` directory of checkpoint-N folders; a run's "
            f"model analyses the checkpoints its run saves: list the ones to analyse, e.g. "
            f"[{example}]"
        )
    source = spec["source"]
    directory = Path(os.path.expanduser(source))
    if source.startswith("hub:") or not directory.is_dir():
        where = "" if directory.is_absolute() else f" (relative to {os.getcwd()})"
        return {}, (
            f"{key}: `all` needs models.{name}.source to be an existing local directory, but "
            f"{source!r} is not one{where}; fix the path, or list the checkpoints by name"
        )
    expanded = folder_checkpoints(source)
    if not expanded:
        return {}, (
            f"{key}: `all` found no checkpoint-<N> sub-directory and no weights (config.json with "
            f"*.safetensors or *.bin, or adapter_config.json) in {source!r}; point "
            f"models.{name}.source at a training output directory, or list the checkpoints"
        )
    return expanded, None


def _check_references(config: dict) -> None:
    """Every name a key refers to must be defined: `models.<m>.base` names a model (and checkpoint),
    `score.textsets` datasets and `score.models` models."""
    problems = []
    models = config["models"]
    for name, spec in models.items():
        base = spec.get("base")
        if base is None:
            continue
        base_model, _, base_ckpt = base.partition("/")
        if base_model not in models:
            problems.append(
                f"models.{name}.base: model {base_model!r} is not defined under models; "
                f"defined models are: {', '.join(sorted(models))}"
            )
        elif base_model == name:
            problems.append(f"models.{name}.base: a model cannot be its own base")
        elif base_ckpt and base_ckpt not in models[base_model]["checkpoints"]:
            problems.append(
                f"models.{name}.base: checkpoint {base_ckpt!r} is not listed under "
                f"models.{base_model}.checkpoints ({', '.join(models[base_model]['checkpoints'])})"
            )
    datasets = config["datasets"]
    runs = config["training"]
    for name, spec in models.items():
        if "run" not in spec:
            continue
        run = spec["run"]
        if run not in runs:
            problems.append(f"models.{name}.run: training run {run!r} is not defined under training"
                            + (f"; defined runs are: {', '.join(sorted(runs))}" if runs else ""))  # fmt: skip
            continue
        lf = runs[run].get("llamafactory", {})
        every, last = lf.get("save_steps", 100), lf.get("max_steps")
        for ckpt, value in spec["checkpoints"].items():
            m = re.match(r"^step-(\d+)$", ckpt)
            if value is not None:
                problems.append(
                    f"models.{name}.checkpoints.{ckpt}: a run's checkpoints are names only (step-<N> or final)"
                )
            elif ckpt != "final" and not m:
                problems.append(
                    f"models.{name}.checkpoints: {ckpt!r} is not a checkpoint of a run; use step-<N> or final"
                )
            elif m and (int(m.group(1)) % every or (last and int(m.group(1)) > last)):
                problems.append(
                    f"models.{name}.checkpoints: run {run!r} saves every {every} steps"
                    + (f" up to {last}" if last else "")
                    + f", so it has no {ckpt}"
                )
    for run, spec in runs.items():
        base_model, _, base_ckpt = spec["base"].partition("/")
        if base_model not in models:
            problems.append(
                f"training.{run}.base: model {base_model!r} is not defined under models; defined models are: {', '.join(sorted(models))}"
            )
        elif base_ckpt and base_ckpt not in models[base_model]["checkpoints"]:
            problems.append(
                f"training.{run}.base: checkpoint {base_ckpt!r} is not listed under models.{base_model}.checkpoints"
            )
        elif models[base_model].get("run") == run:
            problems.append(f"training.{run}.base: a run cannot start from its own checkpoints")
        if spec["data"] not in datasets:
            problems.append(
                f"training.{run}.data: dataset {spec['data']!r} is not defined under datasets; defined datasets are: {', '.join(sorted(datasets))}"
            )
        if spec["select"]["keep"] in ("high", "low") and not spec["select"].get("n"):
            problems.append(
                f"training.{run}.select: keep {spec['select']['keep']} needs n (how many rows)"
            )
    for i, name in enumerate(config["score"]["textsets"]):
        if "@" in name:
            problems += _generated_textset_problems(f"score.textsets[{i}]", name, config)
    for key, kind, defined in (("generation.datasets", "dataset", datasets), ("generation.models", "model", models),
                               ("score.textsets", "dataset", datasets), ("score.models", "model", models)):  # fmt: skip
        section, field = key.split(".")
        for i, name in enumerate(config[section][field] or []):
            if key == "score.textsets" and "@" in name:
                continue
            if name not in defined:
                problems.append(
                    f"{key}[{i}]: {kind} {name!r} is not defined under {kind}s; "
                    f"defined {kind}s are: {', '.join(sorted(defined))}"
                )
    problems += _activation_problems(config)
    problems += _analysis_problems(config)
    problems += _intervention_problems(config)
    problems += _trace_problems(config)
    problems += _guided_problems(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _activation_problems(config: dict) -> list[str]:
    """`activations`: models defined, prompt sets naming defined datasets, a generations set only
    for models that generate that dataset, at least one position."""
    act, problems = config.get("activations") or {}, []
    if not act:
        return problems
    for i, m in enumerate(act["models"]):
        if m not in config["models"]:
            problems.append(f"activations.models[{i}]: model {m!r} is not defined under models; "
                            f"defined models are: {', '.join(sorted(config['models']))}")  # fmt: skip
    gen = config["generation"]
    generating = set(gen["models"] or config["models"])
    for name, spec in act["prompt_sets"].items():
        d = spec.get("dataset") or spec.get("generations")
        if d not in config["datasets"]:
            problems.append(f"activations.prompt_sets.{name}: dataset {d!r} is not defined under "
                            f"datasets; defined datasets are: {', '.join(sorted(config['datasets']))}")  # fmt: skip
        elif "generations" in spec:
            if spec.get("solution"):
                problems.append(f"activations.prompt_sets.{name}: solution applies to dataset prompt "
                                "sets; a generations set already has its completions")  # fmt: skip
            if d not in gen["datasets"]:
                problems.append(f"activations.prompt_sets.{name}: generations of {d!r} need "
                                f"{d!r} in generation.datasets")  # fmt: skip
            missing = [m for m in act["models"] if m in config["models"] and m not in generating]
            if missing:
                problems.append(f"activations.prompt_sets.{name}: model(s) {', '.join(missing)} do not "
                                "generate (generation.models); capture their generations only where they do")  # fmt: skip
    if act["models"] and not act["prompt_sets"]:
        problems.append(
            "activations.prompt_sets: activations.models is set but no prompt set is defined"
        )
    if not act["positions"]:
        problems.append("activations.positions: give at least one position rule")
    try:
        parse_positions(act["positions"], tail_default=1)
    except ReasonlabError as e:
        problems.append(str(e))
    return problems


def _analysis_problems(config: dict) -> list[str]:
    """`directions`, `probes`, `lens`, `cka`: every prompt set, dataset and checkpoint they name is
    defined, and they analyse the checkpoints of `activations.models`."""
    act = config.get("activations") or {}
    sets = (act.get("prompt_sets") or {}) if act else {}
    models = act.get("models") or []
    problems = []

    def need_set(key: str, name: str, dataset_only: bool = False):
        if name not in sets:
            problems.append(f"{key}: prompt set {name!r} is not defined under activations.prompt_sets"
                            + (f" ({', '.join(sorted(sets))})" if sets else ""))  # fmt: skip
        elif dataset_only and "dataset" not in sets[name]:
            problems.append(
                f"{key}: {name!r} is a generations set (its texts differ per checkpoint); CKA needs a dataset prompt set"
            )

    contrasts = (config.get("directions") or {}).get("contrasts") or {}
    for name, spec in contrasts.items():
        for side in ("positive", "negative"):
            s, _, t = spec[side].partition(":")
            need_set(f"directions.contrasts.{name}.{side}", s)
            if ":" in spec[side] and not t:
                problems.append(
                    f"directions.contrasts.{name}.{side}: write <prompt set>:<type>, not {spec[side]!r}"
                )
        if spec["positive"] == spec["negative"]:
            problems.append(
                f"directions.contrasts.{name}: the two sides are the same ({spec['positive']!r})"
            )
    tasks = (config.get("probes") or {}).get("tasks") or {}
    for name, t in tasks.items():
        need_set(f"probes.tasks.{name}.set", t["set"])
        spec = sets.get(t["set"]) or {}
        pos = t.get("position") or "last_prompt"
        if pos.startswith("completion") and spec and "dataset" in spec and not spec.get("solution"):
            problems.append(f"probes.tasks.{name}.position: {pos} needs completions, but prompt set "
                            f"{t['set']!r} has prompts only; set activations.prompt_sets.{t['set']}.solution: "
                            "true or use a prompt position")  # fmt: skip
    for i, d in enumerate((config.get("lens") or {}).get("datasets") or []):
        if d not in config["datasets"]:
            problems.append(f"lens.datasets[{i}]: dataset {d!r} is not defined under datasets")
    cka = config.get("cka") or {}
    if cka.get("set"):
        need_set("cka.set", cka["set"], dataset_only=True)
        if isinstance(cka["pairs"], list):
            for i, pair in enumerate(cka["pairs"]):
                for ref in pair:
                    m, _, c = ref.partition("/")
                    if m not in models:
                        problems.append(
                            f"cka.pairs[{i}]: model {m!r} does not capture activations (activations.models)"
                        )
                    elif c and c not in config["models"][m]["checkpoints"]:
                        problems.append(
                            f"cka.pairs[{i}]: checkpoint {c!r} is not listed under models.{m}.checkpoints"
                        )
    if (
        contrasts or tasks or (config.get("lens") or {}).get("datasets") or cka.get("set")
    ) and not models:
        problems.append(
            "directions/probes/lens/cka analyse the checkpoints of activations.models, which lists none"
        )
    return problems


def _intervention_problems(config: dict) -> list[str]:
    """`interventions`: models and dataset defined; each spec's contrast defined and captured for
    its models; steer needs strengths, ablate_layer a list of layers and methods."""
    iv, problems = config.get("interventions") or {}, []
    if not iv or not iv.get("specs"):
        return problems
    for i, m in enumerate(iv["models"]):
        if m not in config["models"]:
            problems.append(f"interventions.models[{i}]: model {m!r} is not defined under models")
    if not iv["models"]:
        problems.append("interventions.models: interventions.specs is set but no model is listed")
    if iv["dataset"] not in config["datasets"]:
        problems.append(f"interventions.dataset: {iv['dataset']!r} is not defined under datasets")
    contrasts = (config.get("directions") or {}).get("contrasts") or {}
    analysed = set((config.get("activations") or {}).get("models") or [])
    for name, spec in iv["specs"].items():
        key = f"interventions.specs.{name}"
        if spec["kind"] in ("steer", "ablate_direction"):
            if spec.get("contrast") not in contrasts:
                problems.append(f"{key}.contrast: {spec.get('contrast')!r} is not a contrast under "
                                "directions.contrasts (the direction comes from its chosen candidate)")  # fmt: skip
            missing = [m for m in iv["models"] if m not in analysed]
            if missing:
                problems.append(f"{key}: model(s) {', '.join(missing)} are not in activations.models, "
                                "so no direction is chosen for their checkpoints")  # fmt: skip
        if spec["kind"] == "steer" and not spec["strengths"]:
            problems.append(f"{key}.strengths: give the strengths to sweep, e.g. [-2, -1, 1, 2]")
        if spec["kind"] == "ablate_layer":
            if spec["layers"] == "chosen":
                problems.append(f"{key}.layers: list the decoder layers to ablate, e.g. [1, 2]")
            if not spec["methods"]:
                problems.append(f"{key}.methods: give zero, mean or both")
    problems += _transfer_problems(config, iv, analysed)
    pairs = (iv.get("patching") or {}).get("dataset")
    if pairs and pairs not in config["datasets"]:
        problems.append(f"interventions.patching.dataset: {pairs!r} is not defined under datasets")
    return problems


def _trace_problems(config: dict) -> list[str]:
    """`traces`: models defined, generating and scored on their own generations; text sets scored;
    groups of defined checkpoints of those models; ranges ordered."""
    tr, problems = config.get("traces") or {}, []
    models = tr.get("models") or []
    gen, score = config.get("generation") or {}, config.get("score") or {}
    generating = gen.get("models") or list(config["models"])
    scoring = score.get("models") or list(config["models"])
    for i, m in enumerate(models):
        key = f"traces.models[{i}]"
        if m not in config["models"]:
            problems.append(f"{key}: model {m!r} is not defined under models")
        elif m not in generating or not gen.get("datasets"):
            problems.append(
                f"{key}: {m!r} generates nothing (generation.models / generation.datasets)"
            )
        elif not score.get("generations") or m not in scoring:
            problems.append(f"{key}: {m!r}'s generations are not scored (set score.generations: true "
                            "and list it in score.models): the steps need their token entropies")  # fmt: skip
    for i, t in enumerate(tr.get("textsets") or []):
        if t not in (score.get("textsets") or []):
            problems.append(f"traces.textsets[{i}]: {t!r} is not in score.textsets (its solutions "
                            "must be scored under each checkpoint)")  # fmt: skip
    for g, refs in (tr.get("groups") or {}).items():
        for j, ref in enumerate(refs):
            m, _, c = ref.partition("/")
            if m not in models or c not in config["models"][m]["checkpoints"]:
                problems.append(f"traces.groups.{g}[{j}]: {ref!r} is not a <model>/<ckpt> of a "
                                "model in traces.models")  # fmt: skip
    for key in ("k_range", "ngram_range"):
        lo, hi = tr.get(key, [1, 1])
        if lo > hi:
            problems.append(f"traces.{key}: {[lo, hi]} is not [low, high]")
    return problems


def _guided_problems(config: dict) -> list[str]:
    """`guided`: pairs of defined <model>/<ckpt>, no pair twice; datasets defined; budgets or
    thresholds for the statistic policies."""
    gd, problems = config.get("guided") or {}, []
    seen = set()
    for i, pair in enumerate(gd.get("pairs") or []):
        for side in ("base", "oracle"):
            model, _, ckpt = pair[side].partition("/")
            if model not in config["models"] or ckpt not in config["models"][model]["checkpoints"]:
                problems.append(f"guided.pairs[{i}].{side}: {pair[side]!r} is not a <model>/<ckpt> "
                                "defined under models")  # fmt: skip
        key = (pair["base"], pair["oracle"])
        if key in seen:
            problems.append(f"guided.pairs[{i}]: {pair['base']} + {pair['oracle']} is listed twice")
        seen.add(key)
    for i, d in enumerate(gd.get("datasets") or []):
        if d not in config["datasets"]:
            problems.append(f"guided.datasets[{i}]: {d!r} is not defined under datasets")
    if gd.get("pairs") and not gd.get("datasets"):
        problems.append("guided.datasets: guided.pairs is set but no dataset is listed")
    for p in gd.get("policies") or []:
        if (
            p in ("entropy", "varentropy", "top1")
            and not gd.get("budgets")
            and p not in (gd.get("thresholds") or {})
        ):
            problems.append(f"guided.policies: {p} needs guided.budgets or guided.thresholds.{p}")
    return problems


def _transfer_problems(config: dict, iv: dict, analysed: set) -> list[str]:
    """`interventions.transfer`: a steer spec; pairs of defined <model>/<ckpt>, sources analysed."""
    tr, problems = iv.get("transfer") or {}, []
    if not tr.get("spec"):
        return problems
    spec = iv["specs"].get(tr["spec"])
    if spec is None or spec["kind"] != "steer":
        steer = [k for k, v in iv["specs"].items() if v["kind"] == "steer"]
        problems.append(f"interventions.transfer.spec: {tr['spec']!r} is not a steer spec under "
                        f"interventions.specs (steer specs: {', '.join(steer) or 'none'})")  # fmt: skip
    if tr.get("pairs", "all") == "all":
        return problems
    for i, pair in enumerate(tr["pairs"]):
        for j, ref in enumerate(pair):
            model, _, ckpt = ref.partition("/")
            where = f"interventions.transfer.pairs[{i}][{j}]"
            if model not in config["models"] or ckpt not in config["models"][model]["checkpoints"]:
                problems.append(f"{where}: {ref!r} is not a <model>/<ckpt> defined under models")
            elif j == 0 and model not in analysed:
                problems.append(f"{where}: model {model!r} is not in activations.models, so no "
                                "direction is chosen at its checkpoints")  # fmt: skip
    return problems


def _generated_textset_problems(key: str, name: str, config: dict) -> list[str]:
    """A generated text set is `<dataset>@<model>@<ckpt>`: each part must be defined."""
    try:
        dataset, model, ckpt = textsets.parse(name)
    except ValueError as e:
        return [f"{key}: {e}"]
    if dataset not in config["datasets"]:
        return [f"{key}: dataset {dataset!r} of {name!r} is not defined under datasets; "
                f"defined datasets are: {', '.join(sorted(config['datasets']))}"]  # fmt: skip
    if model not in config["models"]:
        return [f"{key}: model {model!r} of {name!r} is not defined under models; "
                f"defined models are: {', '.join(sorted(config['models']))}"]  # fmt: skip
    ckpts = config["models"][model]["checkpoints"]
    if ckpt not in ckpts:
        return [
            f"{key}: checkpoint {ckpt!r} of {name!r} is not listed under models.{model}.checkpoints ({', '.join(ckpts)})"
        ]
    return []


def validate(config: dict, schema_path: str | Path | None = None) -> dict:
    """Check `config`, fill in defaults and normalize shorthands; returns a new dict.

    Raises ConfigError naming each offending key path and the expected form.
    """
    config = copy.deepcopy(dict(config))
    _check_schema(config, load_schema(schema_path))
    _normalize(config)
    _check_references(config)
    return config


def load(path: str | Path, *overrides: str | Path, schema_path: str | Path | None = None) -> dict:
    """Read config.yaml (and preset files merged over it, as Snakemake's --configfile does) and validate it."""
    config: dict = {}
    for p in (path, *overrides):
        try:
            with open(p) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such config file") from None
        deep_update(config, data)
    return validate(config, schema_path)


def deep_update(base: dict, other: dict) -> dict:
    """Merge `other` into `base` recursively (dicts merge, everything else replaces)."""
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def config_hash(config: Any) -> str:
    """A short content hash of a config: independent of key order and of comments in the file."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
