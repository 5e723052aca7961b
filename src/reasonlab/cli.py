"""The `reasonlab` command: one sub-command per workflow step (`reasonlab <step> --help`).

Every rule of the workflow runs one of these, in the environment the step needs
(`<env>/bin/python -m reasonlab <step> ...`), and a researcher can run the same step by hand, as the
seeds' users ran `python script.py --model_paths ...`:

    reasonlab score --handle results/models/tiny/final.json --texts results/data/demo-eval.parquet \\
        --tokens out.tokens.parquet --sequences out.sequences.parquet

Each sub-command only parses its arguments and calls one library function. With `--log PATH` all
output (also of child processes) goes to that file; an input error is one line on stderr and in the
log (`[step] error: ...`, exit status 1), never a bare traceback. Imports are deferred into each
step, so `reasonlab --help` and the workflow's parsing stay cheap.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

STEPS: dict[str, tuple[str, Callable, Callable]] = {}
TOOLS = ("guided-view",)  # steps for a researcher at the terminal, run by no rule


def step(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], object]):
    """Declare `fn(args, log)` as sub-command `name`, whose arguments `add_arguments(parser)` adds."""

    def register(fn):
        STEPS[name] = (help, add_arguments, fn)
        return fn

    return register


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text[:80]!r}") from None


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _compute_arguments(p: argparse.ArgumentParser) -> None:
    """The device policy's arguments of a step that loads a model (see reasonlab.compute)."""
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument(
        "--compute", type=_json, default={},
        help='device placement (JSON): {"device": "auto|cpu|cuda|cuda:N", "device_map": null|"auto"}',
    )  # fmt: skip
    p.add_argument("--record", help="where to write how the job ran (device, dtype, GPUs; JSON)")


def _request(a):
    from reasonlab.compute import Request

    c = dict(a.compute)
    if "keys" in c:
        c["keys"] = tuple(tuple(k) for k in c["keys"])
    return Request(**c, dtype=a.dtype)


def _jobs(words: list[str], fields: int = 4) -> list[list[str]]:
    """`model/ckpt/order/name` words (the planning module's job lists) as lists of parts."""
    out = []
    for w in words:
        parts = w.split("/")
        if len(parts) != fields:
            raise SystemExit(f"a job is written with {fields} parts separated by '/', not {w!r}")
        out.append(parts)
    return out


def _out(names, out_dir: str) -> dict[str, str]:
    return {n: str(Path(out_dir) / f"{n}.parquet") for n in names}


# ----------------------------------------------------------------------------- the demo


@step(
    "build-demo-data",
    "write the demo's synthetic problems (pool, eval, control, pretrain, traces, pairs)",
    lambda p: (
        p.add_argument("--pool", required=True),
        p.add_argument("--eval", required=True),
        p.add_argument("--control", required=True),
        p.add_argument("--pretrain", required=True),
        p.add_argument("--traces", required=True),
        p.add_argument("--pairs", help="clean/corrupted pairs (JSONL)"),
        p.add_argument("--seed", type=int, default=0),
        p.add_argument("--sizes", type=_json, default={}, help="DemoSizes fields (JSON)"),
    ),
)
def build_demo_data(a, log):
    from reasonlab.synth import DemoSizes, write_demo_data

    out = {"pool": a.pool, "eval": a.eval, "control": a.control, "pretrain": a.pretrain,
           "traces": a.traces} | ({"pairs": a.pairs} if a.pairs else {})  # fmt: skip
    counts = write_demo_data(out, seed=a.seed, sizes=DemoSizes(**a.sizes))
    log.info("wrote demo sets: %s", counts)


@step(
    "build-demo-tokenizer",
    "train the demo's byte-level BPE tokenizer on the demo texts",
    lambda p: (
        p.add_argument("--pool", required=True),
        p.add_argument("--control", required=True),
        p.add_argument("--pretrain", required=True),
        p.add_argument("--output", required=True),
        p.add_argument("--vocab-size", type=int, default=1024),
    ),
)
def build_demo_tokenizer(a, log):
    from reasonlab.demo import build_tokenizer
    from reasonlab.synth import corpus_texts, read_demo_files

    data = read_demo_files({"pool": a.pool, "control": a.control, "pretrain": a.pretrain})
    size = build_tokenizer(corpus_texts(data), a.output, a.vocab_size)
    log.info("trained a byte-level BPE tokenizer with %d tokens", size)


@step(
    "build-demo-model",
    "initialise the demo's tiny Qwen2 model",
    lambda p: (
        p.add_argument("--tokenizer", required=True),
        p.add_argument("--output", required=True),
        p.add_argument("--spec", type=_json, default={}, help="TinyModelSpec fields (JSON)"),
        p.add_argument("--seed", type=int, default=0),
    ),
)
def build_demo_model(a, log):
    from reasonlab.demo import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(**a.spec)
    n = build_tiny_model(a.tokenizer, a.output, spec, a.seed)
    log.info("initialised a Qwen2 model with %d parameters (%s)", n, spec)


