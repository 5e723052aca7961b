"""Dataset loaders: every source type and format, bad rows, sampling, outputs."""

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reasonlab.data import COLUMNS, DatasetError, is_local, prepare, read_dataset, write_prepared

FIX = Path(__file__).parent / "fixtures"


def spec(source, fmt, **kw):
    return {
        "source": str(source),
        "format": fmt,
        "split": "test",
        "config": None,
        "columns": {},
        **kw,
    }


def by_id(p):
    return {r["id"]: r for r in p.rows}


def test_gsm8k_jsonl_rows_and_rejects():
    p = prepare(spec(FIX / "gsm8k.jsonl", "gsm8k"), "g")
    assert [r["row"] for r in p.rows] == [1, 2, 5]
    rows = by_id(p)
    assert rows["1"]["reference"] == "12"
    assert rows["2"]["reference"] == "2400"  # thousands separator removed
    assert rows["5"]["reference"] is None  # no '#### n' line: kept, reference null
    assert rows["1"]["question"].startswith("Mia has 3 bags")
    assert [(r["row"], r["reason"].split(":")[0]) for r in p.rejects] == [
        (3, "not valid JSON"),
        (4, "missing field 'question' (needed for question)"),
    ]
    assert p.summary["n_read"] == 5 and p.summary["n_rejected"] == 2 and p.summary["n_rows"] == 3
    assert p.summary["n_without_reference"] == 1
    # the broken line's own text is kept, so the user sees what to fix
    line3 = (FIX / "gsm8k.jsonl").read_text().splitlines()[2]
    assert p.rejects[0]["raw"] == line3 and line3


def test_math_json_reference_subject_level_and_ids():
    p = prepare(spec(FIX / "math.json", "math", columns={"id": "unique_id"}), "m")
    rows = by_id(p)
    assert list(rows) == ["test/prealgebra/1.json", "test/algebra/2.json"]
    assert (
        rows["test/prealgebra/1.json"]["reference"] == "\\frac{3}{4}"
    )  # nested braces in \boxed{}
    assert rows["test/algebra/2.json"]["reference"] == "5"  # the answer field wins
    assert rows["test/algebra/2.json"]["subject"] == "Algebra"
    assert rows["test/algebra/2.json"]["level"] == "Level 2"
    reasons = {r["row"]: r["reason"] for r in p.rejects}
    assert reasons[3].startswith("duplicate id 'test/algebra/2.json' (first at row 2)")
    assert "is empty" in reasons[4]
    assert "must be an object" in reasons[5]


def test_chat_messages_and_sharegpt():
    p = prepare(spec(FIX / "chat.jsonl", "chat"), "c")
    rows = by_id(p)
    assert rows["1"]["system"] == "You are a helpful assistant. Think step by step."
    assert rows["1"]["question"] == "What is 2 + 3?"
    assert rows["1"]["reference"] == "5"
    assert rows["2"]["question"] == "Name a colour." and rows["2"]["solution"] == "Blue."
    assert {r["row"] for r in p.rejects} == {3, 4}


def test_alpaca_pool_types_and_question_join():
    p = prepare(spec(FIX / "pool.json", "alpaca"), "pool")
    rows = by_id(p)
    assert rows["1"]["question"] == "Please reason step by step.\nWhat is 6 * 7?"
    assert rows["1"]["type"] == "high_llh_train" and rows["1"]["reference"] == "42"
    assert rows["3"]["question"] == "Say hi."  # empty input is not joined
    assert [r["row"] for r in p.rejects] == [4]


def test_query_csv_line_numbers_and_meta():
    p = prepare(spec(FIX / "queries.csv", "query"), "q")
    rows = by_id(p)
    assert rows["2"]["reference"] == "42"
    assert json.loads(rows["2"]["meta"]) == {"topic": "arithmetic"}
    assert rows["3"]["reference"] is None
    # CSV rows are numbered by file line (the header is line 1)
    assert {r["row"]: r["reason"] for r in p.rejects} == {
        4: "field 'query' (question) is empty",
        5: "1 more field(s) than the header has",
    }


