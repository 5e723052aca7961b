"""What clusters do to jobs, done to the demo: `kill -9` of a generation, a scoring and an
activation-capture job mid-run and of Snakemake itself, then the README's command again; a full
disk under the outputs. The end state must equal an uninterrupted run's, nothing lost or
duplicated, and no file left under an output's name that is not whole. (A job cancelled with
`scancel` under SLURM: tests/test_slurm.py.)

The runs here go without the session's job server, as on a cluster: each job is its own
`python -m reasonlab <step>` process, the one that is killed.
"""

import ast
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from e2e import BIN, CANARY, ROOT
from polars.testing import assert_frame_equal

from reasonlab import jobserver

pytestmark = pytest.mark.e2e

GEN = "results/generations/tiny/final/demo-eval.raw.parquet"
TOKENS = "results/scores/tiny/final/demo-eval.tokens.parquet"
SEQUENCES = "results/scores/tiny/final/demo-eval.sequences.parquet"
INDEX = "results/activations/tiny/final/reasoning.index.parquet"


def env() -> dict:
    e = {**os.environ, **CANARY}
    e.pop(jobserver.ENV_VAR, None)
    return e


def command(workdir, *args) -> list[str]:
    return [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "-c2", *args]


def start(workdir, *args) -> subprocess.Popen:
    return subprocess.Popen(command(workdir, *args), cwd=workdir, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def run(workdir, *args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(command(workdir, *args), cwd=workdir, env=env(), text=True,
                       capture_output=True, timeout=900)  # fmt: skip
    if check and r.returncode:
        raise AssertionError(f"snakemake {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}")
    return r


def step_pids(step: str, workdir) -> list[int]:
    """The processes running `python -m reasonlab <step>` in `workdir` (not the shell around them)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in args if a]
        if args[1:4] == ["-m", "reasonlab", step] and Path(cwd) == Path(workdir):
            pids.append(int(d.name))
    return pids


def wait_for(what, timeout=300.0, every=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what.__doc__ or what}")


def whole_or_absent(directory: Path) -> list[str]:
    """Files under `directory` named like an output (not a hidden temporary) that Parquet cannot
    read whole."""
    bad = []
    for p in directory.rglob("*.parquet"):
        if p.name.startswith("."):
            continue
        try:
            pl.read_parquet(p)
        except Exception as e:  # noqa: BLE001 - any failure to read is what this looks for
            bad.append(f"{p}: {e}")
    return bad


def kill_midway(work, target: str, step: str, ready) -> str:
    """Force the job that writes `target`, kill -9 its process once `ready()` (mid-run: the
    output not yet written), let Snakemake see the job fail. Returns Snakemake's output."""
    p = start(work, "--forcerun", target, "--", target)
    try:
        pid = wait_for(lambda: step_pids(step, work))[0]
        wait_for(ready)
        assert not (work / target).exists(), "the job finished before it could be killed"
        os.kill(pid, signal.SIGKILL)
        out, _ = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and "Error in rule" in out, out[-3000:]
    assert not (work / target).exists()  # nothing under the output's name
    assert whole_or_absent(work / "results") == []
    return out


def test_a_generation_job_killed_midway_resumes_from_its_finished_shards(scratch):
    before = pl.read_parquet(scratch / GEN)
    shards = scratch / (GEN + ".shards")

    def a_shard_is_written():
        """the first of the job's shards"""
        return shards.exists() and any(p.suffix == ".parquet" for p in shards.iterdir())

    kill_midway(scratch, GEN, "generate", a_shard_is_written)
    kept = [p for p in shards.iterdir() if p.suffix == ".parquet"]
    assert 1 <= len(kept) < 3  # 150 prompts in shards of 64: the job died before the last
    run(scratch, GEN)  # the README's command, as before
    after = pl.read_parquet(scratch / GEN)
    assert_frame_equal(after, before)  # greedy: the same completions, no prompt lost or twice
    assert after["id"].n_unique() == after.height == before.height
    log = (scratch / "logs/generate/tiny/final/demo-eval.log").read_text()
    last = ast.literal_eval(log.rsplit(" generated ", 1)[1].splitlines()[0])
    assert last["shards_reused"] == len(kept) and last["shards_generated"] == 3 - len(kept)
    assert not shards.exists()  # the shards go once the table is whole


def test_a_scoring_job_killed_midway_is_run_again_whole(scratch):
    tokens, sequences = pl.read_parquet(scratch / TOKENS), pl.read_parquet(scratch / SEQUENCES)
    log = scratch / "logs/score/tiny/final/demo-eval.log"  # (Snakemake empties it at the start)

    def scoring_started():
        """the job's log to say the model is loaded and scoring begins"""
        return log.exists() and "scoring sizes" in log.read_text(errors="replace")

    kill_midway(scratch, TOKENS, "score", scoring_started)
    assert not (scratch / SEQUENCES).exists()  # the job's other output went with it
    run(scratch, TOKENS)
    assert_frame_equal(pl.read_parquet(scratch / TOKENS), tokens)
    assert_frame_equal(pl.read_parquet(scratch / SEQUENCES), sequences)


def test_an_activation_capture_killed_midway_reuses_what_it_stored(scratch):
    from reasonlab.activations import load, read_meta

    meta = read_meta(scratch / INDEX.replace(".index.parquet", ".meta.json"))
    index = pl.read_parquet(scratch / INDEX)
    before = {p: load(index, scratch / meta["store"], p)[0] for p in meta["positions"]}
    shutil.rmtree(scratch / meta["store"])  # nothing stored: the job computes every text
    cfg = yaml.safe_load((scratch / "config.yaml").read_text())
    cfg["activations"]["batch_size"] = 1  # speed only: a shard per text, so it dies midway
    (scratch / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    shards = scratch / meta["store"] / "shards"

    def some_texts_are_stored():
        """a few finished shards in the store"""
        return shards.exists() and len(list(shards.glob("*.json"))) >= 3

    kill_midway(scratch, INDEX, "capture-activations", some_texts_are_stored)
    stored = len(list(shards.glob("*.json")))
    run(scratch, INDEX)
    after_meta = read_meta(scratch / INDEX.replace(".index.parquet", ".meta.json"))
    assert after_meta["reused"] == stored and after_meta["computed"] == 150 - stored
    index = pl.read_parquet(scratch / INDEX)
    assert index.height == 150 and index["id"].n_unique() == 150
    for p, x in before.items():
        assert (load(index, scratch / meta["store"], p)[0] == x).all()


def test_snakemake_killed_midway_the_documented_commands_finish_the_run(scratch):
    """kill -9 of Snakemake (and, as when its node goes, of the job it ran): the README's
    recovery — `snakemake --unlock`, then the same command with `--rerun-incomplete` — ends with
    the same outputs."""
    tokens = pl.read_parquet(scratch / TOKENS)
    p = start(scratch, "--forcerun", TOKENS, "--", TOKENS)
    try:
        job = wait_for(lambda: step_pids("score", scratch))[0]
        os.kill(p.pid, signal.SIGKILL)
        os.kill(job, signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    r = run(scratch, TOKENS, check=False)
    assert r.returncode != 0 and "--unlock" in r.stdout + r.stderr  # the lock Snakemake left
    run(scratch, "--unlock")
    run(scratch, TOKENS, "--rerun-incomplete")
    assert_frame_equal(pl.read_parquet(scratch / TOKENS), tokens)
    assert whole_or_absent(scratch / "results") == []
    assert "Nothing to be done" in run(scratch, TOKENS).stdout + run(scratch, TOKENS).stderr


@pytest.fixture
def small_disk(scratch):
    """A 64 KiB tmpfs mounted over tiny/final's score outputs (root only)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    where = scratch / "results/scores/tiny/final"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield scratch, where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_is_one_clear_error_naming_the_file_and_leaves_no_parquet(small_disk):
    work, where = small_disk
    r = run(work, TOKENS, check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    line = next(x for x in out.splitlines() if "[score] error:" in x)
    assert f"{TOKENS}: no space left on the device" in line and "Free space there" in line
    assert "Traceback" not in out.split("[score] error:", 1)[1].split("\n", 1)[0]
    assert list(where.iterdir()) == []  # no truncated table, no temporary file