# ----------------------------------------------------------------------------- environments, models, data


@step(
    "describe-env",
    "record the running environment's Python, packages and a test import",
    lambda p: (
        p.add_argument("--env", required=True, help="core, train or gen"),
        p.add_argument("--output", required=True),
    ),
)
def describe_env(a, log):
    from reasonlab import ReasonlabError
    from reasonlab.envinfo import describe

    info = describe(a.env)
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    log.info("%s", text)
    Path(a.output).write_text(text)
    if not info["ok"]:
        Path(a.output).unlink()
        raise ReasonlabError(f"environment {a.env}: a module failed to import: {info['imports']}")


@step(
    "resolve-model",
    "resolve a configured model x checkpoint to a handle (JSON)",
    lambda p: (
        p.add_argument("--model", required=True),
        p.add_argument("--ckpt", required=True),
        p.add_argument("--spec", type=_json, required=True, help="the models.<model> entry (JSON)"),
        p.add_argument("--base", help="the base model's handle (LoRA adapters, run models)"),
        p.add_argument("--output", required=True),
    ),
)
def resolve_model(a, log):
    from reasonlab.models import read_handle, resolve, write_handle

    base = read_handle(a.base) if a.base else None
    handle = resolve(a.model, a.ckpt, a.spec, base=base)
    write_handle(handle, a.output)
    log.info("%s/%s -> %s (%s)", a.model, a.ckpt, handle.location, handle.content_hash)


@step(
    "prepare-dataset",
    "read any dataset source into one normalized table (+ rejects, summary)",
    lambda p: (
        p.add_argument("--name", required=True),
        p.add_argument(
            "--spec", type=_json, required=True, help="the datasets.<name> entry (JSON)"
        ),
        p.add_argument("--table", required=True),
        p.add_argument("--rejects", required=True),
        p.add_argument("--summary", required=True),
    ),
)
def prepare_dataset(a, log):
    from reasonlab.data import prepare, write_prepared

    p = prepare(a.spec, a.name, progress=True)
    if p.rejects:
        log.warning("%d row(s) rejected; all are in %s", len(p.rejects), a.rejects)
    write_prepared(p, a.table, a.rejects, a.summary)
    log.info("%s: %s", a.name, p.summary)


# ----------------------------------------------------------------------------- generation


@step(
    "generate",
    "generate completions of a prepared dataset's questions (gen environment)",
    lambda p: (
        p.add_argument("--handle", required=True),
        p.add_argument("--data", required=True),
        p.add_argument("--output", required=True),
        p.add_argument("--options", type=_json, default={}, help="GenOptions fields (JSON)"),
        p.add_argument("--speed", type=_json, default={}, help="speed-only GenOptions (JSON)"),
        p.add_argument("--threads", type=int),
        _compute_arguments(p),
    ),
)
def generate(a, log):
    from reasonlab.generate import GenOptions, generate_dataset

    _threads(a.threads)
    generate_dataset(a.handle, a.data, a.output, GenOptions(**a.options, **a.speed),
                     compute=_request(a), record_path=a.record)  # fmt: skip


@step(
    "grade",
    "add reasoning, answer and correctness to generated completions",
    lambda p: (
        p.add_argument("--raw", required=True, help="the generate step's table"),
        p.add_argument("--data", required=True, help="the prepared dataset"),
        p.add_argument("--output", required=True),
        p.add_argument("--format", required=True, help="the dataset's format (gsm8k, math, ...)"),
        p.add_argument("--reasoning-start"),
        p.add_argument("--reasoning-end"),
    ),
)
def grade(a, log):
    import polars as pl

    from reasonlab.data import read_dataset
    from reasonlab.grading import grade_table
    from reasonlab.outputs import write_parquet

    graded = grade_table(
        pl.read_parquet(a.raw),
        read_dataset(a.data),
        a.format,
        a.reasoning_start or None,
        a.reasoning_end or None,
    )
    write_parquet(graded, a.output)
    log.info(
        "%d completions, %d correct, %d flagged",
        graded.height,
        graded["correct"].sum(),
        graded["grade_flag"].is_not_null().sum(),
    )


@step(
    "aggregate-generations",
    "accuracy, lengths and sample traces across checkpoints",
    lambda p: (
        p.add_argument("--jobs", nargs="*", default=[], help="model/ckpt/order/dataset per job"),
        p.add_argument("--graded", nargs="*", default=[], help="graded tables, one per job"),
        p.add_argument("--out-dir", required=True),
    ),
)
def aggregate_generations(a, log):
    from reasonlab.report import generate as stage

    jobs = [
        stage.GenJob(m, c, int(o), d, g)
        for (m, c, o, d), g in zip(_jobs(a.jobs), a.graded, strict=True)
    ]
    stage.aggregate_generations(jobs, _out(stage.TABLES, a.out_dir))


