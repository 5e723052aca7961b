"""The job server (reasonlab.jobserver): a job run through it writes what it writes alone, passes
its exit status, stderr and signals through, and is not used where it could change a result."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reasonlab import jobserver

PY = sys.executable


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("js")
    env = {**os.environ, jobserver.ENV_VAR: str(directory)}
    p = subprocess.Popen([PY, "-m", "reasonlab.jobserver", "--serve", str(directory), "--idle", "300"],
                         env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout.readline().strip() == "ready"
    assert jobserver.socket_path(directory).exists()
    yield directory, env
    p.terminate()
    p.wait(30)
    assert not jobserver.socket_path(directory).exists()


def journal(directory) -> list[dict]:
    path = Path(directory) / "jobserver.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def reasonlab(env, *args, cwd):
    return subprocess.run([PY, "-m", "reasonlab", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def demo_data(env, cwd):
    out = {k: cwd / f"{k}.{'json' if k in ('pool', 'traces') else 'jsonl'}"
           for k in ("pool", "eval", "control", "pretrain", "traces")}  # fmt: skip
    args = ["build-demo-data", "--seed", "3", "--sizes", json.dumps({"pretrain": 50, "eval": 9})]
    for k, v in out.items():
        args += [f"--{k}", v.name]
    r = reasonlab(env, *args, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return {k: v.read_bytes() for k, v in out.items()}


def test_a_job_through_the_server_writes_what_it_writes_alone(server, tmp_path):
    directory, env = server
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    n = len(journal(directory))
    via = demo_data(env, tmp_path / "a")  # relative paths: the job runs in the client's directory
    new = journal(directory)[n:]
    assert [e["argv"][1] for e in new if "pid" in e and "argv" in e] == ["build-demo-data"]
    assert any(e.get("exit") == 0 for e in new)
    alone = demo_data({k: v for k, v in env.items() if k != jobserver.ENV_VAR}, tmp_path / "b")
    assert via == alone
    assert len(journal(directory)) == n + 2  # the run alone never reached the server


def test_exit_status_and_stderr_pass_through(server, tmp_path):
    directory, env = server
    r = reasonlab(env, "score", "--handle", "missing.json", "--texts", "x", "--textset", "y",
                  "--tokens", "a", "--sequences", "b", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 1
    assert "[score] error: missing.json: not a readable model handle" in r.stderr
    assert journal(directory)[-1]["exit"] == 1
    r = reasonlab(env, "no-such-step", cwd=tmp_path)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_not_used_where_it_could_change_a_result(server, tmp_path):
    directory, env = server
    for other in ({**env, "SOME_SETTING": "1"}, {**env, "SLURM_JOB_ID": "7"}):
        n = len(journal(directory))
        (tmp_path / other.get("SLURM_JOB_ID", "x")).mkdir()
        demo_data(other, tmp_path / other.get("SLURM_JOB_ID", "x"))
        new = journal(directory)[n:]
        assert not any("pid" in e for e in new)
        if "SLURM_JOB_ID" in other:
            assert new == []  # a cluster job never asks
        else:
            assert "different environment variables: ['SOME_SETTING']" in new[0]["refused"]
    # per-job thread settings are not a difference: Snakemake sets them for every job
    n = len(journal(directory))
    (tmp_path / "t").mkdir()
    demo_data({**env, "OMP_NUM_THREADS": "2", "TMPDIR": str(tmp_path)}, tmp_path / "t")
    assert any("pid" in e for e in journal(directory)[n:])


def _alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_job_reaches_its_fork(server, sig):
    directory, env = server
    n = len(journal(directory))
    code = ("from reasonlab.jobserver import exit_with, run_via_server; "
            "exit_with(run_via_server(['0', '--bind', '127.0.0.1'], module='http.server'))")  # fmt: skip
    client = subprocess.Popen([PY, "-c", code], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    pid = None
    while pid is None and time.monotonic() < deadline:
        pid = next((e["pid"] for e in journal(directory)[n:] if "argv" in e and "pid" in e), None)
        time.sleep(0.1)
    assert pid and _alive(pid)
    time.sleep(0.5)
    client.send_signal(sig)
    client.wait(30)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
    if sig == signal.SIGTERM:
        assert client.returncode == -signal.SIGTERM  # the fork's status, as the job's own
