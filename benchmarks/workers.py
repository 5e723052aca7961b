"""Side-by-side benchmark plumbing: a worker process per tool, spoken to one line at a time."""

import json
import resource
import subprocess
from pathlib import Path


def rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not carry over the
    launching process's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Worker:
    """A worker process started with `cmd`: it prints one JSON line when ready and one per
    command; `rss` answers its peak RSS. Lines that are not JSON (a library's prints) are skipped."""

    def __init__(self, cmd: list[str], quiet: bool = False):
        self.p = subprocess.Popen(
            [str(c) for c in cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if quiet else None, text=True,
        )  # fmt: skip
        self.ready = self.read()

    def read(self) -> dict:
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(
                    f"benchmark worker {self.p.args[1:4]} ended: run it by hand to see why"
                )
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self) -> dict:
        rss = self.ask("rss")
        self.p.stdin.close()
        self.p.wait()
        return rss