# ----------------------------------------------------------------------------- scoring


@step(
    "score",
    "teacher-forced token statistics of a text set under one checkpoint",
    lambda p: (
        p.add_argument("--handle", required=True),
        p.add_argument("--texts", required=True, help="a prepared dataset or graded generations"),
        p.add_argument("--textset", default="", help="the text set's name (<dataset>[@<m>@<c>])"),
        p.add_argument("--tokens", required=True),
        p.add_argument("--sequences", required=True),
        p.add_argument("--options", type=_json, default={}, help="ScoreOptions fields (JSON)"),
        p.add_argument("--speed", type=_json, default={}, help="speed-only ScoreOptions (JSON)"),
        p.add_argument("--prompt", default="chat", help="chat or plain"),
        p.add_argument("--system"),
        p.add_argument("--threads", type=int),
        _compute_arguments(p),
    ),
)
def score(a, log):
    from reasonlab.score import score_textset

    score_textset(a.handle, a.texts, a.tokens, a.sequences, options={**a.options, **a.speed},
                  prompt=a.prompt, system=a.system or None, threads=a.threads, name=a.textset,
                  compute=_request(a), record_path=a.record)  # fmt: skip


@step(
    "aggregate-scores",
    "per-checkpoint entropy and log-likelihood tables for the report",
    lambda p: (
        p.add_argument("--jobs", nargs="*", default=[], help="model/ckpt/order/textset per job"),
        p.add_argument("--tokens", nargs="*", default=[], help="token tables, one per job"),
        p.add_argument("--sequences", nargs="*", default=[], help="sequence tables, one per job"),
        p.add_argument("--out-dir", required=True),
        p.add_argument("--sample-prompts", type=int, default=4),
        p.add_argument("--extremes", type=int, default=5),
        p.add_argument("--detailed", action="store_true", help="also every token in one table"),
    ),
)
def aggregate_scores(a, log):
    from reasonlab.report import score as stage

    jobs = [
        stage.ScoreJob(m, c, int(o), t, tok, seq)
        for (m, c, o, t), tok, seq in zip(_jobs(a.jobs), a.tokens, a.sequences, strict=True)
    ]
    names = stage.TABLES + (stage.OPTIONAL_TABLES if a.detailed else ())
    stage.aggregate_scores(jobs, _out(names, a.out_dir), sample_prompts=a.sample_prompts,
                           extremes=a.extremes, detailed=a.detailed)  # fmt: skip


# ----------------------------------------------------------------------------- activations


@step(
    "capture-activations",
    "residual-stream activations of a prompt set under one checkpoint, into the content-keyed store",
    lambda p: (
        p.add_argument("--handle", required=True),
        p.add_argument("--texts", required=True, help="a prepared dataset or graded generations"),
        p.add_argument("--promptset", required=True, help="the prompt set's name"),
        p.add_argument(
            "--set",
            type=_json,
            required=True,
            help='the prompt set (JSON): {"dataset"|"generations": d, "max_texts", "template", "system"}',
        ),  # fmt: skip
        p.add_argument("--index", required=True, help="the index table to write (Parquet)"),
        p.add_argument("--meta", required=True, help="the metadata to write (JSON)"),
        p.add_argument("--store", required=True, help="the store's root directory"),
        p.add_argument("--options", type=_json, default={}, help="CaptureOptions fields (JSON)"),
        p.add_argument("--speed", type=_json, default={}, help="speed-only CaptureOptions (JSON)"),
        p.add_argument("--threads", type=int),
        _compute_arguments(p),
    ),
)
def capture_activations(a, log):
    from reasonlab.activations import capture_promptset

    spec = a.set
    capture_promptset(a.handle, a.texts, a.index, a.meta, a.store, a.promptset,
                      source="generations" if "generations" in spec else "dataset",
                      options={**a.options, **a.speed}, template=spec.get("template") or "chat",
                      system=spec.get("system"), max_texts=spec.get("max_texts"), threads=a.threads,
                      compute=_request(a), record_path=a.record,
                      solution=bool(spec.get("solution")))  # fmt: skip


