"""Helpers of the end-to-end tests: run Snakemake on the real workflow in a working directory."""

import atexit
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import yaml

from reasonlab import jobserver

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
_SERVER: list = []


# A Hugging Face token in every test run's environment, as a researcher's shell has one: it must
# never reach a log, an output or the report (test_workflow checks every file of the demo).
CANARY = {
    "HF_TOKEN": "hf_reasonlabCanaryToken4f8a1c9e",
    "HUGGING_FACE_HUB_TOKEN": "hf_reasonlabCanaryToken4f8a1c9e",
}


def job_env() -> dict:
    """The environment of a test's Snakemake run: with one job server for the whole session (as
    `make demo` runs the demo), started on first use; its jobs run as forks of it."""
    if not _SERVER:
        directory = tempfile.mkdtemp(prefix="reasonlab-test-jobserver-")
        env = {**os.environ, **CANARY, jobserver.ENV_VAR: directory}
        p = subprocess.Popen([sys.executable, "-m", "reasonlab.jobserver", "--serve", directory,
                              "--idle", "1800"], env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
        p.stdout.readline()
        atexit.register(p.terminate)
        _SERVER.append(env)
    return {**os.environ, **CANARY, jobserver.ENV_VAR: _SERVER[0][jobserver.ENV_VAR]}


def snakemake(workdir, *args, check=True, timeout=1200):
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "-c2", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir,
                       env=job_env())  # fmt: skip
    if check and r.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
        )
    return r


def planned(workdir, *args) -> Counter:
    """Rule name -> number of jobs a dry run would execute."""
    r = snakemake(workdir, "-n", *args)
    out = r.stdout + r.stderr
    if "Nothing to be done" in out:
        return Counter()
    table = out.split("Job stats:", 1)[1]
    jobs = Counter()
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            if parts and parts[0] == "total":
                break
            continue
        jobs[parts[0]] = int(parts[1])
    return jobs


def write_config(workdir, cfg, name="config.yaml"):
    path = Path(workdir) / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
