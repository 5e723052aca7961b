"""A study at cluster scale from one finished demo: every stage's real aggregation over per-job
outputs of N models x C checkpoints x D datasets, and the report built from them.

The per-job outputs are the demo's own (the model `tiny`'s jobs, whose checkpoints cover every
stage): each synthetic job names a synthetic model, checkpoint and dataset, and reads the demo
file of its template job (checkpoint j of C reads the demo checkpoint at the same place in its
run). Where a stage reads labels from the file rather than from its job, the file is written
again with the labels replaced. Used by tests/test_report_scale.py and benchmarks/report_scale.py.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

TEMPLATE_MODEL = "tiny"
TEMPLATE_DATASET = "demo-eval"


def names(models: int, ckpts: int, datasets: int):
    return (
        [f"model-{i:02d}" for i in range(models)],
        [f"step-{100 * (j + 1)}" for j in range(ckpts - 1)] + ["final"],
        [f"set-{chr(97 + k)}" for k in range(datasets)],
    )


def _relabel(src: Path, dest: Path, mapping: dict[str, str]) -> Path:
    """`src` (a Parquet table) with every string cell that `mapping` names replaced."""
    import polars as pl

    df = pl.read_parquet(src)
    df = df.with_columns(pl.col(c).replace(mapping) for c, t in df.schema.items() if t == pl.String)
    dest.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(dest)
    return dest


VARIANTS = 16  # varied copies of each demo file: far enough apart that gzip's 32 KB window
# cannot find one job's numbers again in the next job's (real jobs' numbers differ)


def _vary(src: Path, dest_dir: Path, seed: int) -> Path:
    """A copy of `src` and the files beside it that share its stem (a job's other outputs), each
    table's float columns multiplied by 1 + 2 % noise (seeded); returns the copy of `src`."""
    import polars as pl

    stem = src.name.split(".")[0]
    dest_dir.mkdir(parents=True, exist_ok=True)
    for f in src.parent.iterdir():
        if not f.is_file() or f.name.split(".")[0] != stem or (dest_dir / f.name).exists():
            continue
        if f.suffix != ".parquet":
            shutil.copy(f, dest_dir / f.name)
            continue
        _jitter(pl.read_parquet(f), seed).write_parquet(dest_dir / f.name)
    return dest_dir / src.name


def _jitter(df, seed: int):
    """`df` with its float columns multiplied by 1 + 2 % noise (seeded)."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    return df.with_columns(
        pl.col(c) * pl.Series(1 + 0.02 * rng.standard_normal(df.height))
        for c, t in df.schema.items() if t in (pl.Float64, pl.Float32)
    )  # fmt: skip


def build(results: str | Path, out: str | Path, models: int = 10, ckpts: int = 20,
          datasets: int = 3) -> dict[str, Path]:  # fmt: skip
    """Aggregate a study of `models` x `ckpts` x `datasets` from the demo's `results` directory
    into `out`; returns the aggregated tables (name -> path) that `build_report` reads."""
    import polars as pl

    from reasonlab.config import load
    from reasonlab.plan import Plan
    from reasonlab.report import (
        activations,
        generate,
        guided,
        interventions,
        overview,
        score,
        traces,
        training,
    )

    results, out = Path(results).resolve(), Path(out)
    root = results.parent
    plan = Plan(load(root / "config.yaml"))
    ms, cs, ds = names(models, ckpts, datasets)
    demo_ckpts = [
        w.split("/")[1] for w in plan.gen_job_args() if w.startswith(TEMPLATE_MODEL + "/")
    ]
    tables: dict[str, Path] = {}
    count = itertools.count()

    def at(path, job: int | None = None) -> Path:
        """The demo's file, or with `job` one of its varied copies."""
        if job is None or (root / path).is_dir():
            return root / path
        v = job % VARIANTS
        return _vary(root / path, out / "jobs" / f"v{v}" / Path(path).parent, seed=v)

    def template(j: int) -> str:  # the demo checkpoint at checkpoint j's place in its run
        return demo_ckpts[round(j * (len(demo_ckpts) - 1) / max(ckpts - 1, 1))]

    def outs(stage) -> dict[str, Path]:
        d = {t: out / "aggregate" / f"{t}.parquet" for t in stage.TABLES}
        tables.update(d)
        return d

    def each(words, paths):
        """(model, ckpt, order, dataset, demo word, demo path) of every synthetic job of the
        template model's jobs; a word's dataset part is replicated over the data sets."""
        for m in ms:
            for j, c in enumerate(cs):
                src = template(j)
                for w, p in zip(words, paths, strict=True):
                    parts = w.split("/")
                    if parts[0] != TEMPLATE_MODEL or parts[1] != src:
                        continue
                    for d in ds if TEMPLATE_DATASET in w else ds[:1]:
                        yield m, c, j, d, w, at(p, next(count))

    # generation
    jobs = []
    for m, c, j, d, _w, p in each(plan.gen_job_args(), plan.gen_outputs()):
        jobs.append(generate.GenJob(m, c, j, d, p))
    generate.aggregate_generations(jobs, outs(generate))

    # scoring (tokens and sequences of the same job)
    jobs = []
    for m, c, j, d, w, p in each(plan.score_job_args(), plan.score_outputs("tokens")):
        text = w.split("/")[3]
        if "@" in text:
            text = f"{d}@{m}@{c}"
        elif text == TEMPLATE_DATASET:
            text = d
        seq = Path(str(p).replace(".tokens.parquet", ".sequences.parquet"))
        jobs.append(score.ScoreJob(m, c, j, text, p, seq))
    score.aggregate_scores(jobs, outs(score), sample_prompts=4, extremes=5)

    # activations: probes, directions, lens, CKA (with the next checkpoint)
    words, paths = plan.activation_jobs()
    jobs = []
    for m in ms:
        for j, c in enumerate(cs):
            src = template(j)
            for w, p in zip(words, paths, strict=True):
                kind, model, ckpt, _, item = w.split("/")
                if model != TEMPLATE_MODEL or ckpt != src:
                    continue
                if kind == "cka":
                    if j + 1 == len(cs):
                        continue
                    item = f"{m}:{cs[j + 1]}"
                for d in ds if item == TEMPLATE_DATASET else [item]:
                    jobs.append(activations.Job(kind, m, c, j, d, at(p, next(count))))
    activations.aggregate_activations(jobs, outs(activations))

    # the trace explorer: steps per checkpoint and data set, one map per model and data set
    words, paths = plan.trace_jobs_arg()
    tw, tp = [], []
    for w, p in zip(words, paths, strict=True):
        kind, a, b, _, name = w.split("/")
        if kind == "map" and a == TEMPLATE_MODEL:  # the points table names its group
            prefix = str(at(p))[: -len(".points.parquet")]
            points = pl.read_parquet(f"{prefix}.points.parquet")
            for m in ms:
                for d in ds:
                    dest = out / "jobs" / "traces" / m / d
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    pl.concat(
                        _jitter(points.filter(pl.col("ckpt") == template(j)), next(count))
                        .with_columns(group=pl.lit(m), model=pl.lit(m), ckpt=pl.lit(c),
                                      ckpt_order=pl.lit(j, points.schema["ckpt_order"]))
                        for j, c in enumerate(cs)
                    ).write_parquet(f"{dest}.points.parquet")  # fmt: skip
                    for part in ("phrases", "clusters"):
                        _relabel(Path(f"{prefix}.{part}.parquet"), Path(f"{dest}.{part}.parquet"),
                                 {a: m, **{c: cs[-1] for c in demo_ckpts}})  # fmt: skip
                    shutil.copy(f"{prefix}.json", f"{dest}.json")
                    tw.append(f"map/{m}/-/0/{d}")
                    tp.append(Path(f"{dest}.points.parquet"))
    for m in ms:
        for j, c in enumerate(cs):
            src = template(j)
            for w, p in zip(words, paths, strict=True):
                kind, a, b, _, name = w.split("/")
                if kind == "steps" and a == TEMPLATE_MODEL and b == src:
                    for d in ds:
                        tw.append(f"steps/{m}/{c}/{j}/{d}@{m}@{c}")
                        tp.append(at(p, next(count)))
    traces.aggregate_traces(tw, tp, outs(traces))

    # interventions (each checkpoint's own directions) and patching
    words, paths = plan.intervene_jobs_arg()
    iw, ip = [], []
    for m in ms:
        for j, c in enumerate(cs):
            src = template(j)
            for w, p in zip(words, paths, strict=True):
                model, ckpt, _, spec, smodel, sckpt = w.split("/")
                if (model, ckpt) == (TEMPLATE_MODEL, src) and (smodel, sckpt) == (model, ckpt):
                    iw.append(f"{m}/{c}/{j}/{spec}/{m}/{c}")
                    ip.append(at(p, next(count)))
    pw, pp = [], []
    words, paths = plan.patch_jobs_arg()
    for m in ms:
        for j, c in enumerate(cs):
            for w, p in zip(words, paths, strict=True):
                model, ckpt, _, d = w.split("/")
                if (model, ckpt) == (TEMPLATE_MODEL, template(j)):
                    pw.append(f"{m}/{c}/{j}/{d}")
                    pp.append(at(p, next(count)))
    interventions.aggregate_interventions(iw, ip, outs(interventions), pw, pp)

    # guided inference: each model's first checkpoint guided by its last, on every data set;
    # the cells, problems and points tables carry the pair's names, so they are written again
    words, paths = plan.guided_jobs_arg()
    gw, gp = [], []
    for w, p in zip(words, paths, strict=True):
        base, bckpt, oracle, ockpt, _, policy = w.split("/")
        prefix = str(at(p))[: -len(".cells.parquet")]
        for m in ms:
            mapping = {base: m, bckpt: cs[0], ockpt: cs[-1]}
            for d in ds:
                dest = out / "jobs" / "guided" / m / d / policy
                for part in ("cells", "problems", "points"):
                    _relabel(
                        Path(f"{prefix}.{part}.parquet"), Path(f"{dest}.{part}.parquet"), mapping
                    )
                gw.append(f"{m}/{cs[0]}/{m}/{cs[-1]}/{d}/{policy}")
                gp.append(Path(f"{dest}.cells.parquet"))
    guided.aggregate_guided(gw, gp, outs(guided))

    # training: one run per model, its checkpoints' handles inside its output directory
    run_of = dict(zip(plan.runs(), [plan.run_output(r) for r in plan.runs()], strict=True))
    demo_out = at(run_of["tiny-pt"])
    runs, outputs, selections, handles = [], [], [], []
    demo_handle = json.loads(at(f"results/models/{TEMPLATE_MODEL}/final.json").read_text())
    for m in ms:
        run_dir = out / "jobs" / "training" / m
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_out / "trainer_state.json", run_dir / "trainer_state.json")
        runs.append(f"run-{m}")
        outputs.append(run_dir)
        selections.append(at(f"results/training/{next(iter(run_of))}/selection.parquet"))
        for c in cs:
            h = {**demo_handle, "model": m, "ckpt": c,
                 "path": str(run_dir if c == "final" else run_dir / f"checkpoint-{c[5:]}")}  # fmt: skip
            path = out / "jobs" / "models" / m / f"{c}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(h))
            handles.append(path)
    training.aggregate_training(runs, outputs, selections, handles, outs(training))

    # the overview: every handle, the demo's data sets and environments
    summaries = [at(f"results/data/{d}.summary.json") for d in plan.datasets]
    rejects = [at(f"results/data/{d}.rejects.jsonl") for d in plan.datasets]
    envs = sorted(at("results/envs").glob("*.json"))
    overview.aggregate_overview(handles, summaries, rejects, envs, outs(overview))
    return tables