@step(
    "directions",
    "a contrast's candidate reasoning directions for one checkpoint, scored and chosen",
    lambda p: (
        p.add_argument("--handle", required=True),
        p.add_argument("--positive", required=True, help="the positive side's capture index"),
        p.add_argument("--negative", required=True, help="the negative side's capture index"),
        p.add_argument("--meta", required=True, help="the positive side's capture metadata"),
        p.add_argument("--contrast", required=True, help="the contrast's name"),
        p.add_argument("--spec", type=_json, required=True, help="the contrast's sides (JSON)"),
        p.add_argument("--out-dir", required=True),
        p.add_argument("--options", type=_json, default={}, help="DirectionOptions fields (JSON)"),
        p.add_argument(
            "--speed", type=_json, default={}, help="speed-only DirectionOptions (JSON)"
        ),
        p.add_argument("--threads", type=int),
        _compute_arguments(p),
    ),
)
def directions(a, log):
    from reasonlab.directions import compute_contrast

    compute_contrast(a.handle, a.positive, a.negative, a.meta, a.out_dir, a.spec, a.contrast,
                     options={**a.options, **a.speed}, threads=a.threads, compute=_request(a),
                     record_path=a.record)  # fmt: skip


@step(
    "probes",
    "linear probes per layer of one checkpoint's captured activations, with shuffled controls",
    lambda p: (
        p.add_argument("--model", default=""),
        p.add_argument("--ckpt", default=""),
        p.add_argument(
            "--settings", type=_json, required=True, help='{"tasks": {...}, "options": {...}}'
        ),
        p.add_argument(
            "--sets", nargs="+", required=True, help="the prompt sets, aligned with --index/--meta"
        ),
        p.add_argument("--index", nargs="+", required=True),
        p.add_argument("--meta", nargs="+", required=True),
        p.add_argument("--table", required=True),
        p.add_argument("--json", required=True, help="seed 001's probe_accuracies.json"),
    ),
)
def probes(a, log):
    from reasonlab.probes import probe_checkpoint

    probe_checkpoint(a.settings["tasks"], dict(zip(a.sets, a.index, strict=True)),
                     dict(zip(a.sets, a.meta, strict=True)), a.table, a.json,
                     a.settings.get("options"), a.model, a.ckpt)  # fmt: skip


@step(
    "lens",
    "the logit lens of a dataset's reference solutions under one checkpoint",
    lambda p: (
        p.add_argument("--handle", required=True),
        p.add_argument("--data", required=True, help="a prepared dataset"),
        p.add_argument("--dataset", default=""),
        p.add_argument("--settings", type=_json, default={}),
        p.add_argument("--table", required=True),
        p.add_argument("--threads", type=int),
        _compute_arguments(p),
    ),
)
def lens(a, log):
    from reasonlab.lens import lens_dataset

    s = a.settings
    lens_dataset(a.handle, a.data, a.table, a.dataset, s.get("template") or "chat", s.get("system"),
                 s.get("layers", "all"), s.get("top_k", 5), s.get("max_texts"), a.threads,
                 _request(a), a.record)  # fmt: skip


@step(
    "cka",
    "CKA of every layer pair between two checkpoints' captures of one prompt set",
    lambda p: (
        p.add_argument("--index-a", required=True),
        p.add_argument("--meta-a", required=True),
        p.add_argument("--index-b", required=True),
        p.add_argument("--meta-b", required=True),
        p.add_argument("--names", nargs=2, default=["a", "b"]),
        p.add_argument("--position", default="last_prompt"),
        p.add_argument("--debiased", action="store_true"),
        p.add_argument("--table", required=True),
        p.add_argument("--json", required=True, help="seed 001's alignment_results.json"),
    ),
)
def cka(a, log):
    from reasonlab.cka import cka_pair

    cka_pair(a.index_a, a.meta_a, a.index_b, a.meta_b, a.table, a.json, a.position, a.debiased,
             tuple(a.names), "cka")  # fmt: skip


@step(
    "aggregate-activations",
    "probe, direction, lens and CKA tables for the report",
    lambda p: (
        p.add_argument("--jobs", nargs="*", default=[], help="kind/model/ckpt/order/item per job"),
        p.add_argument("--paths", nargs="*", default=[], help="each job's output, aligned"),
        p.add_argument("--out-dir", required=True),
    ),
)
def aggregate_activations(a, log):
    from reasonlab.report import activations as stage

    jobs = [stage.Job(k, m, c, int(o), i, p)
            for (k, m, c, o, i), p in zip(_jobs(a.jobs, 5), a.paths, strict=True)]  # fmt: skip
    stage.aggregate_activations(jobs, _out(stage.TABLES, a.out_dir))


# ----------------------------------------------------------------------------- trace explorer


@step(
    "trace-steps",
    "the steps of a scored text set's traces with their token entropies",
    lambda p: (
        p.add_argument("--tokens", required=True, help="the scorer's token table"),
        p.add_argument("--sequences", required=True, help="the scorer's sequence table"),
        p.add_argument("--labels", required=True, help="the graded generations, or the dataset"),
        p.add_argument("--settings", type=_json, default={}, help="traces.steps + quantile (JSON)"),
        p.add_argument("--out", required=True),
        p.add_argument("--summary", required=True),
    ),
)
def trace_steps(a, log):
    from reasonlab.steps import StepRules, steps_job

    s = dict(a.settings)
    rules = StepRules(**{**s, "hesitation": tuple(s.get("hesitation", StepRules.hesitation))})
    steps_job(a.tokens, a.sequences, a.labels, rules, a.out, a.summary)


