"""Logging for workflow jobs: everything a job prints goes to its log file, and a user error
(`ReasonlabError`) ends the job with its one-line message in the log and on the terminal, not a
traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from pathlib import Path

from reasonlab import ReasonlabError

log = logging.getLogger("reasonlab")


@contextlib.contextmanager
def job_log(path: str | Path | None, job: str = "job"):
    """Send stdout, stderr and the `reasonlab` logger to `path` (appending) for the duration.

    A ReasonlabError is written to the log and, as one line, to the terminal's stderr; the job
    then exits with status 1. Any other exception is logged with its traceback and re-raised.
    """
    if path is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        yield log
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    terminal = sys.stderr
    with open(path, "a", buffering=1, encoding="utf-8") as f:
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield log
        except ReasonlabError as e:
            f.write(f"ERROR: {e}\n")
            print(f"[{job}] error: {e}", file=terminal)
            raise SystemExit(1) from None
        except Exception:
            f.write(traceback.format_exc())
            raise
        finally:
            root.removeHandler(handler)
