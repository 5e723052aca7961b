"""The demo through `--profile slurm` on a real single-node SLURM cluster (tests/slurm_cluster.py).

Part of the session's finished demo is removed (tiny/final's generation and the scores of demo-eval
under it) and rebuilt on the cluster: the GPU rules must go out as SLURM jobs with a GPU request, and
their tables must equal the local run's. Failures must end the run with a non-zero exit, not a hang.
"""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest
import slurm_cluster
import yaml
from e2e import BIN, ROOT
from polars.testing import assert_frame_equal

pytestmark = pytest.mark.e2e

REBUILT = [
    "results/generations/tiny/final/demo-eval.raw.parquet",
    "results/generations/tiny/final/demo-eval.parquet",
    "results/scores/tiny/final/demo-eval.tokens.parquet",
    "results/scores/tiny/final/demo-eval.sequences.parquet",
    "results/scores/tiny/final/demo-eval@tiny@final.tokens.parquet",
    "results/scores/tiny/final/demo-eval@tiny@final.sequences.parquet",
]
# the aggregates and the report that read them (removed so that the rebuilt tables are needed)
DOWNSTREAM = ["results/aggregate/gen_*", "results/aggregate/score_*", "results/report.html"]
GPU_RULES = {
    "generate",
    "score",
    "finetune",
    "capture_activations",
    "directions",
    "lens",
    "intervene",
    "transfer",
    "patch",
    "embed",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    try:
        env = slurm_cluster.start(d)
    except slurm_cluster.ClusterUnavailable as e:
        if "install" in str(e) and ("needs root" in str(e) or "no apt-get" in str(e)):
            pytest.skip(f"no SLURM cluster here: {e}")
        raise
    yield env
    slurm_cluster.stop(d)


def run(workdir, env, *args, timeout=900):
    """snakemake --profile slurm in `workdir` (statuses checked every few seconds, not 20)."""
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(workdir),
           "--profile", str(ROOT / "slurm"), "--slurm-init-seconds-before-status-checks", "3", *args]  # fmt: skip
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir, env=env
    )


