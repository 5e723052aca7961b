"""Generation: prompts, both backends' schema and greedy agreement, resumable shards, grading."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from reasonlab import synth
from reasonlab.data import prepare, write_prepared
from reasonlab.generate import COLUMNS, GenerationError, GenOptions, render_prompts
from reasonlab.grading import grade_table
from reasonlab.models import resolve, write_handle

ROOT = Path(__file__).resolve().parents[1]
GEN_PY = ROOT / ".venvs" / "gen" / "bin" / "python"

RUN = """
import json, sys
from reasonlab.generate import GenOptions, generate_dataset
if __name__ == "__main__":
    print(json.dumps(generate_dataset(sys.argv[1], sys.argv[2], sys.argv[3], GenOptions(**json.loads(sys.argv[4])), progress=False)))
"""

# RUN with the transformers engine watched: it SIGKILLs the process when asked for a shard after
# the first `argv[5]` (0: never), and the prompts it was asked for are printed after the summary.
RUN_WATCHED = """
import json, os, signal, sys
from reasonlab import generate as g
kill_after, asked = int(sys.argv[5]), []
engine_generate = g.TransformersBackend.generate
def generate(self, prompts):
    if kill_after and len(asked) == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    asked.append(prompts)
    return engine_generate(self, prompts)
g.TransformersBackend.generate = generate
summary = g.generate_dataset(sys.argv[1], sys.argv[2], sys.argv[3], g.GenOptions(**json.loads(sys.argv[4])), progress=False)
print(json.dumps(summary))
print(json.dumps([p for part in asked for p in part]))
"""


@pytest.fixture(scope="module")
def job(tiny_model_dir, tmp_path_factory):
    """A handle of the tiny model and a prepared 6-row MATH-format dataset."""
    root = tmp_path_factory.mktemp("gen")
    write_handle(
        resolve(
            "tiny",
            "base",
            {"source": str(tiny_model_dir), "checkpoints": {"base": None}, "dtype": "float32"},
        ),
        root / "h.json",
    )
    rows = synth.build_demo_data(
        0, synth.DemoSizes(pool_per_type=1, eval=6, control=1, pretrain=1)
    )["eval"]
    src = root / "eval.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = prepare({"source": str(src), "format": "math", "columns": {}}, "eval")
    write_prepared(
        p, root / "eval.parquet", root / "eval.rejects.jsonl", root / "eval.summary.json"
    )
    return root


def run(python, job, out, **opts):
    r = subprocess.run([str(python), "-c", RUN, str(job / "h.json"), str(job / "eval.parquet"), str(out), json.dumps(opts)],
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(
        next(ln for ln in reversed(r.stdout.splitlines()) if ln.startswith('{"rows"'))
    )


def test_prompts_from_chat_template_or_format_string(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"id": "1", "question": "What is 2 + 3?", "system": None}]
    assert render_prompts(rows, tok, GenOptions()) == [synth.chatml(None, "What is 2 + 3?")]
    assert render_prompts(rows, tok, GenOptions(system="Be brief.")) == [
        synth.chatml("Be brief.", "What is 2 + 3?")
    ]
    seed000 = GenOptions(template="{question}\nLet me think step by step.")
    assert render_prompts(rows, tok, seed000) == ["What is 2 + 3?\nLet me think step by step."]
    with pytest.raises(GenerationError, match="names field 'query'"):
        render_prompts(rows, tok, GenOptions(template="{query}"))
    with pytest.raises(
        GenerationError, match="row '7' has an empty question; it is not sent to the model"
    ):
        render_prompts([{"id": "7", "question": "  ", "system": None}], tok, GenOptions())


def test_transformers_backend_schema_and_resume(job, tmp_path):
    opts = {"backend": "transformers", "max_new_tokens": 12, "shard_size": 2, "batch_size": 2}
    whole = run(sys.executable, job, tmp_path / "whole.parquet", **opts)
    assert whole["shards_generated"] == 3 and whole["completions"] == 6
    table = pl.read_parquet(tmp_path / "whole.parquet")
    assert table.columns == COLUMNS and table["backend"].unique().to_list() == ["transformers"]
    first = table.row(0, named=True)
    assert (
        len(first["token_ids"])
        == first["n_completion_tokens"]
        == len(first["token_logprobs"])
        == len(first["top_ids"])
    )
    assert (
        all(len(t) == 5 for t in first["top_ids"])
        and first["top_ids"][0][0] == first["token_ids"][0]
    )  # greedy: top-1
    assert not (tmp_path / "whole.parquet.shards").exists()
    # a job killed after its first shard, then re-run, redoes only the missing shards. The child
    # SIGKILLs itself when the engine is asked for a second shard: the first shard's file is
    # written by then and nothing else is, whatever the machine's speed.
    out = tmp_path / "resumed.parquet"
    shards = Path(str(out) + ".shards")
    killed = subprocess.run([sys.executable, "-c", RUN_WATCHED, str(job / "h.json"), str(job / "eval.parquet"), str(out), json.dumps(opts), "1"],
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name[:11] for p in shards.iterdir()] == ["shard-00000"] and not out.exists()
    first_shard = pl.read_parquet(next(shards.iterdir()))
    assert first_shard.equals(table.head(first_shard.height))
    r = subprocess.run([sys.executable, "-c", RUN_WATCHED, str(job / "h.json"), str(job / "eval.parquet"), str(out), json.dumps(opts), "0"],
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    resumed, asked = (json.loads(ln) for ln in r.stdout.splitlines()[-2:])
    assert resumed["shards_reused"] == 1 and resumed["shards_generated"] == 2
    assert asked == table["prompt"].to_list()[2:]  # the engine saw only the missing shards' prompts
    assert pl.read_parquet(out).equals(table) and not shards.exists()


@pytest.mark.skipif(
    not GEN_PY.exists(), reason="the gen environment is not built (bash envs/setup.sh gen)"
)
def test_vllm_and_transformers_agree_greedy(job, tmp_path):
    v = run(GEN_PY, job, tmp_path / "v.parquet", backend="vllm", max_new_tokens=16)
    t = run(GEN_PY, job, tmp_path / "t.parquet", backend="transformers", max_new_tokens=16)
    assert v["backend"] == "vllm" and t["backend"] == "transformers"
    a, b = pl.read_parquet(tmp_path / "v.parquet"), pl.read_parquet(tmp_path / "t.parquet")
    assert a.schema == b.schema
    assert (
        a["token_ids"].to_list() == b["token_ids"].to_list()
        and a["completion"].to_list() == b["completion"].to_list()
    )
    diff = max(
        abs(x - y)
        for xs, ys in zip(a["token_logprobs"], b["token_logprobs"], strict=True)
        for x, y in zip(xs, ys, strict=True)
    )
    assert diff <= 1e-3  # vLLM's sampled-token logprobs in float32 agree with transformers'


def test_grade_table_adds_answers_and_correctness():
    raw = pl.DataFrame({"id": ["a", "b", "c"], "completion": ["<think>\n2 + 3 = 5\n</think>\nThe answer is \\boxed{5}.",
                                                              "<think>x</think> \\boxed{\\frac{1}{2}}", "no idea"]})  # fmt: skip
    data = pl.DataFrame({"id": ["a", "b", "c"], "reference": ["5", "0.5", "3"]})
    g = grade_table(raw, data, "math")
    assert g["answer"].to_list() == ["5", "\\frac{1}{2}", None]
    assert g["correct"].to_list() == [True, True, False] and g["grade_flag"].to_list() == [
        None,
        None,
        "no answer",
    ]
    assert g["reasoning"][0] == "2 + 3 = 5"
