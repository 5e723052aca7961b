"""Planning: which jobs a validated config asks for, and what each job receives.

The workflow's rule files are Snakemake glue; everything they decide — the jobs of every stage,
each job's inputs, the options a job receives as params (the ones that change results) and on its
command line only (the ones that change speed), output paths — comes from a `Plan` built once from
the validated config. Pure Python over the config dict: cheap at parse time (no torch, no file
reads beyond what a local source's existence needs), and unit-tested without Snakemake.

Re-run hygiene (see the README's "Re-runs"): every value handed to Snakemake as a param is built
from config with its mappings' keys sorted (`canonical`), job lists come in a canonical order
(models and text sets by name, checkpoints as listed), and a per-checkpoint job never receives
another checkpoint's settings, so adding a checkpoint, a model or a dataset plans only its own jobs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from reasonlab import compute, options, textsets
from reasonlab.activations import CaptureOptions
from reasonlab.data import is_local
from reasonlab.directions import DirectionOptions
from reasonlab.generate import GenOptions
from reasonlab.models import local_path
from reasonlab.report import activations as report_activations
from reasonlab.report import generate as report_generate
from reasonlab.report import guided as report_guided
from reasonlab.report import interventions as report_interventions
from reasonlab.report import overview as report_overview
from reasonlab.report import score as report_score
from reasonlab.report import traces as report_traces
from reasonlab.report import training as report_training
from reasonlab.score import ScoreOptions

ENVIRONMENTS = ("core", "train", "gen")
AGGREGATE_DIR = "results/aggregate"
WILDCARDS = {
    "model": textsets.NAME,
    "ckpt": textsets.NAME,
    "dataset": textsets.NAME,
    "run": textsets.NAME,
    "textset": textsets.TEXTSET,
    "promptset": textsets.NAME,
    "contrast": textsets.NAME,
    "model2": textsets.NAME,
    "ckpt2": textsets.NAME,
    "spec": textsets.NAME,
    "group": textsets.NAME,
    "policy": "never|always|random|entropy|varentropy|top1|structural",
    "env": "|".join(ENVIRONMENTS),
}


def canonical(obj: Any) -> Any:
    """`obj` with every mapping's keys sorted, recursively. Snakemake compares a rule's params by
    their repr, so params built from config must not depend on the order keys are written in."""
    if isinstance(obj, dict):
        return {k: canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [canonical(v) for v in obj]
    return obj


def as_json(obj: Any) -> str:
    """A config value as canonical JSON (one shell argument; equal values give equal strings)."""
    return json.dumps(canonical(obj), sort_keys=True)


def table_paths(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Aggregated table name -> its Parquet file (`results/aggregate/<name>.parquet`)."""
    return {n: f"{AGGREGATE_DIR}/{n}.parquet" for n in names}


# rules that load a model -> their config section (its device / dtype / device_map override `compute`)
COMPUTE_STAGES = {
    "score": "score",
    "generate": "generation",
    "capture_activations": "activations",
    "directions": "directions",
    "lens": "lens",
    "intervene": "interventions",
    "transfer": "interventions",
    "patch": "interventions",
    "embed": "embed",
    "guide": "guided",
}
PLACEMENT_KEYS = ("device", "device_map")  # where a model runs: speed only, never a param


def results_config(config: dict) -> dict:
    """The config without the options that change only speed (what the report's config hash covers)."""
    out = dict(config)
    # each stage's speed-only fields, its threads and placement; where the store lives
    for section, cls, extra in (("score", ScoreOptions, ()), ("generation", GenOptions, ()),
                                ("activations", CaptureOptions, ("store",)),
                                ("directions", DirectionOptions, ()), ("lens", None, ()),
                                ("interventions", None, ("batch_size",)),
                                ("embed", None, ("batch_size",)),
                                ("guided", None, ("batch_size",))):  # fmt: skip
        if section not in config:
            continue
        speed = set(options.speed_fields(cls)) if cls else set()
        drop = speed | {"threads", *PLACEMENT_KEYS, *extra}
        out[section] = {k: v for k, v in config[section].items() if k not in drop}
    if "compute" in config:
        out["compute"] = {k: v for k, v in config["compute"].items() if k not in PLACEMENT_KEYS}
    if (config.get("guided") or {}).get("pairs"):  # where an oracle server runs: speed only
        out["guided"] = {**out["guided"], "pairs": [
            {**pair, "server": bool(pair.get("server"))} for pair in config["guided"]["pairs"]]}  # fmt: skip
    patching = (out.get("interventions") or {}).get("patching")
    if patching:
        out["interventions"] = {**out["interventions"],
                                "patching": {k: v for k, v in patching.items() if k != "batch_size"}}  # fmt: skip
    return out


@dataclass(frozen=True)
class GenTask:
    model: str
    ckpt: str
    dataset: str


@dataclass(frozen=True)
class CaptureTask:
    model: str
    ckpt: str
    promptset: str


@dataclass(frozen=True)
class ScoreTask:
    model: str
    ckpt: str
    textset: str


