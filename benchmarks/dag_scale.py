"""How Snakemake copes with a large study: 10 models x 20 checkpoints x 3 datasets, generation and
scoring on every checkpoint (about 2,600 jobs).

    .venvs/core/bin/python benchmarks/dag_scale.py [--models 10 --checkpoints 20 --datasets 3]

In a temporary directory it writes such a config (local model directories and small datasets; no
model is loaded: only planning is measured), then times
- `snakemake -n`: parsing the Snakefile plus planning every job (target: < 10 s; median of --runs);
- once every planned output exists (written empty, as `snakemake --summary` lists them): a no-op
  `snakemake -n` and a no-op real run, i.e. Snakemake's bookkeeping over every job with none to run;
and checks with `python -X importtime` that parsing imports no torch, transformers, vLLM or
LlamaFactory. The last line of output is one JSON object: jobs, plan_seconds, noop_plan_seconds,
noop_run_seconds, heavy_imports_at_parse.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from parse_time import heavy_imports  # benchmarks/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
QUESTION = {"problem": "What is 2 + 3?", "solution": "2 + 3 = 5, so \\boxed{5}."}


def write_study(work: Path, n_models: int, n_ckpts: int, n_datasets: int) -> None:
    models = {}
    for m in range(n_models):
        (work / "models" / f"m{m}").mkdir(parents=True)
        models[f"model-{m}"] = {
            "source": f"./models/m{m}",
            "checkpoints": {
                f"step-{100 * (k + 1)}": f"./models/m{m}/checkpoint-{100 * (k + 1)}"
                for k in range(n_ckpts)
            },  # fmt: skip
        }
    datasets = {}
    for d in range(n_datasets):
        path = work / f"data-{d}.jsonl"
        path.write_text("\n".join(json.dumps(QUESTION) for _ in range(4)) + "\n")
        datasets[f"set-{d}"] = {"source": path.name, "format": "math"}
    cfg = {
        "environments": {e: str(ROOT / ".venvs" / e) for e in ("core", "train", "gen")},
        "models": models,
        "datasets": datasets,
        "generation": {"datasets": list(datasets)},
        "score": {"textsets": list(datasets)},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def snakemake(work: Path, *args: str) -> tuple[float, str]:
    cmd = [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "-d", str(work), "-c2", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    seconds = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"snakemake {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return seconds, r.stdout + r.stderr


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", type=int, default=10)
    p.add_argument("--checkpoints", type=int, default=20)
    p.add_argument("--datasets", type=int, default=3)
    p.add_argument("--runs", type=int, default=3, help="plannings timed (the median is reported)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_study(work, args.models, args.checkpoints, args.datasets)
        runs = []
        for _ in range(args.runs):
            plan_s, out = snakemake(work, "-n", "--quiet", "rules")
            runs.append(round(plan_s, 2))
        plan_s = statistics.median(runs)
        total = [line for line in out.splitlines() if line.startswith("total")]
        jobs = int(total[0].split()[1]) if total else 0
        print(f"plan: {jobs} jobs in {', '.join(f'{r:.2f}' for r in runs)} s")
        _, summary = snakemake(work, "--summary")
        outputs = [
            line.split("\t", 1)[0] for line in summary.splitlines() if line.startswith("results/")
        ]
        stamp = time.time()
        for path in outputs:  # every output "done", all with one mtime (newer than the sources)
            (work / path).parent.mkdir(parents=True, exist_ok=True)
            (work / path).touch()
            os.utime(work / path, (stamp, stamp))
        print(f"wrote {len(outputs)} outputs")
        noop_plan_s, out = snakemake(work, "-n")
        assert "Nothing to be done" in out, out[-2000:]
        noop_run_s, out = snakemake(work)
        assert "Nothing to be done" in out, out[-2000:]
        print(f"no-op: plan {noop_plan_s:.2f} s, run {noop_run_s:.2f} s")
        heavy = heavy_imports(work)
    print(json.dumps({"models": args.models, "checkpoints": args.checkpoints, "datasets": args.datasets,
                      "jobs": jobs, "plan_seconds": round(plan_s, 2), "plan_runs": runs,
                      "noop_plan_seconds": round(noop_plan_s, 2), "noop_run_seconds": round(noop_run_s, 2),
                      "heavy_imports_at_parse": heavy}))  # fmt: skip


if __name__ == "__main__":
    main()
