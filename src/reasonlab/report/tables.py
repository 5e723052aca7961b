"""Aggregated tables: checking the output paths a stage's aggregation is given (a leaf module)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def out_paths(out: Mapping[str, str | Path], names: tuple[str, ...], stage: str) -> dict[str, Path]:
    """`out` (table name -> Parquet path) checked to name a path for every table in `names` (a
    stage's TABLES); the paths' folders are created."""
    missing = [n for n in names if n not in out]
    if missing:
        raise KeyError(
            f"{stage}: no output path for table(s) {', '.join(missing)}; `out` must map every "
            f"name in TABLES ({', '.join(names)}) to a Parquet path"
        )
    paths = {n: Path(out[n]) for n in names}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    return paths
