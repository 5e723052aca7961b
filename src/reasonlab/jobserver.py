"""A fork server for local runs: import torch and transformers once, fork a process per job.

A job of the workflow is `<env>/bin/python -m reasonlab <step> ...`; on a laptop or a CI machine
most of a small job's time is Python importing torch and transformers (about 5 s of a 7 s scoring
job on the demo). `python -m reasonlab.jobserver -- <command>` (what `make demo` and the tests
use) starts a server that imports them once, runs `<command>` (Snakemake) with
`REASONLAB_JOBSERVER` set, and stops the server when the command ends. A job started while it runs
hands its command line, working directory, environment and its stdin/stdout/stderr to the server,
which forks a child that runs the step exactly as `python -m reasonlab` would and reports its
exit status; a signal to the job is passed to the child. The child is a separate process with its
own memory, as before; only the import time is saved.

The server is used only where it cannot change a result: the same interpreter (another tool
environment's Python runs its steps itself), the same environment variables except the ones
Snakemake sets per job (thread counts and temporary directories, applied in the child), no
`SLURM_JOB_ID` (a cluster job runs in its own allocation), and unchanged `reasonlab` sources since
the server started. Otherwise — or when no server answers — the job runs in its own process, as
without the server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path

ENV_VAR = "REASONLAB_JOBSERVER"
# set by Snakemake per job (threads) or harmlessly different; applied in the child
PER_JOB = {
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
    "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "TMPDIR", "TMP", "TEMP", "TEMPDIR",
    "SHLVL", "_", "PWD", "OLDPWD",
}  # fmt: skip
THREAD_VARS = [v for v in PER_JOB if v.endswith("_THREADS")]
# Only modules that start no thread when imported: a fork keeps only the forking thread, so a
# library whose import starts a thread pool (polars, pyarrow, scikit-learn's BLAS) would be broken
# in the child; the server checks that it is still one thread after preloading.
PRELOAD = [
    "numpy", "torch", "transformers", "transformers.modeling_utils",
    "transformers.models.qwen2.modeling_qwen2", "transformers.models.llama.modeling_llama",
    "safetensors.torch", "tqdm", "yaml", "reasonlab.cli", "reasonlab.logs", "reasonlab.models",
    "reasonlab.compute", "reasonlab.score", "reasonlab.activations", "reasonlab.directions",
    "reasonlab.probes", "reasonlab.lens", "reasonlab.cka", "reasonlab.generate",
    "reasonlab.grading", "reasonlab.intervene", "reasonlab.patching", "reasonlab.guided",
]  # fmt: skip


def native_threads() -> int:
    """This process's threads (Linux; 1 where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def interpreter() -> str:
    """This interpreter's environment, resolved (a venv reached through a symlink is the same)."""
    return os.path.realpath(sys.prefix)


def socket_path(directory: str | os.PathLike, prefix: str | None = None) -> Path:
    """The server socket of an environment in `directory` (one server per tool environment)."""
    key = prefix or interpreter()
    return Path(directory) / f"{hashlib.sha256(key.encode()).hexdigest()[:12]}.sock"


