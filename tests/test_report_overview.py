"""The run overview: its aggregation of handles, dataset summaries and environments, and its
section on real, empty and all-null tables."""

import json

import polars as pl
import pytest

from reasonlab.models import Handle, write_handle
from reasonlab.report import overview
from reasonlab.report.html import render, unpacked


def handle(model, ckpt, base=None):
    return Handle(model=model, ckpt=ckpt, kind="local", path="/w", hub_id=None, revision=None,
                  commit=None, content_hash="sha256:" + "ab" * 32, tokenizer=None, dtype="float32",
                  is_adapter=base is not None, base=base, architecture="Qwen2ForCausalLM",
                  model_type="qwen2", num_hidden_layers=2, hidden_size=64, vocab_size=400)  # fmt: skip


@pytest.fixture
def inputs(tmp_path):
    handles = []
    for model, ckpt, base in (
        ("tiny", "base", None),
        ("lora", "final", {"model": "tiny", "ckpt": "base"}),
    ):
        p = tmp_path / f"{model}.{ckpt}.json"
        write_handle(handle(model, ckpt, base), p)
        handles.append(p)
    summaries, rejects = [], []
    for i, (name, kept, bad) in enumerate([("d1", 5, 4), ("<b>d2</b>", 3, 0)]):
        s, r = tmp_path / f"{i}.summary.json", tmp_path / f"{i}.rejects.jsonl"
        s.write_text(json.dumps({"dataset": name, "source": "x", "format": "query", "n_read": kept + bad,
                                 "n_rejected": bad, "n_rows": kept, "n_without_reference": 1}))  # fmt: skip
        r.write_text(
            "".join(
                json.dumps({"row": j, "reason": f"bad {j}", "raw": ""}) + "\n" for j in range(bad)
            )
        )
        summaries.append(s)
        rejects.append(r)
    envs = []
    for env, ok in (("core", True), ("gen", False)):
        p = tmp_path / f"{env}.json"
        imports = {"vllm": {"ok": ok} if ok else {"ok": False, "error": "No module named 'vllm'"}}
        p.write_text(json.dumps({"environment": env, "python": "3.11.7", "ok": ok, "imports": imports,
                                 "packages": {"torch": "2.13.0", "polars": "1.0" if ok else "0.9"}}))  # fmt: skip
        envs.append(p)
    return handles, summaries, rejects, envs


def compute_records(tmp_path) -> list:
    """Two scoring jobs on two H100s in bfloat16 and a generation job on the CPU, as
    reasonlab.compute.record writes them."""
    out = []
    for i, rec in enumerate([
        {"stage": "score", "model": "tiny", "ckpt": "base", "textset": "d1", "device": "cuda:0",
         "dtype": "bfloat16", "device_map": "auto", "gpus": 2, "tensor_parallel_size": 2,
         "gpu_name": "NVIDIA H100", "gpu_memory_gib": 158.4, "peak_gpu_memory_gib": 12.5,
         "threads": 8, "seconds": 10.0},
        {"stage": "score", "model": "tiny", "ckpt": "final", "textset": "d1", "device": "cuda:0",
         "dtype": "bfloat16", "device_map": "auto", "gpus": 2, "tensor_parallel_size": 2,
         "gpu_name": "NVIDIA H100", "gpu_memory_gib": 158.4, "peak_gpu_memory_gib": 14.0,
         "threads": 8, "seconds": 5.0},
        {"stage": "generate", "model": "tiny", "ckpt": "base", "dataset": "d1", "device": "cpu",
         "dtype": "float32", "device_map": None, "gpus": 0, "tensor_parallel_size": 1,
         "gpu_name": None, "gpu_memory_gib": None, "peak_gpu_memory_gib": None, "threads": 2,
         "seconds": 3.0, "backend": "transformers"},
    ]):  # fmt: skip
        p = tmp_path / f"rec{i}.json"
        p.write_text(json.dumps(rec))
        out.append(p)
    return out


@pytest.fixture
def aggregated(inputs, tmp_path):
    out = {k: tmp_path / f"agg_{k}.parquet" for k in overview.TABLES}
    overview.aggregate_overview(*inputs, out, compute_records(tmp_path))
    return {k: pl.read_parquet(v) for k, v in out.items()}


def test_devices_and_precision_of_every_job(aggregated):
    c = aggregated["compute"]
    assert c.select("stage", "ckpt", "item", "device", "dtype", "gpus").rows() == [
        ("score", "base", "d1", "cuda:0", "bfloat16", 2),
        ("score", "final", "d1", "cuda:0", "bfloat16", 2),
        ("generate", "base", "d1", "cpu", "float32", 0),
    ]  # fmt: skip
    doc = unpacked(render([(overview.KEY, overview.TITLE, overview.section(aggregated, {}))], "t"))
    assert (
        "<b>score</b>: 2 job(s) on 2 × NVIDIA H100 in bfloat16, 15 s in all, peak GPU memory 14.0 GiB"
        in doc
    )
    assert "<b>generate</b>: 1 job(s) on the CPU in float32, 3 s in all</li>" in doc


def test_aggregates(aggregated):
    d = aggregated["datasets"]
    assert d["n_rows"].to_list() == [5, 3]
    # the first three rejects of a dataset, and none for a dataset without rejects
    assert d["first_rejects"].to_list() == ["row 0: bad 0; row 1: bad 1; row 2: bad 2", None]
    m = aggregated["models"]
    assert m.select("model", "ckpt", "is_adapter", "base").rows() == [
        ("tiny", "base", False, None), ("lora", "final", True, "tiny/base")
    ]  # fmt: skip
    e = aggregated["environments"]
    assert (
        e.height == 4
        and e.filter(pl.col("environment") == "gen")["import_errors"].to_list()
        == ["vllm: No module named 'vllm'"] * 2
    )


def test_missing_output_path_is_a_clear_error(inputs, tmp_path):
    with pytest.raises(KeyError, match="no output path for table.*environments"):
        overview.aggregate_overview(*inputs, {"models": tmp_path / "m", "datasets": tmp_path / "d"})


def test_section_escapes_and_reports_import_failures(aggregated):
    doc = unpacked(
        render(
            [(overview.KEY, overview.TITLE, overview.section(aggregated, {"config_hash": "<h>"}))],
            "t",
        )
    )
    assert "&lt;b&gt;d2&lt;/b&gt;" in doc and "<b>d2</b>" not in doc and "&lt;h&gt;" in doc
    assert "import failed: vllm: No module named &#x27;vllm&#x27;" in doc
    assert "2 model(s), 2 model × checkpoint handle(s), 2 dataset(s)" in doc
    assert "<td>1.0</td><td>0.9</td>" in doc  # polars' version per environment, side by side


def all_null(df: pl.DataFrame, rows: int = 3) -> pl.DataFrame:
    return pl.DataFrame({c: pl.Series(c, [None] * rows, dtype=t) for c, t in df.schema.items()})


def test_no_inputs_and_all_null_tables_are_a_note(tmp_path, aggregated):
    out = {k: tmp_path / f"empty_{k}.parquet" for k in overview.TABLES}
    overview.aggregate_overview([], [], [], [], out)
    empty = {k: pl.read_parquet(v) for k, v in out.items()}
    assert all(t.height == 0 and t.columns for t in empty.values())
    for tables in (empty, {k: all_null(v) for k, v in aggregated.items()}):
        doc = unpacked(render([(overview.KEY, overview.TITLE, overview.section(tables, {}))], "t"))
        assert "Nothing to show" in doc and "const charts" not in doc
