"""A real single-node SLURM cluster on this machine, for the tests.

    python tests/slurm_cluster.py start DIR    # install if missing, configure, start, wait until idle
    python tests/slurm_cluster.py stop DIR     # stop the daemons by their pid files
    python tests/slurm_cluster.py status DIR

It installs Debian's SLURM and munge packages when they are missing (needs root and apt), writes a
configuration under DIR for one node on 127.0.0.1 with two CPUs and one fake GPU (a GRES backed by
/dev/null), starts munged, slurmctld and slurmd, and waits until the node is idle. Partitions:
`main` (default, the GPU node) and `nogpu` (a node without GPUs, DOWN, with no daemon behind its
port: a GPU job sent there is refused at submission, any other job would wait). No accounting daemon: `sacct` does not work, as on many small
clusters; `MinJobAge=300` keeps finished jobs visible to `squeue`.

Clients find the cluster through the environment `env(DIR)` returns (SLURM_CONF).
The daemons are stopped by their pid files, never by name.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODE = "rl-gpu"


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed or started here (the reason says why)."""


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def install() -> None:
    """Install the Debian packages that are missing."""
    if all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("SLURM is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        raise ClusterUnavailable("SLURM is not installed and installing it needs root")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = _run(cmd, env=env)
    if r.returncode:  # stale package lists: refresh once
        _run(["apt-get", "update"], env=env)
        r = _run(cmd, env=env)
    if r.returncode:
        raise ClusterUnavailable(
            f"apt-get install {' '.join(PACKAGES)} failed: {r.stderr.strip()[-500:]}"
        )


def env(d: str | Path) -> dict:
    """The environment a SLURM client (sbatch, squeue, snakemake) needs to reach the cluster."""
    return {**os.environ, "SLURM_CONF": str(Path(d).resolve() / "slurm.conf")}


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 1024
    return 4000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configure(d: Path) -> None:
    """Write slurm.conf and gres.conf under `d` (ports chosen free, so clusters never collide)."""
    d.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    (d / "ctld.port").write_text(str(port))
    for sub in ("state", "spool"):
        (d / sub).mkdir(exist_ok=True)
    cpus = min(os.cpu_count() or 1, 2)
    (d / "slurm.conf").write_text(
        f"""ClusterName=reasonlab-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={port}
SlurmctldParameters=enable_configless
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
GresTypes=gpu
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_memory_mb()} Gres=gpu:1 State=UNKNOWN
NodeName=rl-nogpu NodeAddr=127.0.0.1 Port={_free_port()} CPUs={cpus} RealMemory={_memory_mb()} State=DOWN Reason=no_daemon
PartitionName=main Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
PartitionName=nogpu Nodes=rl-nogpu MaxTime=INFINITE State=UP
"""
    )
    (d / "gres.conf").write_text(f"NodeName={NODE} Name=gpu File=/dev/null\n")


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


MUNGE_PID = Path("/run/munge/munged.pid")


def _start_munge() -> None:
    if _pid(MUNGE_PID):
        return
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    r = _run(["runuser", "-u", "munge", "--", "munged"])
    if r.returncode:
        raise ClusterUnavailable(f"munged did not start: {r.stderr.strip()}")


def start(d: str | Path, timeout: float = 60) -> dict:
    """Install (when missing), configure and start the cluster; return the client environment."""
    d = Path(d).resolve()
    install()
    if not _pid(d / "slurmctld.pid"):
        configure(d)
    _start_munge()
    e = env(d)
    if not _pid(d / "slurmctld.pid"):
        r = _run(["slurmctld", "-f", str(d / "slurm.conf")], env=e)
        if r.returncode:
            raise ClusterUnavailable(
                f"slurmctld did not start: {r.stderr.strip()} (see {d}/slurmctld.log)"
            )
    if not _pid(d / "slurmd.pid"):
        # configless: slurmd fetches the configuration from slurmctld and caches it where client
        # commands inside jobs find it (snakemake's jobstep plugin drops SLURM_CONF for its srun)
        server = f"127.0.0.1:{(d / 'ctld.port').read_text().strip()}"
        r = _run(["slurmd", "--conf-server", server, "-N", NODE], env=e)
        if r.returncode:
            raise ClusterUnavailable(
                f"slurmd did not start: {r.stderr.strip()} (see {d}/slurmd.log)"
            )
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        r = _run(["sinfo", "-h", "-n", NODE, "-o", "%t"], env=e)
        state = r.stdout.strip()
        if state == "idle":
            return e
        time.sleep(0.5)
    raise ClusterUnavailable(
        f"node {NODE} is {state or 'unknown'!r}, not idle, after {timeout:.0f} s (see {d})"
    )


CONFIGLESS_LINK = Path("/run/slurm/conf")  # where slurmd links its cached configuration


def stop(d: str | Path) -> None:
    """Stop slurmd and slurmctld by their pid files and wait until they are gone (munged stays).

    slurmd's link to its cached configuration is removed too: left behind, it sends every SLURM
    command (and snakemake's SLURM plugin, when it loads) to a controller that is gone, each
    waiting about 9 s for it.
    """
    d = Path(d).resolve()
    for name in ("slurmd", "slurmctld"):
        pid = _pid(d / f"{name}.pid")
        if pid is None:
            continue
        os.kill(pid, 15)
        for _ in range(100):
            if _pid(d / f"{name}.pid") != pid:
                break
            time.sleep(0.1)
    if CONFIGLESS_LINK.is_symlink() and str(os.readlink(CONFIGLESS_LINK)).startswith(str(d)):
        CONFIGLESS_LINK.unlink()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop", "status"):
        print(__doc__.strip().splitlines()[0], "\nusage: slurm_cluster.py start|stop|status DIR")
        return 2
    what, d = argv
    try:
        if what == "start":
            start(d)
            print(f"SLURM cluster up; export SLURM_CONF={Path(d).resolve() / 'slurm.conf'}")
        elif what == "stop":
            stop(d)
        else:
            print(_run(["sinfo"], env=env(d)).stdout, end="")
    except ClusterUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