@step(
    "embed",
    "sentence embeddings of a checkpoint's traces and their steps",
    lambda p: (
        p.add_argument("--generations", required=True, help="graded generations"),
        p.add_argument("--steps", help="the trace_steps table"),
        p.add_argument("--label", required=True, help="the generating model's name (file names)"),
        p.add_argument("--settings", type=_json, default={}, help="embed: model, what, normalize"),
        p.add_argument("--table", required=True),
        p.add_argument("--npy", required=True),
        p.add_argument("--results", required=True),
        p.add_argument("--batch-size", type=int, default=64, help="texts per batch (speed only)"),
        p.add_argument("--threads", type=int),
        _compute_arguments(p),
    ),
)
def embed(a, log):
    from reasonlab.embed import embed_job

    embed_job(a.generations, a.steps, a.settings.get("model"), a.label, a.settings, a.table,
              a.npy, a.results, _request(a), a.batch_size, a.threads, a.record)  # fmt: skip


@step(
    "trace-map",
    "one joint map, clusters and phrases of a group's traces",
    lambda p: (
        p.add_argument("--group", required=True),
        p.add_argument("--members", type=_json, required=True, help="the group's inputs (JSON)"),
        p.add_argument("--settings", type=_json, default={}, help="traces.map, k, ... (JSON)"),
        p.add_argument("--out-prefix", required=True),
    ),
)
def trace_map(a, log):
    from reasonlab.tracemap import MapOptions, trace_map_job

    s = {k: v for k, v in a.settings.items() if v is not None}
    for k in ("k_range", "ngram_range"):
        if k in s:
            s[k] = tuple(s[k])
    trace_map_job(a.group, a.members, MapOptions(**s), a.out_prefix)


@step(
    "aggregate-traces",
    "every steps job's and map's tables for the report",
    lambda p: (
        p.add_argument("--jobs", nargs="*", default=[], help="kind/a/b/order/name per job"),
        p.add_argument("--paths", nargs="*", default=[], help="each job's output, aligned"),
        p.add_argument("--out-dir", required=True),
    ),
)
def aggregate_traces(a, log):
    from reasonlab.report import traces as stage

    stage.aggregate_traces(a.jobs, a.paths, _out(stage.TABLES, a.out_dir))


# ----------------------------------------------------------------------------- interventions


def _intervene_arguments(p):
    p.add_argument("--handle", required=True)
    p.add_argument("--data", required=True, help="a prepared dataset")
    p.add_argument("--spec", required=True, help="the spec's name (interventions.specs)")
    p.add_argument("--settings", type=_json, default={}, help="the spec and its options (JSON)")
    p.add_argument("--chosen", help="the directions job's chosen.json")
    p.add_argument("--pt", help="the directions job's reasoning_directions.pt")
    p.add_argument("--table", required=True)
    p.add_argument("--settings-table", required=True)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (speed only)")
    p.add_argument("--threads", type=int)
    _compute_arguments(p)


@step(
    "intervene",
    "an intervention spec (steering sweep or ablation) on a dataset under one checkpoint",
    _intervene_arguments,
)
def intervene(a, log):
    from reasonlab.intervene import intervene_job

    intervene_job(a.handle, a.data, a.spec, {**a.settings, "batch_size": a.batch_size}, a.table,
                  a.settings_table, a.chosen, a.pt, a.threads, _request(a), a.record)  # fmt: skip


@step(
    "transfer",
    "a steer spec under one checkpoint with the direction chosen at another (settings: source)",
    _intervene_arguments,
)
def transfer(a, log):
    if not a.settings.get("source") or not a.chosen:
        raise SystemExit("reasonlab transfer: give --chosen/--pt of the source checkpoint and "
                         "its name as settings.source")  # fmt: skip
    intervene(a, log)


@step(
    "patch",
    "activation patching from clean into corrupted prompts at every site under one checkpoint",
    lambda p: (
        p.add_argument("--handle", required=True),
        p.add_argument("--data", required=True, help="a prepared dataset of clean/corrupted pairs"),
        p.add_argument("--settings", type=_json, default={}, help="interventions.patching (JSON)"),
        p.add_argument(
            "--out-prefix", required=True, help="writes PREFIX.{groups,tokens,pairs}.parquet"
        ),
        p.add_argument(
            "--batch-size", type=int, default=64, help="sequences per forward (speed only)"
        ),
        p.add_argument("--threads", type=int),
        _compute_arguments(p),
    ),
)
def patch(a, log):
    from reasonlab.patching import patch_job

    patch_job(a.handle, a.data, a.settings, a.out_prefix, a.batch_size, a.threads, _request(a),
              a.record)  # fmt: skip