def jobs(env) -> list[dict]:
    """Every job the cluster knows (finished ones stay MinJobAge = 300 s), as scontrol fields."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o"], capture_output=True, text=True, env=env
    ).stdout
    rows = []
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("JobId"):
            rows.append(fields)
    return rows


@pytest.fixture(scope="module")
def on_cluster(demo_run, cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm-work") / "w"
    shutil.copytree(demo_run, work)
    for pattern in REBUILT + DOWNSTREAM:
        for p in work.glob(pattern):
            p.unlink()
    # the test cluster's GPU is a GRES on /dev/null, not a CUDA device: the jobs that get it are told
    # to run on the CPU (a job planned for a GPU that sees none stops with one line saying so). The
    # dtype stays float32, so the local demo's finished jobs stay finished.
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg.setdefault("compute", {})["device"] = "cpu"
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    before = {j["JobId"] for j in jobs(cluster)}
    r = run(work, cluster, "results/report.html")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    new = [j for j in jobs(cluster) if j["JobId"] not in before]
    return work, new, r.stdout + r.stderr


def test_gpu_rules_run_as_slurm_jobs_with_a_gpu(on_cluster):
    work, new, _ = on_cluster
    by_rule = {}
    for j in new:
        rule = re.match(r"rule_(\w+?)_wildcards", j.get("Comment", ""))
        assert rule, j
        by_rule.setdefault(rule.group(1), []).append(j)
    assert {r: len(js) for r, js in by_rule.items()} == {"generate": 1, "grade": 1, "score": 2,
                                                         "trace_steps": 1, "embed": 1, "trace_map": 1}  # fmt: skip
    for rule, js in by_rule.items():
        for j in js:
            assert j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0"
            assert ("gpu:1" in j.get("TresPerJob", "")) == (rule in GPU_RULES), (rule, j)
    # the rule's own log and the SLURM job log are where the profile says
    assert (work / "logs/generate/tiny/final/demo-eval.log").exists()
    assert list((work / "logs/slurm/rule_generate").rglob("*.log"))


def test_results_equal_the_local_run(on_cluster, demo_run):
    work, _, out = on_cluster
    # aggregations and the report are local rules: they never went to the cluster
    assert "localrule report:" in out and "localrule aggregate_scores:" in out
    for path in REBUILT:
        if path.endswith(".raw.parquet"):
            continue
        assert_frame_equal(pl.read_parquet(work / path), pl.read_parquet(demo_run / path))
    assert_frame_equal(
        pl.read_parquet(work / "results/aggregate/score_agreement.parquet"),
        pl.read_parquet(demo_run / "results/aggregate/score_agreement.parquet"),
    )


def test_a_failing_job_fails_the_run(on_cluster, cluster):
    work, _, _ = on_cluster
    (work / "fail.yaml").write_text("score:\n  max_length: 8\n")  # every eval text is longer
    target = "results/scores/tiny/final/demo-eval.tokens.parquet"
    r = run(
        work,
        cluster,
        target,
        "--configfile",
        "config.yaml",
        "fail.yaml",
        "--retries",
        "0",
        timeout=300,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Error in rule score" in out and "FAILED" in out
    log = (work / "logs/score/tiny/final/demo-eval.log").read_text()
    assert "tokens exceed the limit of 8" in log
    assert not (work / target).exists()  # no output left that looks complete


def test_gpu_job_to_a_partition_without_gpus_fails_fast(on_cluster, cluster):
    work, _, _ = on_cluster
    target = "results/scores/tiny/final/demo-pool.tokens.parquet"
    r = run(work, cluster, target, "--forcerun", "score", "--retries", "0",
            "--set-resources", "score:slurm_partition=nogpu", "score:gpu=1", timeout=120)  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "Requested node configuration is not available" in out  # SLURM's own message
    log = sorted((work / ".snakemake/log").glob("*.snakemake.log"))[-1].read_text()
    assert "Requested node configuration is not available" in log


def test_profile_without_sbatch_is_one_clear_error(on_cluster, tmp_path):
    work, _, _ = on_cluster
    shadow = tmp_path / "bin"  # PATH without SLURM's commands
    shadow.mkdir()
    slurm_tools = {"sbatch", "squeue", "sinfo", "sacct", "scontrol", "scancel", "srun", "salloc"}
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
        for f in Path(d).iterdir() if Path(d).is_dir() else []:
            if f.name not in slurm_tools and not (shadow / f.name).exists():
                (shadow / f.name).symlink_to(f)
    env = {**os.environ, "PATH": f"{BIN}:{shadow}"}
    r = run(work, env, "results/scores/tiny/final/demo-pool.tokens.parquet", "--forcerun", "score",
            timeout=120)  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "the SLURM executor (--profile slurm) needs SLURM's commands" in out
    assert "sbatch" in out and "Traceback" not in out


def test_a_cancelled_job_is_retried_and_the_run_ends_correctly(on_cluster, cluster, demo_run):
    """`scancel` of a running job (what pre-emption or an administrator does): the profile's
    `retries` submits it again and the run ends with the same tables."""
    work, _, _ = on_cluster
    target = "results/scores/tiny/final/demo-pool.tokens.parquet"
    before = {j["JobId"] for j in jobs(cluster)}
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(work), "--profile",
           str(ROOT / "slurm"), "--slurm-init-seconds-before-status-checks", "3", "--forcerun",
           target, "--", target]  # fmt: skip
    p = subprocess.Popen(cmd, cwd=work, env=cluster, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            running = [j for j in jobs(cluster) if j["JobId"] not in before
                       and j["JobState"] == "RUNNING"]  # fmt: skip
            if running:
                break
            time.sleep(0.2)
        assert running, "the job never ran"
        subprocess.run(["scancel", running[0]["JobId"]], env=cluster, check=True)
        out, _ = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-4000:]
    mine = [j for j in jobs(cluster) if j["JobId"] not in before]
    states = sorted(j["JobState"] for j in mine)
    assert states == ["CANCELLED", "COMPLETED"], states  # cancelled once, then run again
    assert_frame_equal(pl.read_parquet(work / target), pl.read_parquet(demo_run / target))
