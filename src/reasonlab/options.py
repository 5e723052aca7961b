"""Which option fields change results and which change only speed.

A stage's options are a frozen dataclass (`ScoreOptions`, `GenOptions`, ...). A field declared with
`speed(...)` changes only how fast or in how much memory a job runs (batch sizes, token budgets,
compile, caches); every other field may change the results. The planning module passes a stage's
result fields to Snakemake as params (a change re-runs the job) and its speed fields on the command
line only (a change re-runs nothing). Imports nothing from reasonlab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

AFFECTS = "affects"


def speed(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING):
    """A dataclass field that changes only speed or memory, never a result."""
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={AFFECTS: "speed"}
    )


def is_speed(f: dataclasses.Field) -> bool:
    return f.metadata.get(AFFECTS) == "speed"


def speed_fields(cls) -> list[str]:
    """Names of the fields of an options dataclass that change only speed."""
    return [f.name for f in dataclasses.fields(cls) if is_speed(f)]


def result_fields(cls) -> list[str]:
    """Names of the fields of an options dataclass that may change results."""
    return [f.name for f in dataclasses.fields(cls) if not is_speed(f)]


def split(cls, section: dict) -> tuple[dict, dict]:
    """The keys of a config section that are fields of `cls`, as (result options, speed options).

    Keys that are not fields of `cls` (a stage's job selection, threads, ...) are left out: the
    dataclass, not a hand-written list, decides what a job receives.
    """
    names = {f.name: is_speed(f) for f in dataclasses.fields(cls)}
    results = {k: v for k, v in section.items() if k in names and not names[k]}
    speeds = {k: v for k, v in section.items() if k in names and names[k]}
    return results, speeds