@step(
    "aggregate-interventions",
    "every intervention, transfer and patching job's results in tables for the report",
    lambda p: (
        p.add_argument(
            "--jobs",
            nargs="*",
            default=[],
            help="model/ckpt/order/spec/source-model/source-ckpt per job",
        ),
        p.add_argument("--paths", nargs="*", default=[], help="each job's settings table, aligned"),
        p.add_argument(
            "--patch-jobs", nargs="*", default=[], help="model/ckpt/order/dataset per job"
        ),
        p.add_argument(
            "--patch-paths", nargs="*", default=[], help="each job's groups table, aligned"
        ),
        p.add_argument("--out-dir", required=True),
    ),
)
def aggregate_interventions(a, log):
    from reasonlab.report import interventions as stage

    stage.aggregate_interventions(a.jobs, a.paths, _out(stage.TABLES, a.out_dir),
                                  a.patch_jobs, a.patch_paths)  # fmt: skip


# ----------------------------------------------------------------------------- guided inference


@step(
    "guide",
    "a base checkpoint consulting an oracle under one policy, its whole grid (seed 004)",
    lambda p: (
        p.add_argument("--base", required=True, help="the base model's handle"),
        p.add_argument("--oracle", required=True, help="the oracle model's handle"),
        p.add_argument("--data", required=True, help="a prepared dataset"),
        p.add_argument("--policy", required=True, help="never, always, random, entropy, ..."),
        p.add_argument("--settings", type=_json, default={}, help="guided: grid, budgets, ... (JSON)"),
        p.add_argument("--oracle-backend", choices=["local", "server"], default="local"),
        p.add_argument("--server", type=_json, default={},
                       help='the oracle server: {"url": ..., "model": null, "top_logprobs": 20}'),
        p.add_argument("--out-prefix", required=True,
                       help="writes PREFIX.{problems,cells,points}.parquet"),
        p.add_argument("--batch-size", type=int, default=64, help="problems per batch (speed only)"),
        p.add_argument("--threads", type=int),
        _compute_arguments(p),
    ),
)  # fmt: skip
def guide(a, log):
    from reasonlab.guided import guided_job

    pre = a.out_prefix
    if (a.oracle_backend == "server") != bool(a.server):
        raise SystemExit("reasonlab guide: --oracle-backend server needs --server with its url "
                         "(and --server needs --oracle-backend server)")  # fmt: skip
    guided_job(a.base, a.oracle, a.data, a.policy, a.settings, f"{pre}.problems.parquet",
               f"{pre}.cells.parquet", f"{pre}.points.parquet", _request(a), a.threads,
               a.batch_size, a.record, server=a.server or None)  # fmt: skip


@step(
    "guided-view",
    "print a guided job's traces with the oracle's tokens coloured (seed 004's --verbose)",
    lambda p: (
        p.add_argument("--problems", required=True, help="a guide job's .problems.parquet"),
        p.add_argument("--cell", help="the cell (default: every cell)"),
        p.add_argument("--id", help="one problem (default: the first --limit)"),
        p.add_argument("--limit", type=int, default=3),
    ),
)
def guided_view(a, log):
    import polars as pl

    from reasonlab.guided import ansi_view

    df = pl.read_parquet(a.problems)
    if a.cell:
        cells = sorted(set(df["cell"]))
        df = df.filter(pl.col("cell") == a.cell)
        if not df.height:
            raise SystemExit(f"{a.problems}: no cell {a.cell!r} (cells: {cells})")
    if a.id and a.id not in set(df["id"]):
        raise SystemExit(f"{a.problems}: no problem {a.id!r}")
    ids = [a.id] if a.id else df["id"].unique(maintain_order=True).head(a.limit).to_list()
    for r in df.filter(pl.col("id").is_in(ids)).iter_rows(named=True):
        mark = "correct" if r["correct"] else "wrong"
        print(
            f"== {r['cell']} · {r['id']} · answer {r['answer']} ({mark}; reference "
            f"{r['reference']}) · oracle {r['oracle_fraction']:.0%}"
        )
        print(ansi_view(json.loads(r["segments"])))


@step(
    "export-seed003",
    "seed 003's dynamics JSON (steps, results_by_type) of trained models' text sets",
    lambda p: (
        p.add_argument("--by-type", required=True, help="the aggregated score_by_type table"),
        p.add_argument("--checkpoints", required=True, help="the training_checkpoints table"),
        p.add_argument("--pairs", nargs="+", required=True, help="model/textset per output"),
        p.add_argument("--outputs", nargs="+", required=True),
    ),
)
def export_seed003(a, log):
    from reasonlab.export import export_seed003 as export

    export(a.by_type, a.checkpoints, a.pairs, a.outputs)
    log.info("seed 003 dynamics: %s", a.outputs)