def test_parquet_with_column_mapping():
    p = prepare(
        spec(
            FIX / "generic.parquet",
            "columns",
            columns={"id": "qid", "question": "prompt", "reference": "gold"},
        ),
        "x",
    )
    assert [(r["id"], r["question"], r["reference"]) for r in p.rows] == [
        ("a1", "One plus one?", "2"),
        ("a2", "Two plus two?", "4"),
    ]
    assert p.rejects[0]["row"] == 3


def test_saved_hf_dataset_directory_and_split():
    p = prepare(spec(FIX / "hf_saved", "gsm8k"), "hf")
    assert [r["reference"] for r in p.rows] == ["2", "4"]
    p = prepare(spec(FIX / "hf_saved", "gsm8k", split="train"), "hf")
    assert [r["question"] for r in p.rows] == ["T1"]
    with pytest.raises(DatasetError, match="no split 'validation'"):
        prepare(spec(FIX / "hf_saved", "gsm8k", split="validation"), "hf")


def test_dataset_repo_directory_through_load_dataset(tmp_path):
    # a directory laid out like a hub dataset repository: data/<split>-*.parquet
    (tmp_path / "data").mkdir()
    pq.write_table(
        pa.table({"problem": ["p1", "p2"], "solution": ["\\boxed{1}", "\\boxed{2}"]}),
        tmp_path / "data" / "test-00000-of-00001.parquet",
    )
    p = prepare(spec(tmp_path, "math"), "repo")
    assert [r["reference"] for r in p.rows] == ["1", "2"]


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetError, match="could not load it with the datasets library"):
        prepare(spec("hub:nobody/no-such-dataset", "gsm8k"), "hub")


def test_num_samples_first_or_seeded(tmp_path):
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"query": f"q{i}"}) + "\n" for i in range(50)))
    first = prepare(spec(src, "query", num_samples=5), "q")
    assert [r["question"] for r in first.rows] == [f"q{i}" for i in range(5)]
    a = prepare(spec(src, "query", num_samples=5, seed=1), "q")
    b = prepare(spec(src, "query", num_samples=5, seed=1), "q")
    c = prepare(spec(src, "query", num_samples=5, seed=2), "q")
    assert a.rows == b.rows and a.rows != c.rows and len(a.rows) == 5
    assert [r["row"] for r in a.rows] == sorted(r["row"] for r in a.rows)  # source order kept


def test_no_usable_row_is_an_error(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"query": ""}\nnot json\n')
    with pytest.raises(
        DatasetError, match=r"no usable row .* \(2 read, 2 rejected\); the first reject: row 1"
    ):
        prepare(spec(src, "query"), "bad")


def test_unreadable_sources(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        prepare(spec(tmp_path / "missing.jsonl", "query"), "m")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(DatasetError, match="not valid JSON at line 1"):
        prepare(spec(bad, "query"), "b")
    txt = tmp_path / "x.txt"
    txt.write_text("hi")
    with pytest.raises(DatasetError, match="unknown file type"):
        prepare(spec(txt, "query"), "t")


def test_write_prepared_schema_and_files(tmp_path):
    p = prepare(spec(FIX / "gsm8k.jsonl", "gsm8k"), "g")
    out = [tmp_path / "g.parquet", tmp_path / "g.rejects.jsonl", tmp_path / "g.summary.json"]
    write_prepared(p, *out)
    df = read_dataset(out[0])
    assert df.columns == COLUMNS and df.height == 3
    assert df.schema["row"] == pl.Int64 and df.schema["reference"] == pl.String
    rejects = [json.loads(line) for line in out[1].read_text().splitlines()]
    assert [r["row"] for r in rejects] == [3, 4] and rejects[1]["raw"].startswith('{"answer"')
    assert json.loads(out[2].read_text())["n_rows"] == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_is_local():
    assert is_local("data/x.jsonl") and is_local("/abs/dir") and is_local("./dir")
    assert not is_local("openai/gsm8k") and not is_local("hub:data/x.jsonl")
