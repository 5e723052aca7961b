"""Static checks that need no demo: lints, formatting, import structure, parse-time imports, the
`reasonlab` command against the rules that call it."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PKG = ROOT / "src" / "reasonlab"
LINTED = ["src", "tests", "benchmarks"]


def run(*cmd):
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True)


def test_snakemake_lint_and_snakefmt():
    r = run(BIN / "snakemake", "--lint", "-s", ROOT / "Snakefile")
    assert r.returncode == 0 and "Congratulations" in r.stdout + r.stderr, r.stdout + r.stderr
    r = run(BIN / "snakefmt", "--check", "Snakefile", "workflow")
    assert r.returncode == 0, r.stderr


def test_ruff_check_and_format():
    r = run(BIN / "ruff", "check", *LINTED)
    assert r.returncode == 0, r.stdout
    r = run(BIN / "ruff", "format", "--check", *LINTED)
    assert r.returncode == 0, r.stdout


def module_imports(root: Path) -> dict[str, set[str]]:
    """Module -> the package's own modules it imports, from every import statement in the file
    (deferred imports inside functions included), read with `ast`."""
    pkg = root.name
    files = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = f
    graph = {}
    for name, f in files.items():
        here = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here[: len(here) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                found = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in found:
                while t and t not in files:  # `from pkg.mod import name` -> pkg.mod
                    t = t.rpartition(".")[0]
                if t and t != name and t.split(".")[0] == pkg:
                    targets.add(t)
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (each an import circle)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_circle_finder_finds_circles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")  # deferred: still an edge
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from ..c import x\n")
    (pkg / "c.py").write_text("import pkg.a\nimport os\n")
    (pkg / "d.py").write_text("from . import c\n")
    graph = module_imports(pkg)
    # `from . import c` runs the package's __init__ too: both are edges
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg", "pkg.c"}
    assert circles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_no_import_circles_in_the_library():
    graph = module_imports(PKG)
    assert "reasonlab.plan" in graph and "reasonlab.report.build" in graph
    assert circles(graph) == []
    # the handle code loads no report code, and the report's HTML leaf imports nothing of ours
    assert not any(t.startswith("reasonlab.report") for t in graph["reasonlab.models"])
    assert graph["reasonlab.report.html"] == set()


def test_parse_time_imports_no_torch():
    code = (
        "import sys; import reasonlab.config, reasonlab.data, reasonlab.models, reasonlab.plan;"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'polars', 'altair', 'vllm')"
        " if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert r.returncode == 0, f"the workflow's parse-time imports pull in {r.stdout}{r.stderr}"


def rule_steps() -> dict[str, str]:
    """rule name -> the `reasonlab` step its shell command runs."""
    steps = {}
    for f in (ROOT / "workflow" / "rules").glob("*.smk"):
        for rule, body in re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", f.read_text(), re.M):
            m = re.search(r"-m reasonlab ([\w-]+)", body)
            steps[rule] = m.group(1) if m else None
    return steps


def test_every_rule_runs_a_reasonlab_step():
    from reasonlab.cli import STEPS, TOOLS

    steps = rule_steps()
    assert len(steps) >= 16
    assert [r for r, s in steps.items() if s is None] == []
    # no step without a rule (but the terminal tools), no unknown step
    assert {s for s in steps.values() if s} == set(STEPS) - set(TOOLS)
    assert set(TOOLS) <= set(STEPS)
    for rule, s in steps.items():
        if s:
            assert s == rule.replace("_", "-"), f"rule {rule} runs step {s}: name them alike"


def test_reasonlab_command_help_and_errors(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "reasonlab", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "score" in r.stdout and "aggregate-generations" in r.stdout
    console = BIN / "reasonlab"
    if console.exists():  # the console script installed with the package
        assert subprocess.run([console, "--help"], capture_output=True).returncode == 0
    # a user error: one line on stderr naming the problem, the same line in the log, exit 1
    log = tmp_path / "logs" / "resolve.log"
    r = subprocess.run(
        [sys.executable, "-m", "reasonlab", "resolve-model", "--log", str(log), "--model", "m",
         "--ckpt", "base", "--spec", '{"source": "/nonexistent/dir", "checkpoints": {"base": null}}',
         "--output", str(tmp_path / "h.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[resolve-model] error: models.m.checkpoints.base:")
    assert "Traceback" not in r.stderr
    assert err[0].removeprefix("[resolve-model] error: ") in log.read_text()
    assert not (tmp_path / "h.json").exists()
    # bad JSON in an argument is argparse's one-line usage error, exit 2
    r = subprocess.run(
        [sys.executable, "-m", "reasonlab", "prepare-dataset", "--name", "d", "--spec", "{oops",
         "--table", "t", "--rejects", "r", "--summary", "s"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "not valid JSON" in r.stderr


@pytest.mark.parametrize("fd_write", [False, True])
def test_job_log_captures_child_processes(tmp_path, fd_write):
    """Output written by a child process (LlamaFactory, vLLM's workers) lands in the step's log."""
    from reasonlab.logs import job_log

    log = tmp_path / "job.log"
    with job_log(log, "t"):
        print("from python")
        if fd_write:
            os.write(1, b"from fd 1\n")
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"])  # fmt: skip
    text = log.read_text()
    assert "from python" in text and "child out" in text and "child err" in text
    assert ("from fd 1" in text) == fd_write


def test_every_planned_command_parses(tmp_path):
    """Each shell command a dry run of the demo prints is a valid `reasonlab` invocation."""
    import shlex
    import shutil

    from reasonlab.cli import parser

    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    r = run(BIN / "snakemake", "-s", ROOT / "Snakefile", "-d", tmp_path, "-n", "-p", "-c2",
            "results/report.html")  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    prefix = "Shell command: "
    lines = (r.stdout + r.stderr).splitlines()
    commands = [shlex.split(x.removeprefix(prefix)) for x in lines if x.startswith(prefix)]
    steps = {c[3] for c in commands}
    assert {"score", "generate", "finetune", "report", "aggregate-scores"} <= steps
    for c in commands:
        assert c[1:3] == ["-m", "reasonlab"]
        args = parser().parse_args(c[3:])  # exits (fails the test) on an argument it rejects
        assert args.log and args.log.startswith("logs/"), c
