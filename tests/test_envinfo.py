"""Environment descriptions, checked against an environment other than the one running the tests."""

import json
import os
import subprocess
import sys

import pytest

import reasonlab.envinfo
from reasonlab.envinfo import describe

# Run describe() inside another interpreter, loading envinfo.py from its file so that neither the
# project nor its package metadata (src/reasonlab.egg-info) comes onto that interpreter's path.
PROBE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("envinfo", sys.argv[1])
envinfo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(envinfo)
print(json.dumps(envinfo.describe("probe", sys.argv[2:])))
"""


@pytest.fixture(scope="module")
def other_env(tmp_path_factory):
    """A bare virtual environment (no system site-packages, no pip) holding what we put there:
    two fake distributions of packages describe() records, a module that imports and one that fails."""
    venv = tmp_path_factory.mktemp("other") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    (site,) = venv.glob("lib/python*/site-packages")
    for name, version in (("numpy", "0.0.7"), ("polars", "9.8.7rc1")):
        dist = site / f"{name}-{version}.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (site / "fine_mod.py").write_text("X = 1\n")
    (site / "broken_mod.py").write_text("raise RuntimeError('broken on purpose')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    out = subprocess.run(
        [str(python), "-c", PROBE, reasonlab.envinfo.__file__, "fine_mod", "broken_mod", "no_such"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=venv,
    ).stdout
    return venv, site, python, json.loads(out)


def test_describe_records_the_environment_it_runs_in(other_env):
    venv, site, python, info = other_env
    assert info["environment"] == "probe"
    assert (
        os.path.realpath(info["prefix"]) == os.path.realpath(venv) != os.path.realpath(sys.prefix)
    )
    # the interpreter's own report of its version, and the one venv wrote into pyvenv.cfg
    said = subprocess.run([str(python), "--version"], capture_output=True, text=True).stdout
    assert said.split() == ["Python", info["python"]]
    cfg = dict(
        line.split(" = ", 1)
        for line in (venv / "pyvenv.cfg").read_text().splitlines()
        if " = " in line
    )
    assert cfg.get("version", cfg.get("version_info")).startswith(info["python"])
    # versions as the dist-info directories on disk name them; nothing from the tests' environment
    on_disk = dict(
        d.name.removesuffix(".dist-info").split("-", 1) for d in site.glob("*.dist-info")
    )
    assert on_disk == {"numpy": "0.0.7", "polars": "9.8.7rc1"}
    assert info["packages"] == on_disk
    assert info["n_distributions"] == len(on_disk)


def test_describe_records_each_import_and_its_failure(other_env):
    *_, info = other_env
    imports = info["imports"]
    assert list(imports) == ["fine_mod", "broken_mod", "no_such"]
    assert imports["fine_mod"]["ok"] is True and imports["fine_mod"]["seconds"] >= 0
    assert imports["broken_mod"] == {"ok": False, "error": "RuntimeError: broken on purpose"}
    assert imports["no_such"] == {
        "ok": False,
        "error": "ModuleNotFoundError: No module named 'no_such'",
    }
    assert info["ok"] is False


def test_core_environment_imports():
    info = describe("core")
    assert info["ok"], info["imports"]
    assert set(info["imports"]) == {"snakemake", "torch", "transformers"}