class Plan:
    """The jobs and per-job values of a validated config (`reasonlab.config.validate`'s output)."""

    def __init__(self, config: dict, gpus: dict[str, int] | None = None):
        """`gpus`: GPUs each rule's jobs are given (`reasonlab.compute.rule_gpus`); none by default."""
        self.config = config
        self.gpus = gpus or {}
        self.models: dict = config["models"]
        self.datasets: dict = config["datasets"]
        self.training: dict = config["training"]
        self.generation: dict = config["generation"]
        self.score: dict = config["score"]
        self.activations: dict = config.get("activations") or {}

    # ------------------------------------------------------------------ models and handles

    def checkpoints(self, model: str) -> list[str]:
        """A model's analysed checkpoints, in config order."""
        return list(self.models[model]["checkpoints"])

    def order(self, model: str, ckpt: str) -> int:
        """A checkpoint's position in its model's list (the x order of charts over checkpoints)."""
        return self.checkpoints(model).index(ckpt)

    @staticmethod
    def handle(model: str, ckpt: str) -> str:
        return f"results/models/{model}/{ckpt}.json"

    def handles(self) -> list[str]:
        return [self.handle(m, c) for m in self.models for c in self.checkpoints(m)]

    def split_ref(self, ref: str) -> tuple[str, str]:
        """'<model>' or '<model>/<ckpt>' -> (model, ckpt), the model's first checkpoint by default."""
        m, _, c = ref.partition("/")
        return m, c or self.checkpoints(m)[0]

    def base_of(self, model: str) -> tuple[str, str] | None:
        """(model, ckpt) a LoRA adapter entry adapts or a run's model starts from, or None."""
        spec = self.models[model]
        if "run" in spec:
            return self.split_ref(self.training[spec["run"]]["base"])
        return self.split_ref(spec["base"]) if spec.get("base") else None

    def model_spec(self, model: str, ckpt: str) -> dict:
        """The model's config entry with only this checkpoint (adding one re-runs nothing else)."""
        spec = dict(self.models[model])
        spec["checkpoints"] = {ckpt: spec["checkpoints"][ckpt]}
        if "run" in spec:
            spec["run_output"] = self.run_output(spec["run"])
        return canonical(spec)

    def model_inputs(self, model: str, ckpt: str) -> dict[str, str]:
        """The local weights directory (so the rule that builds it runs first) and the base handle."""
        spec = self.models[model]
        local = self.run_output(spec["run"]) if "run" in spec else local_path(spec, ckpt)
        inputs = {}
        if local is not None and (
            local.startswith("results/") or Path(local).expanduser().exists()
        ):
            inputs["weights"] = local
        base = self.base_of(model)
        if base:
            inputs["base"] = self.handle(*base)
        return inputs

    # ------------------------------------------------------------------ datasets

    def dataset_spec(self, dataset: str) -> dict:
        return canonical(self.datasets[dataset])

    def dataset_inputs(self, dataset: str) -> dict[str, str]:
        """The source file when it is local, so that rules producing it (the demo) run first."""
        source = self.datasets[dataset]["source"]
        return {"source": source} if is_local(source) else {}

    @staticmethod
    def dataset_table(dataset: str) -> str:
        return f"results/data/{dataset}.parquet"

    # ------------------------------------------------------------------ training runs

    @staticmethod
    def run_output(run: str) -> str:
        return f"results/training/{run}/output"

    def runs(self) -> list[str]:
        return sorted(self.training)

    def run_handles(self) -> list[str]:
        """The handles of every analysed checkpoint of every training run."""
        return [
            self.handle(m, c)
            for m, spec in self.models.items()
            if "run" in spec
            for c in self.checkpoints(m)
        ]

    def run_base_handle(self, run: str) -> str:
        return self.handle(*self.split_ref(self.training[run]["base"]))

    def selection_inputs(self, run: str) -> dict[str, str]:
        """The run's dataset, and its scores under the base model when rows are chosen by score."""
        spec = self.training[run]
        inputs = {"data": self.dataset_table(spec["data"])}
        if spec["select"]["keep"] in ("high", "low"):
            m, c = self.split_ref(spec["base"])
            inputs["scores"] = self.score_output(m, c, spec["data"], "sequences")
        return inputs

    def run_settings(self, run: str) -> str:
        """The run's LlamaFactory settings as JSON (run-scoped: editing one run re-runs only it)."""
        return as_json(self.training[run]["llamafactory"])

    def run_stage(self, run: str) -> str:
        return self.training[run]["llamafactory"].get("stage", "sft")

    def run_select(self, run: str) -> str:
        return as_json(self.training[run]["select"])

    def run_threads(self, run: str) -> int:
        return self.training[run]["threads"]

    # ------------------------------------------------------------------ generation

    @cached_property
    def gen_jobs(self) -> list[GenTask]:
        return [
            GenTask(m, c, d)
            for m in sorted(self.generation["models"] or self.models)
            for c in self.checkpoints(m)
            for d in sorted(self.generation["datasets"])
        ]

    @staticmethod
    def gen_output(model: str, ckpt: str, dataset: str) -> str:
        """The graded generations of a job (the raw ones are beside it, `.raw.parquet`)."""
        return f"results/generations/{model}/{ckpt}/{dataset}.parquet"

    def gen_options(self) -> tuple[str, str]:
        """(result options, speed options) of generation as JSON: the first is a param."""
        results, speeds = options.split(GenOptions, self.generation)
        return as_json(results), as_json(speeds)

    def gen_outputs(self) -> list[str]:
        return [self.gen_output(j.model, j.ckpt, j.dataset) for j in self.gen_jobs]

    def gen_job_args(self) -> list[str]:
        """One `model/ckpt/order/dataset` word per job, aligned with `gen_outputs()`."""
        return [
            f"{j.model}/{j.ckpt}/{self.order(j.model, j.ckpt)}/{j.dataset}" for j in self.gen_jobs
        ]

    # ------------------------------------------------------------------ scoring

    @cached_property
    def score_jobs(self) -> list[ScoreTask]:
        """Every configured text set under every scoring checkpoint, plus (with
        `score.generations`) each generation job's completions under the checkpoint that made them."""
        jobs = {
            ScoreTask(m, c, t)
            for m in self.score["models"] or self.models
            for c in self.checkpoints(m)
            for t in self.score["textsets"]
        }
        if self.score["generations"]:
            jobs |= {
                ScoreTask(j.model, j.ckpt, textsets.generated(j.dataset, j.model, j.ckpt))
                for j in self.gen_jobs
            }
        return sorted(jobs, key=lambda j: (j.model, self.order(j.model, j.ckpt), j.textset))

    def score_options(self) -> tuple[str, str]:
        """(result options, speed options) of scoring as JSON: the first is a param."""
        results, speeds = options.split(ScoreOptions, self.score)
        return as_json(results), as_json(speeds)

    @staticmethod
    def score_output(model: str, ckpt: str, textset: str, kind: str) -> str:
        """`kind`: tokens or sequences."""
        return f"results/scores/{model}/{ckpt}/{textset}.{kind}.parquet"

    def score_outputs(self, kind: str) -> list[str]:
        return [self.score_output(j.model, j.ckpt, j.textset, kind) for j in self.score_jobs]

    def score_job_args(self) -> list[str]:
        """One `model/ckpt/order/textset` word per job, aligned with `score_outputs(...)`."""
        return [
            f"{j.model}/{j.ckpt}/{self.order(j.model, j.ckpt)}/{j.textset}" for j in self.score_jobs
        ]

    def textset_input(self, textset: str) -> str:
        """A dataset's prepared table, or the graded generations a generated text set names."""
        t = textsets.parse(textset)
        if t.generated:
            return self.gen_output(t.model, t.ckpt, t.dataset)
        return self.dataset_table(t.dataset)

    # ------------------------------------------------------------------ activations

    @cached_property
    def capture_jobs(self) -> list[CaptureTask]:
        """Every prompt set under every analysed checkpoint of `activations.models`."""
        sets = sorted(self.activations.get("prompt_sets") or {})
        return [
            CaptureTask(m, c, s)
            for m in sorted(self.activations.get("models") or [])
            for c in self.checkpoints(m)
            for s in sets
        ]

    @staticmethod
    def capture_output(model: str, ckpt: str, promptset: str, kind: str) -> str:
        """`kind`: index (the texts' labels and store rows, Parquet) or meta (JSON)."""
        ext = "parquet" if kind == "index" else "json"
        return f"results/activations/{model}/{ckpt}/{promptset}.{kind}.{ext}"

    def capture_outputs(self, kind: str) -> list[str]:
        return [self.capture_output(j.model, j.ckpt, j.promptset, kind) for j in self.capture_jobs]

    def capture_input(self, model: str, ckpt: str, promptset: str) -> str:
        """A dataset prompt set's prepared table, or this checkpoint's graded generations."""
        spec = self.activations["prompt_sets"][promptset]
        if "generations" in spec:
            return self.gen_output(model, ckpt, spec["generations"])
        return self.dataset_table(spec["dataset"])

    def capture_set(self, promptset: str) -> str:
        """A prompt set's settings as JSON (a param), with the template and system it renders with."""
        spec = dict(self.activations["prompt_sets"][promptset])
        if "dataset" in spec:
            spec["template"] = self.activations["template"] or self.generation["template"]
            spec["system"] = self.activations["system"] or self.generation["system"]
        return as_json(spec)

    def capture_options(self) -> tuple[str, str]:
        """(result options, speed options) of activation capture as JSON: the first is a param."""
        results, speeds = options.split(CaptureOptions, self.activations)
        return as_json(results), as_json(speeds)

    # ------------------------------------------------------------------ activation analyses

    def analysed(self) -> list[tuple[str, str]]:
        """(model, ckpt) of every checkpoint that captures activations, in plan order."""
        return [
            (m, c)
            for m in sorted(self.activations.get("models") or [])
            for c in self.checkpoints(m)
        ]

    @staticmethod
    def side(spec: str) -> tuple[str, str | None]:
        """A contrast side '<prompt set>[:<type>]' -> (set, type or None)."""
        s, _, t = spec.partition(":")
        return s, t or None

    @cached_property
    def direction_jobs(self) -> list[tuple[str, str, str]]:
        contrasts = sorted((self.config.get("directions") or {}).get("contrasts") or {})
        return [(m, c, k) for m, c in self.analysed() for k in contrasts]

    @staticmethod
    def direction_output(model: str, ckpt: str, contrast: str, kind: str) -> str:
        """`kind`: candidates, chosen or pt (seed 001's reasoning_directions.pt)."""
        name = {
            "candidates": "candidates.parquet",
            "chosen": "chosen.json",
            "pt": "reasoning_directions.pt",
        }[kind]
        return f"results/directions/{model}/{ckpt}/{contrast}/{name}"

    def direction_inputs(self, model: str, ckpt: str, contrast: str) -> dict[str, str]:
        spec = self.config["directions"]["contrasts"][contrast]
        pos, neg = self.side(spec["positive"])[0], self.side(spec["negative"])[0]
        return {
            "handle": self.handle(model, ckpt),
            "positive": self.capture_output(model, ckpt, pos, "index"),
            "negative": self.capture_output(model, ckpt, neg, "index"),
            "meta": self.capture_output(model, ckpt, pos, "meta"),
        }

    def direction_spec(self, contrast: str) -> str:
        spec = self.config["directions"]["contrasts"][contrast]
        (ps, pt), (ns, nt) = self.side(spec["positive"]), self.side(spec["negative"])
        return as_json(
            {"positive_set": ps, "positive_type": pt, "negative_set": ns, "negative_type": nt}
        )

    def direction_options(self) -> tuple[str, str]:
        results, speeds = options.split(DirectionOptions, self.config.get("directions") or {})
        return as_json(results), as_json(speeds)

    @cached_property
    def probe_jobs(self) -> list[tuple[str, str]]:
        return self.analysed() if (self.config.get("probes") or {}).get("tasks") else []

    @staticmethod
    def probe_output(model: str, ckpt: str, kind: str) -> str:
        """`kind`: table (Parquet) or json (seed 001's probe_accuracies.json)."""
        name = "probes.parquet" if kind == "table" else "probe_accuracies.json"
        return f"results/probes/{model}/{ckpt}/{name}"

    def probe_sets(self) -> list[str]:
        return sorted({t["set"] for t in self.config["probes"]["tasks"].values()})

    def probe_inputs(self, model: str, ckpt: str) -> dict[str, list[str]]:
        sets = self.probe_sets()
        return {
            "index": [self.capture_output(model, ckpt, s, "index") for s in sets],
            "meta": [self.capture_output(model, ckpt, s, "meta") for s in sets],
        }

    def probe_settings(self) -> str:
        p = self.config["probes"]
        return as_json(
            {"tasks": p["tasks"], "options": {k: v for k, v in p.items() if k != "tasks"}}
        )

    @cached_property
    def lens_jobs(self) -> list[tuple[str, str, str]]:
        datasets = sorted((self.config.get("lens") or {}).get("datasets") or [])
        return [(m, c, d) for m, c in self.analysed() for d in datasets]

    @staticmethod
    def lens_output(model: str, ckpt: str, dataset: str) -> str:
        return f"results/lens/{model}/{ckpt}/{dataset}.parquet"

    def lens_settings(self) -> str:
        lens = self.config["lens"]
        return as_json({"max_texts": lens["max_texts"], "top_k": lens["top_k"], "layers": lens["layers"],
                        "template": self.activations["template"] or self.generation["template"],
                        "system": self.activations["system"] or self.generation["system"]})  # fmt: skip

    @cached_property
    def cka_jobs(self) -> list[tuple[str, str, str, str]]:
        """(model, ckpt, model2, ckpt2) pairs: consecutive checkpoints of each analysed model, or
        the configured pairs."""
        cka = self.config.get("cka") or {}
        if not cka.get("set") or not self.capture_jobs:
            return []
        if cka["pairs"] == "consecutive":
            out = []
            for m in sorted(self.activations["models"]):
                cs = self.checkpoints(m)
                out += [(m, a, m, b) for a, b in zip(cs, cs[1:], strict=False)]
            return out
        return [(*self.split_ref(a), *self.split_ref(b)) for a, b in cka["pairs"]]

    @staticmethod
    def cka_output(model: str, ckpt: str, model2: str, ckpt2: str, kind: str) -> str:
        """`kind`: table (Parquet) or json (seed 001's alignment_results.json)."""
        ext = "parquet" if kind == "table" else "alignment_results.json"
        return f"results/cka/{model}/{ckpt}/{model2}/{ckpt2}.{ext}"

    def cka_inputs(self, model: str, ckpt: str, model2: str, ckpt2: str) -> dict[str, str]:
        s = self.config["cka"]["set"]
        return {
            "index_a": self.capture_output(model, ckpt, s, "index"),
            "meta_a": self.capture_output(model, ckpt, s, "meta"),
            "index_b": self.capture_output(model2, ckpt2, s, "index"),
            "meta_b": self.capture_output(model2, ckpt2, s, "meta"),
        }

    def activation_jobs(self) -> tuple[list[str], list[str]]:
        """(one `kind/model/ckpt/order/item` word per analysis output, the output) for aggregation."""
        words, paths = [], []
        for m, c in self.probe_jobs:
            words.append(f"probes/{m}/{c}/{self.order(m, c)}/-")
            paths.append(self.probe_output(m, c, "table"))
        for m, c, k in self.direction_jobs:
            words.append(f"directions/{m}/{c}/{self.order(m, c)}/{k}")
            paths.append(str(Path(self.direction_output(m, c, k, "chosen")).parent))
        for m, c, d in self.lens_jobs:
            words.append(f"lens/{m}/{c}/{self.order(m, c)}/{d}")
            paths.append(self.lens_output(m, c, d))
        for m, c, m2, c2 in self.cka_jobs:
            words.append(f"cka/{m}/{c}/{self.order(m, c)}/{m2}:{c2}")
            paths.append(self.cka_output(m, c, m2, c2, "table"))
        return words, paths

    def activation_inputs(self) -> list[str]:
        """Every analysis output the aggregation reads (direction jobs: their three files)."""
        out = [self.probe_output(m, c, "table") for m, c in self.probe_jobs]
        out += [self.direction_output(m, c, k, kind) for m, c, k in self.direction_jobs
                for kind in ("candidates", "chosen", "pt")]  # fmt: skip
        out += [self.lens_output(m, c, d) for m, c, d in self.lens_jobs]
        out += [self.cka_output(*j, "table") for j in self.cka_jobs]
        return out

    # ------------------------------------------------------------------ interventions

    @cached_property
    def intervene_jobs(self) -> list[tuple[str, str, str]]:
        """(model, ckpt, spec): every spec under every checkpoint of `interventions.models`."""
        iv = self.config.get("interventions") or {}
        specs = sorted(iv.get("specs") or {})
        return [(m, c, k) for m in sorted(iv.get("models") or []) for c in self.checkpoints(m)
                for k in specs]  # fmt: skip

    @staticmethod
    def intervene_output(model: str, ckpt: str, spec: str, kind: str) -> str:
        """`kind`: table (graded generations per setting) or settings (one row per setting)."""
        return f"results/interventions/{model}/{ckpt}/{spec}.{kind}.parquet"

    def intervene_inputs(self, model: str, ckpt: str, spec: str) -> dict[str, str]:
        iv = self.config["interventions"]
        out = {"handle": self.handle(model, ckpt), "data": self.dataset_table(iv["dataset"])}
        contrast = iv["specs"][spec].get("contrast")
        if iv["specs"][spec]["kind"] != "ablate_layer":
            out["chosen"] = self.direction_output(model, ckpt, contrast, "chosen")
            out["pt"] = self.direction_output(model, ckpt, contrast, "pt")
        return out

    def intervene_settings(self, spec: str) -> str:
        """A spec's settings as JSON (a param: all of it changes results)."""
        iv = self.config["interventions"]
        s = dict(iv["specs"][spec])
        s |= {"max_prompts": iv["max_prompts"],
              "max_new_tokens": iv["max_new_tokens"] or self.generation["max_new_tokens"],
              "template": self.generation["template"], "system": self.generation["system"],
              "format": self.config["datasets"][iv["dataset"]]["format"],
              "markers": (self.config.get("directions") or {}).get("markers")}  # fmt: skip
        return as_json(s)

    @cached_property
    def transfer_jobs(self) -> list[tuple[str, str, str, str, str]]:
        """(model, ckpt, spec, source model, source ckpt): the checkpoint steered with the direction
        chosen at the source checkpoint. Pairs `all`: every checkpoint of each `interventions`
        model steered by every other checkpoint of the same model; or the configured pairs."""
        iv = self.config.get("interventions") or {}
        tr = iv.get("transfer") or {}
        spec = tr.get("spec")
        if not spec or not iv.get("specs"):
            return []
        if tr.get("pairs", "all") == "all":
            return [(m, t, spec, m, s) for m in sorted(iv.get("models") or [])
                    for t in self.checkpoints(m) for s in self.checkpoints(m) if s != t]  # fmt: skip
        out = []
        for src, dst in tr["pairs"]:
            (sm, sc), (m, c) = self.split_ref(src), self.split_ref(dst)
            out.append((m, c, spec, sm, sc))
        return out

    @staticmethod
    def transfer_output(
        model: str, ckpt: str, spec: str, model2: str, ckpt2: str, kind: str
    ) -> str:
        """`kind`: table or settings, as `intervene_output`; model2/ckpt2 chose the direction."""
        return f"results/transfer/{model}/{ckpt}/{spec}/{model2}/{ckpt2}.{kind}.parquet"

    def transfer_inputs(self, model: str, ckpt: str, spec: str, model2: str, ckpt2: str) -> dict:
        iv = self.config["interventions"]
        contrast = iv["specs"][spec]["contrast"]
        return {"handle": self.handle(model, ckpt), "data": self.dataset_table(iv["dataset"]),
                "chosen": self.direction_output(model2, ckpt2, contrast, "chosen"),
                "pt": self.direction_output(model2, ckpt2, contrast, "pt")}  # fmt: skip

    def transfer_settings(self, spec: str, model2: str, ckpt2: str) -> str:
        """The spec's settings with the transfer's strengths and the direction's source."""
        s = json.loads(self.intervene_settings(spec))
        strengths = (self.config["interventions"].get("transfer") or {}).get("strengths")
        s |= {"source": f"{model2}/{ckpt2}", "layers": "chosen",
              "strengths": strengths or s["strengths"]}  # fmt: skip
        return as_json(s)

    @cached_property
    def patch_jobs(self) -> list[tuple[str, str, str]]:
        """(model, ckpt, dataset): the patching experiment under every checkpoint of
        `interventions.models` when `interventions.patching.dataset` is set."""
        iv = self.config.get("interventions") or {}
        d = (iv.get("patching") or {}).get("dataset")
        if not d:
            return []
        return [(m, c, d) for m in sorted(iv.get("models") or []) for c in self.checkpoints(m)]

    @staticmethod
    def patch_output(model: str, ckpt: str, dataset: str, kind: str) -> str:
        """`kind`: groups (every pair x site x position group), tokens (the first pairs x site x
        token) or pairs (each pair's clean and corrupted metric)."""
        return f"results/patching/{model}/{ckpt}/{dataset}.{kind}.parquet"

    def patch_settings(self) -> str:
        """The patching options that change results, as JSON (a param)."""
        p = dict(self.config["interventions"]["patching"])
        p.pop("batch_size", None)
        p |= {"template": self.generation["template"], "system": self.generation["system"],
              "format": self.config["datasets"][p["dataset"]]["format"]}  # fmt: skip
        return as_json(p)

    def intervene_jobs_arg(self) -> tuple[list[str], list[str]]:
        """(one `model/ckpt/order/spec` word per job, its settings table) for the aggregation."""
        words = [f"{m}/{c}/{self.order(m, c)}/{k}/{m}/{c}" for m, c, k in self.intervene_jobs]
        paths = [self.intervene_output(m, c, k, "settings") for m, c, k in self.intervene_jobs]
        words += [
            f"{m}/{c}/{self.order(m, c)}/{k}/{m2}/{c2}" for m, c, k, m2, c2 in self.transfer_jobs
        ]
        paths += [self.transfer_output(*j, "settings") for j in self.transfer_jobs]
        return words, paths

    def patch_jobs_arg(self) -> tuple[list[str], list[str]]:
        """(one `model/ckpt/order/dataset` word per patching job, its groups table)."""
        words = [f"{m}/{c}/{self.order(m, c)}/{d}" for m, c, d in self.patch_jobs]
        return words, [self.patch_output(m, c, d, "groups") for m, c, d in self.patch_jobs]

    # ------------------------------------------------------------------ trace explorer

    @property
    def traces(self) -> dict:
        return self.config.get("traces") or {}

    @cached_property
    def step_jobs(self) -> list[ScoreTask]:
        """(model, ckpt, textset): each checkpoint of `traces.models` with its own generations of
        every generation dataset, and the scored datasets of `traces.textsets` under it."""
        out = []
        for m in sorted(self.traces.get("models") or []):
            for c in self.checkpoints(m):
                out += [ScoreTask(m, c, textsets.generated(j.dataset, m, c))
                        for j in self.gen_jobs if (j.model, j.ckpt) == (m, c)]  # fmt: skip
                out += [ScoreTask(m, c, t) for t in self.traces.get("textsets") or []]
        return out

    @staticmethod
    def step_output(model: str, ckpt: str, textset: str, kind: str = "parquet") -> str:
        """`kind`: parquet (one row per step) or json (the job's summary)."""
        return f"results/steps/{model}/{ckpt}/{textset}.{kind}"

    def step_inputs(self, model: str, ckpt: str, textset: str) -> dict[str, str]:
        return {"tokens": self.score_output(model, ckpt, textset, "tokens"),
                "sequences": self.score_output(model, ckpt, textset, "sequences"),
                "labels": self.textset_input(textset)}  # fmt: skip

    def step_settings(self) -> str:
        """The step rules and forking quantile (a param: they change results)."""
        return as_json(
            {**(self.traces.get("steps") or {}), "quantile": self.traces.get("quantile", 0.9)}
        )

    @cached_property
    def embed_jobs(self) -> list[GenTask]:
        """(model, ckpt, dataset): each checkpoint of `traces.models` with its own generations."""
        models = set(self.traces.get("models") or [])
        return [j for j in self.gen_jobs if j.model in models]

    @staticmethod
    def embed_output(model: str, ckpt: str, dataset: str, kind: str = "table") -> str:
        """`kind`: table (Parquet), npy or json (seed 000's `{model}_embeddings.npy` and
        `{model}_results.json`)."""
        if kind == "table":
            return f"results/embeddings/{model}/{ckpt}/{dataset}.parquet"
        name = "embeddings.npy" if kind == "npy" else "results.json"
        return f"results/embeddings/{model}/{ckpt}/{dataset}/{model}_{name}"

    def embed_inputs(self, model: str, ckpt: str, dataset: str) -> dict[str, str]:
        return {"generations": self.gen_output(model, ckpt, dataset),
                "steps": self.step_output(model, ckpt, textsets.generated(dataset, model, ckpt))}  # fmt: skip

    def embed_settings(self) -> str:
        e = self.config.get("embed") or {}
        return as_json({k: e.get(k) for k in ("model", "what", "normalize")})

    @cached_property
    def groups(self) -> dict[str, list[tuple[str, str]]]:
        """The trace map's groups: configured, or one per model of `traces.models`."""
        if self.traces.get("groups"):
            return {
                g: [self.split_ref(r) for r in refs] for g, refs in self.traces["groups"].items()
            }
        return {
            m: [(m, c) for c in self.checkpoints(m)]
            for m in sorted(self.traces.get("models") or [])
        }

    @cached_property
    def map_jobs(self) -> list[tuple[str, str]]:
        """(group, dataset): one joint map per group and generation dataset."""
        if not self.embed_jobs:
            return []
        return [(g, d) for g in sorted(self.groups) for d in sorted(self.generation["datasets"])]

    @staticmethod
    def map_output(group: str, dataset: str, kind: str) -> str:
        """`kind`: points, phrases, clusters (Parquet) or json."""
        ext = "json" if kind == "json" else f"{kind}.parquet"
        return f"results/traces/{group}/{dataset}.{ext}"

    def map_inputs(self, group: str, dataset: str) -> list[str]:
        out = []
        for m, c in self.groups[group]:
            out += [self.embed_output(m, c, dataset), self.gen_output(m, c, dataset),
                    self.step_output(m, c, textsets.generated(dataset, m, c))]  # fmt: skip
        return out

    def map_members(self, group: str, dataset: str) -> str:
        """The group's members with their input paths, as JSON for the job."""
        return as_json([{"model": m, "ckpt": c, "order": self.order(m, c),
                         "embeddings": self.embed_output(m, c, dataset),
                         "generations": self.gen_output(m, c, dataset),
                         "steps": self.step_output(m, c, textsets.generated(dataset, m, c))}
                        for m, c in self.groups[group]])  # fmt: skip

    def map_settings(self) -> str:
        t = self.traces
        keys = ("k", "k_range", "ngram_range", "top_ngrams", "examples")
        return as_json({**(t.get("map") or {}), **{k: t.get(k) for k in keys}})

    def trace_jobs_arg(self) -> tuple[list[str], list[str]]:
        """(one `kind/model/ckpt/order/name` word per steps job and per map, its output)."""
        words = [
            f"steps/{j.model}/{j.ckpt}/{self.order(j.model, j.ckpt)}/{j.textset}"
            for j in self.step_jobs
        ]
        paths = [self.step_output(j.model, j.ckpt, j.textset) for j in self.step_jobs]
        words += [f"map/{g}/-/0/{d}" for g, d in self.map_jobs]
        paths += [self.map_output(g, d, "points") for g, d in self.map_jobs]
        return words, paths

    # ------------------------------------------------------------------ guided inference

    @cached_property
    def guided_jobs(self) -> list[tuple[str, str, str, str, str, str]]:
        """(base model, base ckpt, oracle model, oracle ckpt, dataset, policy): every configured
        pair × dataset × policy (a pair's jobs depend on its two checkpoints only)."""
        gd = self.config.get("guided") or {}
        out = []
        for pair in gd.get("pairs") or []:
            (m, c), (m2, c2) = self.split_ref(pair["base"]), self.split_ref(pair["oracle"])
            out += [(m, c, m2, c2, d, p) for d in sorted(gd.get("datasets") or [])
                    for p in gd.get("policies") or []]  # fmt: skip
        return out

    @staticmethod
    def guided_output(model: str, ckpt: str, model2: str, ckpt2: str, dataset: str, policy: str,
                      kind: str) -> str:  # fmt: skip
        """`kind`: problems (every problem of every cell), cells (one row per grid cell) or points
        (one row per consultation point)."""
        return f"results/guided/{model}/{ckpt}/{model2}/{ckpt2}/{dataset}/{policy}.{kind}.parquet"

    def guided_inputs(self, model: str, ckpt: str, model2: str, ckpt2: str, dataset: str) -> dict:
        return {"base": self.handle(model, ckpt), "oracle": self.handle(model2, ckpt2),
                "data": self.dataset_table(dataset)}  # fmt: skip

    def guided_settings(self, dataset: str) -> str:
        """What changes a guided job's results, as JSON (a param)."""
        gd = {k: v for k, v in self.config["guided"].items()
              if k not in ("pairs", "datasets", "policies", "threads", "batch_size", *PLACEMENT_KEYS)}  # fmt: skip
        gd |= {"max_new_tokens": gd["max_new_tokens"] or self.generation["max_new_tokens"],
               "template": self.generation["template"], "system": self.generation["system"],
               "format": self.datasets[dataset]["format"]}  # fmt: skip
        return as_json(gd)

    def guided_server(self, model: str, ckpt: str, model2: str, ckpt2: str) -> str:
        """The pair's oracle server as JSON (`{}`: the oracle is loaded in the job). Where the
        server runs changes no result: this reaches the job on its command line only."""
        for pair in self.config["guided"]["pairs"]:
            if self.split_ref(pair["base"]) == (model, ckpt) and self.split_ref(pair["oracle"]) == (
                model2,
                ckpt2,
            ):
                return as_json(pair.get("server") or {})
        return as_json({})

    def guided_backend(self, model: str, ckpt: str, model2: str, ckpt2: str) -> str:
        """`server` or `local`: how the oracle runs changes how agreement is measured (a param)."""
        return "server" if json.loads(self.guided_server(model, ckpt, model2, ckpt2)) else "local"

    def guided_jobs_arg(self) -> tuple[list[str], list[str]]:
        """(one `model/ckpt/model2/ckpt2/dataset/policy` word per guided job, its cells table)."""
        return ["/".join(j) for j in self.guided_jobs], [
            self.guided_output(*j, "cells") for j in self.guided_jobs
        ]

    # ------------------------------------------------------------------ the seeds' own files

    @property
    def seed_formats(self) -> bool:
        """`export.seed_formats`: also write the files the seeds' users read (results/export/)."""
        return bool((self.config.get("export") or {}).get("seed_formats"))

    @cached_property
    def seed001_steering_jobs(self) -> list[tuple[str, str, str]]:
        """(model, ckpt, spec) of every steering `intervene` job (a spec of kind steer), with
        `export.seed_formats`: seed 001's intervention_results.json of each."""
        if not self.seed_formats:
            return []
        specs = self.config["interventions"]["specs"] if self.intervene_jobs else {}
        return [(m, c, k) for m, c, k in self.intervene_jobs if specs[k]["kind"] == "steer"]

    @staticmethod
    def seed001_intervention_output(model: str, ckpt: str, spec: str) -> str:
        return f"results/export/seed001/{model}/{ckpt}/{spec}/intervention_results.json"

    @property
    def seed001_alignment_jobs(self) -> list[tuple[str, str, str, str]]:
        """Every CKA pair, with `export.seed_formats`: seed 001's alignment_results.json of each."""
        return self.cka_jobs if self.seed_formats else []

    @staticmethod
    def seed001_alignment_output(model: str, ckpt: str, model2: str, ckpt2: str) -> str:
        return f"results/export/seed001/{model}/{ckpt}/{model2}/{ckpt2}/alignment_results.json"

    def seed001_alignment_inputs(self) -> dict[str, str | list[str]]:
        """The export rule's inputs, as patterns over its wildcards: the CKA table, and with
        `directions.contrasts` both sides' directions of the first contrast by name (both sides of
        a CKA pair capture activations, so both have them)."""
        w = ("{model}", "{ckpt}", "{model2}", "{ckpt2}")
        out: dict = {"table": self.cka_output(*w, "table"), "directions": []}
        contrasts = sorted((self.config.get("directions") or {}).get("contrasts") or {})
        if contrasts:
            out["directions"] = [self.direction_output(w[0], w[1], contrasts[0], "pt"),
                                 self.direction_output(w[2], w[3], contrasts[0], "pt")]  # fmt: skip
        return out

    @cached_property
    def seed002_runs(self) -> list[tuple[str, str]]:
        """(model, ckpt) of every generating checkpoint, in plan order, with `export.seed_formats`
        and `score.generations` (its own generations scored under it): seed 002's models, the same
        on every generation dataset. Their seed names must differ."""
        if not self.seed_formats or not self.score["generations"]:
            return []
        runs = list(dict.fromkeys((j.model, j.ckpt) for j in self.gen_jobs))
        names = [self.seed002_name(m, c) for m, c in runs]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise ValueError(
                f"export.seed_formats: seed 002 names each checkpoint <model>_<ckpt>, and {clash} "
                "would name two; rename a model or checkpoint"
            )
        return runs

    @staticmethod
    def seed002_name(model: str, ckpt: str) -> str:
        """Seed 002's model_name of a checkpoint (its file names' prefix)."""
        return f"{model}_{ckpt}".replace("/", "_")

    @property
    def seed002_names(self) -> list[str]:
        return [self.seed002_name(m, c) for m, c in self.seed002_runs]

    @property
    def seed002_datasets(self) -> list[str]:
        """Every generation dataset, with seed 002's models: its files are per dataset."""
        return sorted(self.generation["datasets"]) if self.seed002_runs else []

    def seed002_inputs(self, dataset: str = "{dataset}") -> dict[str, list[str]]:
        """Each seed 002 model's own generations on a dataset scored under it (tokens), graded
        (generations), and its handle; by default patterns over the rule's `{dataset}`."""
        runs = self.seed002_runs
        return {"tokens": [self.score_output(m, c, textsets.generated(dataset, m, c), "tokens")
                           for m, c in runs],
                "generations": [self.gen_output(m, c, dataset) for m, c in runs],
                "handles": [self.handle(m, c) for m, c in runs]}  # fmt: skip

    def seed002_outputs(self, dataset: str = "{dataset}") -> list[str]:
        d = f"results/export/seed002/{dataset}"
        return [f"{d}/{n}_{kind}.csv" for n in self.seed002_names
                for kind in ("token_stats", "all_tokens_detailed")] + [
            f"{d}/prompt_level_results.csv", f"{d}/results_summary.json"]  # fmt: skip

    @property
    def seed003_pairs(self) -> list[str]:
        """`model/textset` of every trained model (a run's checkpoints) and each configured text
        set it is scored on, with `export.seed_formats`: seed 003's dynamics JSON of each."""
        if not self.seed_formats or not self.training:
            return []
        scored = self.score["models"] or list(self.models)
        return [f"{m}/{t}" for m in sorted(self.models) if "run" in self.models[m] and m in scored
                for t in sorted(self.score["textsets"]) if not textsets.parse(t).generated]  # fmt: skip

    @staticmethod
    def seed003_output(pair: str) -> str:
        model, textset = pair.split("/", 1)
        return f"results/export/seed003/{model}/{textset}_dynamics.json"

    @property
    def seed004_exports(self) -> list[str]:
        """Seed 004's JSONL of every guide job, with `export.seed_formats`."""
        if not self.seed_formats:
            return []
        return [self.seed004_output(*j) for j in self.guided_jobs]

    @staticmethod
    def seed004_output(
        model: str, ckpt: str, model2: str, ckpt2: str, dataset: str, policy: str
    ) -> str:
        return f"results/export/seed004/{model}/{ckpt}/{model2}/{ckpt2}/{dataset}/{policy}.jsonl"

    def seed_exports(self) -> list[str]:
        """Every seed file `export.seed_formats` asks for (none without it)."""
        return [*(p for d in self.seed002_datasets for p in self.seed002_outputs(d)),
                *(self.seed001_intervention_output(*j) for j in self.seed001_steering_jobs),
                *(self.seed001_alignment_output(*j) for j in self.seed001_alignment_jobs),
                *map(self.seed003_output, self.seed003_pairs), *self.seed004_exports]  # fmt: skip

    # ------------------------------------------------------------------ devices and dtypes

    def compute(self, rule: str, model: str) -> compute.Request:
        """What a job of `rule` (a key of COMPUTE_STAGES) for `model` asks of its machine."""
        section = COMPUTE_STAGES[rule]
        return compute.request(
            self.config.get("compute", {}), self.config[section], section,
            self.models[model].get("dtype"), model, self.gpus.get(rule, 0),
        )  # fmt: skip

    def compute_dtype(self, rule: str, model: str) -> str:
        """The dtype a job runs its model in (a param: it changes results): explicit, or `auto`
        (the checkpoint's own) for a job planned on a GPU, `float32` for one planned on a CPU."""
        return self.compute(rule, model).dtype

    def compute_placement(self, rule: str, model: str) -> str:
        """Where a job runs its model, as JSON for `--compute` (speed only: never a param)."""
        r = self.compute(rule, model)
        return as_json({"device": r.device, "device_map": r.device_map,
                        "gpu_planned": r.gpu_planned, "keys": r.keys})  # fmt: skip

    @staticmethod
    def compute_record(rule: str, model: str, ckpt: str, name: str) -> str:
        """Where a job that loads a model writes how it ran (device, dtype, GPUs)."""
        return f"results/compute/{rule}/{model}/{ckpt}/{name}.json"

    def compute_records(self) -> list[str]:
        """Every model-loading job's record (the run overview's input)."""
        return [self.compute_record("generate", j.model, j.ckpt, j.dataset) for j in self.gen_jobs] + [
            self.compute_record("score", j.model, j.ckpt, j.textset) for j in self.score_jobs
        ] + [
            self.compute_record("capture_activations", j.model, j.ckpt, j.promptset)
            for j in self.capture_jobs
        ] + [
            self.compute_record("directions", m, c, k) for m, c, k in self.direction_jobs
        ] + [self.compute_record("lens", m, c, d) for m, c, d in self.lens_jobs] + [
            self.compute_record("intervene", m, c, k) for m, c, k in self.intervene_jobs
        ] + [
            self.compute_record("transfer", m, c, f"{k}/{m2}/{c2}")
            for m, c, k, m2, c2 in self.transfer_jobs
        ] + [self.compute_record("patch", m, c, d) for m, c, d in self.patch_jobs] + [
            self.compute_record("embed", j.model, j.ckpt, j.dataset) for j in self.embed_jobs
        ] + [
            self.compute_record("guide", m, c, f"{m2}/{c2}/{d}/{p}")
            for m, c, m2, c2, d, p in self.guided_jobs
        ]  # fmt: skip

    # ------------------------------------------------------------------ aggregation and report

    def stages(self) -> list:
        """The report modules whose stage has jobs, in the report's order."""
        active = [report_overview]
        if self.gen_jobs:
            active.append(report_generate)
        if self.score_jobs:
            active.append(report_score)
        if self.step_jobs:
            active.append(report_traces)
        if self.activation_jobs()[0]:
            active.append(report_activations)
        if self.intervene_jobs or self.patch_jobs:
            active.append(report_interventions)
        if self.guided_jobs:
            active.append(report_guided)
        if self.training:
            active.append(report_training)
        return active

    @staticmethod
    def activation_tables() -> dict[str, str]:
        return table_paths(report_activations.TABLES)

    def score_tables(self) -> dict[str, str]:
        names = list(report_score.TABLES)
        if self.score["detailed_tokens"]:
            names += list(report_score.OPTIONAL_TABLES)
        return table_paths(names)

    def report_tables(self) -> dict[str, str]:
        """Every aggregated table the report reads: name -> Parquet path."""
        tables = {}
        for stage in self.stages():
            tables.update(table_paths(stage.TABLES))
        return tables

    def final_outputs(self) -> list[str]:
        """The report, every chart of it as SVG and PNG (results/figures/<section>/), and with
        `export.seed_formats` the seeds' own files."""
        return ["results/report.html", "results/figures/index.json", *self.seed_exports()]
