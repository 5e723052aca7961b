"""Logging for workflow steps: everything a step prints goes to its log file, and a user error
(`ReasonlabError`) ends the step with its one-line message in the log and on the terminal's
stderr, not a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path

from reasonlab import ReasonlabError

log = logging.getLogger("reasonlab")
FORMAT = "%(asctime)s %(levelname)s %(message)s"


@contextlib.contextmanager
def _fds_to(f):
    """Point file descriptors 1 and 2 at `f` (so child processes and native code write to it too)."""
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        yield
    finally:
        f.flush()
        for fd, old in zip((1, 2), saved, strict=True):
            os.dup2(old, fd)
            os.close(old)


@contextlib.contextmanager
def job_log(path: str | Path | None, job: str = "job"):
    """Run a step with its output in `path` (appended): Python's stdout, stderr and logging, and
    file descriptors 1 and 2, so the output of child processes lands there too.

    A ReasonlabError is written to the log and, as one line `[job] error: ...`, to the terminal's
    stderr; the step then exits with status 1. Any other exception is logged with its traceback
    and re-raised. Without a path, output stays on the terminal and an error is still one line.
    """
    if path is None:
        logging.basicConfig(level=logging.INFO, format=FORMAT)
        try:
            yield log
        except ReasonlabError as e:
            print(f"[{job}] error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    with open(path, "a", buffering=1, encoding="utf-8") as f:
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter(FORMAT))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            with _fds_to(f), contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield log
        except ReasonlabError as e:
            f.write(f"ERROR: {e}\n")
            print(f"[{job}] error: {e}", file=terminal)
            raise SystemExit(1) from None
        except Exception:
            f.write(traceback.format_exc())
            print(
                f"[{job}] failed: {traceback.format_exc().strip().splitlines()[-1]} (log: {path})",
                file=terminal,
            )
            raise
        finally:
            root.removeHandler(handler)
            terminal.close()