@step(
    "export-seed002",
    "seed 002's files of one dataset: token stats and detailed tokens per checkpoint, prompt-level results, summary",
    lambda p: (
        p.add_argument("--names", nargs="*", default=[], help="seed 002's model name per checkpoint"),
        p.add_argument("--tokens", nargs="*", default=[], help="each one's own scored generations (.tokens.parquet)"),
        p.add_argument("--generations", nargs="*", default=[], help="each one's graded generations, aligned"),
        p.add_argument("--handles", nargs="*", default=[], help="each one's handle, aligned"),
        p.add_argument("--max-new-tokens", type=int, help="the generation setting (for the summary)"),
        p.add_argument("--out-dir", required=True),
    ),
)  # fmt: skip
def export_seed002(a, log):
    from reasonlab.export import export_seed002 as export

    summary = export(a.names, a.tokens, a.generations, a.handles, a.max_new_tokens, a.out_dir)
    log.info("seed 002: %d prompts, %s", summary["num_examples_processed"], a.names)


@step(
    "export-seed001-interventions",
    "a steering job's generations as seed 001's intervention_results.json (strength -> texts)",
    lambda p: (
        p.add_argument("--table", required=True, help="an intervene job's .table.parquet"),
        p.add_argument("--settings", required=True, help="its .settings.parquet"),
        p.add_argument("--output", required=True),
    ),
)
def export_seed001_interventions(a, log):
    from reasonlab.export import export_seed001_interventions as export

    counts = export(a.table, a.settings, a.output)
    log.info("seed 001 interventions (texts per strength): %s", counts)


@step(
    "export-seed001-alignment",
    "a CKA pair as seed 001's alignment_results.json (with the directions' cosines)",
    lambda p: (
        p.add_argument("--table", required=True, help="a cka job's table"),
        p.add_argument("--directions", nargs="*", default=[],
                       help="side a's and side b's reasoning_directions.pt (none: no cosines)"),
        p.add_argument("--output", required=True),
    ),
)  # fmt: skip
def export_seed001_alignment(a, log):
    from reasonlab.export import export_seed001_alignment as export

    if a.directions and len(a.directions) != 2:
        raise SystemExit(f"--directions takes both sides' files, not {len(a.directions)}")
    got = export(a.table, a.output, a.directions or None)
    log.info("seed 001 alignment: mean diagonal CKA %s", got["mean_diagonal_cka"])


@step(
    "export-seed004",
    "a guide job's problems as seed 004's JSONL (analysis_result per problem)",
    lambda p: (
        p.add_argument("--problems", required=True, help="a guide job's .problems.parquet"),
        p.add_argument("--output", required=True),
    ),
)
def export_seed004(a, log):
    from reasonlab.guided import export_seed004 as export

    log.info("seed 004 JSONL: %d lines", export(a.problems, a.output))


@step(
    "aggregate-guided",
    "every guided-inference job's cells, consultation points, traces and paired tests",
    lambda p: (
        p.add_argument(
            "--jobs", nargs="*", default=[], help="model/ckpt/model2/ckpt2/dataset/policy"
        ),
        p.add_argument("--paths", nargs="*", default=[], help="each job's cells table, aligned"),
        p.add_argument("--out-dir", required=True),
    ),
)
def aggregate_guided(a, log):
    from reasonlab.report import guided as stage

    stage.aggregate_guided(a.jobs, a.paths, _out(stage.TABLES, a.out_dir))


# ----------------------------------------------------------------------------- training


@step(
    "select-training-data",
    "choose a run's training rows (all, high/low log-likelihood, random)",
    lambda p: (
        p.add_argument("--run", required=True),
        p.add_argument("--data", required=True),
        p.add_argument("--scores", help="the data's sequence scores under the base model"),
        p.add_argument("--select", type=_json, required=True, help="training.<run>.select (JSON)"),
        p.add_argument("--stage", default="sft", help="pt or sft"),
        p.add_argument("--selection", required=True),
        p.add_argument("--data-dir", required=True, help="where the LlamaFactory dataset goes"),
    ),
)
def select_training_data(a, log):
    import polars as pl

    from reasonlab.data import read_dataset
    from reasonlab.training import select_rows, write_llamafactory_dataset

    sel = a.select
    scores = pl.read_parquet(a.scores) if a.scores else None
    rows = select_rows(read_dataset(a.data), scores, sel["keep"], sel.get("n"),
                       sel.get("seed", 0), sel.get("by", "llh_mean"))  # fmt: skip
    rows.write_parquet(a.selection)
    n = write_llamafactory_dataset(rows.filter(pl.col("selected")), a.stage, a.data_dir)
    log.info("run %s: %d rows selected (%s)", a.run, n, sel)