def source_fingerprint() -> str:
    """The reasonlab package's files and their modification times: a server whose code changed
    since it started refuses jobs (they then run in their own process, on the new code)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        st = p.stat()
        h.update(f"{p}:{st.st_mtime_ns}:{st.st_size}\n".encode())
    return h.hexdigest()


def _comparable(env: dict) -> dict:
    return {k: v for k, v in env.items() if k not in PER_JOB}


def _send(conn: socket.socket, obj: dict) -> None:
    with contextlib.suppress(OSError):
        conn.sendall((json.dumps(obj) + "\n").encode())


# ------------------------------------------------------------------------------ client


def run_via_server(argv: list[str], module: str = "reasonlab") -> int | None:
    """Run `python -m <module> <argv>` in the server's fork; its exit status, or None when no
    server can run it (the caller then runs it in this process)."""
    directory = os.environ.get(ENV_VAR)
    if not directory or "SLURM_JOB_ID" in os.environ:
        return None
    path = socket_path(directory)
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        request = {"module": module, "argv": [module, *argv], "cwd": os.getcwd(),
                   "env": dict(os.environ), "interpreter": interpreter()}  # fmt: skip
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
        reader = conn.makefile("r")
        first = json.loads(reader.readline() or "{}")
    except (OSError, ValueError):
        conn.close()
        return None
    if "pid" not in first:
        if os.environ.get("REASONLAB_JOBSERVER_DEBUG"):
            print(f"[jobserver] not used: {first.get('refused', 'no answer')}", file=sys.stderr)
        conn.close()
        return None

    def forward(signum, frame):
        with contextlib.suppress(OSError):
            conn.sendall(f"{signum}\n".encode())

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    while True:
        try:
            line = reader.readline()
            break
        except InterruptedError:  # pragma: no cover - retried by Python since PEP 475
            continue
    try:
        return int(json.loads(line)["exit"])
    except (ValueError, KeyError):
        print("[reasonlab] the job server went away while running this job", file=sys.stderr)
        return 1


def exit_with(code: int):
    """Exit as the fork did: with its status, or killed by the same signal."""
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(5)  # pragma: no cover - the signal ends the process
    sys.exit(code)


# ------------------------------------------------------------------------------ server


def _child(conn, srv, others, fds, request) -> None:
    """In the forked child: become the job (its stdio, directory, environment) and run it."""
    code = 1
    try:
        os.setpgid(0, 0)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(s, signal.SIG_DFL)
        srv.close()
        for c in others:
            c.close()
        conn.close()
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.pop(ENV_VAR, None)  # the job's own `python -m reasonlab` children run themselves
        sys.argv = list(request["argv"])
        import random
        import tempfile

        tempfile.tempdir = None
        random.seed()
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and threads.isdigit():
            import torch
            from threadpoolctl import threadpool_limits

            torch.set_num_threads(int(threads))
            threadpool_limits(int(threads))
        if request.get("module", "reasonlab") == "reasonlab":
            from reasonlab.cli import main

            main(request["argv"][1:])
        else:
            import runpy

            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if isinstance(e.code, int):
            code = e.code
        elif e.code is None:
            code = 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def serve(directory: str | os.PathLike, idle_s: float = 3600.0, ready=None) -> None:
    """Preload, listen on this interpreter's socket in `directory`, fork a child per job; stop
    after `idle_s` without jobs, or on SIGTERM (its running children are terminated)."""
    import importlib

    base_env, fingerprint = _comparable(os.environ), source_fingerprint()
    for v in THREAD_VARS:  # libraries read these once, at load: one thread until a job sets its own
        os.environ[v] = "1"
    # a CUDA check that does not initialise CUDA: a child of a process with CUDA initialised
    # cannot use the GPU, so the server must never touch it (checked below)
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    before = dict(os.environ)
    for mod in PRELOAD:
        try:
            importlib.import_module(mod)
        except Exception as e:  # a module this environment lacks: its jobs import it themselves
            print(f"[jobserver] preload {mod}: {type(e).__name__}: {e}", file=sys.stderr)
    # variables the imports set for themselves (a fresh process would set them too)
    added = {k: v for k, v in os.environ.items() if before.get(k) != v and k not in PER_JOB}
    torch = sys.modules.get("torch")
    cuda = bool(torch is not None and torch.cuda.is_initialized())
    if native_threads() != 1 or cuda:
        why = "CUDA is initialised" if cuda else f"{native_threads()} threads after preloading"
        print(f"[jobserver] {why}: forking is unsafe; not serving (every job imports its own "
              "libraries)", file=sys.stderr)  # fmt: skip
        if ready:
            ready()
        return
    path = socket_path(directory)
    path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(64)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *a: stopping.append(1))
    children: dict[int, socket.socket] = {}
    by_conn: dict[socket.socket, int] = {}
    journal = (Path(directory) / "jobserver.log").open("a", buffering=1)
    last = time.monotonic()
    if ready:
        ready()
    try:
        while not stopping:
            try:
                readable, _, _ = select.select([srv, *by_conn], [], [], 0.2)
            except InterruptedError:  # pragma: no cover
                continue
            for s in readable:
                if s is srv:
                    conn, _ = srv.accept()
                    _accept(conn, srv, children, by_conn, base_env, fingerprint, added, journal)
                    last = time.monotonic()
                    continue
                try:
                    data = s.recv(64)
                except OSError:
                    data = b""
                pid = by_conn.get(s)
                sig = int(data.split(b"\n")[0]) if data.strip().isdigit() else signal.SIGTERM
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, sig)
                if not data:  # the job's process is gone: nobody waits for this child
                    by_conn.pop(s, None)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = children.pop(pid, None)
                code = os.waitstatus_to_exitcode(status)
                journal.write(json.dumps({"pid": pid, "exit": code}) + "\n")
                if conn is not None:
                    by_conn.pop(conn, None)
                    _send(conn, {"exit": code})
                    conn.close()
                last = time.monotonic()
            if not children and time.monotonic() - last > idle_s:
                break
    finally:
        srv.close()
        journal.close()
        path.unlink(missing_ok=True)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)


def _accept(conn, srv, children, by_conn, base_env, fingerprint, added, journal) -> None:
    try:
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 22, 3)
        request = json.loads(msg.decode())
    except (OSError, ValueError) as e:
        _send(conn, {"refused": f"bad request: {e}"})
        conn.close()
        return
    reason = None
    if len(fds) != 3:
        reason = "no stdin/stdout/stderr received"
    elif request.get("interpreter") != interpreter():
        reason = "another environment's interpreter"
    elif _comparable(request.get("env", {})) != base_env:
        diff = sorted(set(_comparable(request["env"]).items()) ^ set(base_env.items()))
        reason = f"different environment variables: {sorted({k for k, _ in diff})[:5]}"
    elif source_fingerprint() != fingerprint:
        reason = "reasonlab's sources changed since the server started"
    if reason:
        journal.write(json.dumps({"argv": request.get("argv", [])[:2], "refused": reason}) + "\n")
        _send(conn, {"refused": reason})
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:
        _child(conn, srv, list(by_conn), fds, {**request, "env": {**request["env"], **added}})
    for fd in fds:
        os.close(fd)
    children[pid] = conn
    by_conn[conn] = pid
    journal.write(json.dumps({"argv": request["argv"][:2], "pid": pid}) + "\n")
    _send(conn, {"pid": pid})


# ------------------------------------------------------------------------------ wrapper


def main(argv: list[str] | None = None) -> int:
    """`python -m reasonlab.jobserver [--idle S] -- <command ...>`: run the command with a job
    server for this interpreter; the command's exit status. `--serve DIR` runs the server alone."""
    import argparse
    import shutil
    import subprocess
    import tempfile

    p = argparse.ArgumentParser(
        prog="python -m reasonlab.jobserver", description=__doc__.splitlines()[0]
    )
    p.add_argument("--serve", metavar="DIR", help="run the server in DIR (until idle or SIGTERM)")
    p.add_argument("--idle", type=float, default=3600.0, help="stop after this many idle seconds")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run with it")
    a = p.parse_args(argv)
    if a.serve:
        serve(a.serve, a.idle, ready=lambda: print("ready", flush=True))
        return 0
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give the command to run after --")
    directory = tempfile.mkdtemp(prefix="reasonlab-jobserver-")
    env = {**os.environ, ENV_VAR: directory}
    server = subprocess.Popen([sys.executable, "-m", "reasonlab.jobserver", "--serve", directory,
                               "--idle", str(a.idle)], env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
    ready = select.select([server.stdout], [], [], 120)[0] and server.stdout.readline().strip()
    if ready != "ready":
        print("[reasonlab] the job server did not start; every job imports its own libraries",
              file=sys.stderr)  # fmt: skip
        env.pop(ENV_VAR)
    try:
        return subprocess.call(cmd, env=env)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
