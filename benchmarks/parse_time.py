"""How long Snakemake takes to parse the workflow and plan the demo (`snakemake -n`), and whether
parsing imports torch or transformers (it must not: every SLURM job re-parses the Snakefile).

    .venvs/core/bin/python benchmarks/parse_time.py [--runs 3]

Plans in a fresh temporary directory (so every job of the demo is planned) and prints one JSON
object as its last line: plan_seconds (median), runs, jobs, heavy_imports_at_parse.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def plan(workdir: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = subprocess.run([str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "-n"],
                       capture_output=True, text=True, cwd=workdir, check=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    total = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("total")]
    return seconds, int(total[0].split()[1]) if total else 0


def heavy_imports(workdir: Path) -> list[str]:
    """Top-level packages among torch/transformers/vllm imported while parsing and planning."""
    r = subprocess.run([sys.executable, "-X", "importtime", str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"),
                        "-d", str(workdir), "-n"], capture_output=True, text=True, cwd=workdir)  # fmt: skip
    names = {
        line.rsplit("|", 1)[-1].strip()
        for line in r.stderr.splitlines()
        if line.startswith("import time:")
    }
    return sorted(n for n in names if n in ("torch", "transformers", "vllm", "llamafactory"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copy(ROOT / "config.yaml", work / "config.yaml")
        results = [plan(work) for _ in range(args.runs)]
        heavy = heavy_imports(work)
    times = [round(s, 3) for s, _ in results]
    for s in times:
        print(f"snakemake -n: {s:.2f} s")
    print(json.dumps({"plan_seconds": statistics.median(times), "runs": times, "jobs": results[0][1],
                      "heavy_imports_at_parse": heavy}))  # fmt: skip


if __name__ == "__main__":
    main()