@step(
    "finetune",
    "train one run with llamafactory-cli (train environment)",
    lambda p: (
        p.add_argument("--base", required=True, help="the base model's handle"),
        p.add_argument("--data-dir", required=True),
        p.add_argument("--template", required=True, help="the defaults YAML of every run"),
        p.add_argument("--output-dir", required=True),
        p.add_argument("--yaml", required=True, help="where the run's training YAML is written"),
        p.add_argument("--settings", type=_json, required=True, help="the run's LlamaFactory keys"),
        p.add_argument("--threads", type=int),
    ),
)
def finetune(a, log):
    from reasonlab.models import read_handle
    from reasonlab.training import TrainingError, run_llamafactory, train_config

    _threads(a.threads)
    base = read_handle(a.base)
    if base.is_adapter:
        raise TrainingError(
            f"training from a LoRA adapter ({base.model}/{base.ckpt}) is not supported; merge it first"
        )
    cfg = train_config(a.settings, base.location, a.data_dir, a.output_dir,
                       revision=base.commit, template=a.template)  # fmt: skip
    run_llamafactory(cfg, a.yaml)


@step(
    "aggregate-training",
    "loss curves, run checkpoints and selections of every run",
    lambda p: (
        p.add_argument("--runs", nargs="*", default=[]),
        p.add_argument("--outputs", nargs="*", default=[], help="each run's output directory"),
        p.add_argument("--selections", nargs="*", default=[], help="each run's selection table"),
        p.add_argument("--handles", nargs="*", default=[], help="handles of run checkpoints"),
        p.add_argument("--out-dir", required=True),
    ),
)
def aggregate_training(a, log):
    from reasonlab.report import training as stage

    stage.aggregate_training(
        a.runs, a.outputs, a.selections, a.handles, _out(stage.TABLES, a.out_dir)
    )


# ----------------------------------------------------------------------------- report


@step(
    "aggregate-overview",
    "models, datasets and environments tables for the report",
    lambda p: (
        p.add_argument("--handles", nargs="*", default=[]),
        p.add_argument("--summaries", nargs="*", default=[]),
        p.add_argument("--rejects", nargs="*", default=[]),
        p.add_argument("--environments", nargs="*", default=[]),
        p.add_argument("--compute", nargs="*", default=[], help="model-loading jobs' records"),
        p.add_argument("--out-dir", required=True),
    ),
)
def aggregate_overview(a, log):
    from reasonlab.report import overview as stage

    stage.aggregate_overview(a.handles, a.summaries, a.rejects, a.environments,
                             _out(stage.TABLES, a.out_dir), a.compute)  # fmt: skip


@step(
    "report",
    "build the self-contained HTML report from aggregated tables",
    lambda p: (
        p.add_argument("tables", nargs="*", help="aggregated Parquet files (named by their stem)"),
        p.add_argument("--output", required=True),
        p.add_argument("--title", default="reasonlab report"),
        p.add_argument("--config-hash", default="?"),
        p.add_argument("--checkpoints-shown", type=int, default=5, help="report.checkpoints_shown"),
    ),
)
def report(a, log):
    import reasonlab
    from reasonlab.report.build import build_report

    context = {"title": a.title, "config_hash": a.config_hash, "version": reasonlab.__version__,
               "checkpoints_shown": a.checkpoints_shown}  # fmt: skip
    built = build_report({Path(t).stem: t for t in a.tables}, context, a.output)
    log.info("report sections: %s", built)


@step(
    "figures",
    "every chart of the report as SVG and PNG files under one folder per section (vl-convert)",
    lambda p: (
        p.add_argument("tables", nargs="*", help="aggregated Parquet files (named by their stem)"),
        p.add_argument("--index", required=True, help="the folder's index.json (written last)"),
        p.add_argument("--formats", nargs="+", default=["svg", "png"], choices=["svg", "png"]),
        p.add_argument("--checkpoints-shown", type=int, default=5, help="report.checkpoints_shown"),
    ),
)
def figures(a, log):
    from reasonlab.report.build import export_figures

    context = {"checkpoints_shown": a.checkpoints_shown}
    out = export_figures({Path(t).stem: t for t in a.tables}, context, Path(a.index).parent,
                         tuple(a.formats))  # fmt: skip
    log.info("figures: %d charts of %d sections", len(out), len({e["section"] for e in out}))


# ----------------------------------------------------------------------------- entry point


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reasonlab",
        description="Run one step of the reasonlab workflow (each rule runs one of these).",
    )
    sub = p.add_subparsers(dest="step", metavar="<step>", required=True)
    for name, (help, add, _) in STEPS.items():
        s = sub.add_parser(name, help=help, description=help)
        add(s)
        s.add_argument("--log", help="write all output to this file (errors also to stderr)")
    return p


def main(argv: list[str] | None = None) -> None:
    from reasonlab.logs import job_log

    a = parser().parse_args(argv)
    _, _, fn = STEPS[a.step]
    with job_log(a.log, a.step) as log:
        fn(a, log)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
