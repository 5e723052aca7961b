"""Environment descriptions."""

import importlib.metadata as md
import sys

from reasonlab.envinfo import describe


def test_describe_records_versions_and_imports():
    info = describe("core", ["json", "no_such_module_xyz"])
    assert info["prefix"] == sys.prefix and info["python"] == ".".join(
        map(str, sys.version_info[:3])
    )
    assert info["packages"]["torch"] == md.version("torch")
    assert info["imports"]["json"]["ok"] is True
    assert info["imports"]["no_such_module_xyz"] == {
        "ok": False,
        "error": "ModuleNotFoundError: No module named 'no_such_module_xyz'",
    }
    assert info["ok"] is False


def test_core_environment_imports():
    info = describe("core")
    assert info["ok"], info["imports"]
    assert set(info["imports"]) == {"snakemake", "torch", "transformers"}
