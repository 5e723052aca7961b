"""The report: self-contained HTML, the section mechanism, escaping."""

import json
import re

import altair as alt
import polars as pl
import pytest

from reasonlab import report
from reasonlab.overview import aggregate_overview


@pytest.fixture
def overview_tables(tmp_path, tiny_model_dir):
    from reasonlab.models import resolve, write_handle

    handle = tmp_path / "h.json"
    write_handle(
        resolve("tiny", "base", {"source": str(tiny_model_dir), "checkpoints": {"base": None}}),
        handle,
    )
    summaries, rejects = [], []
    for name, kept, bad in [("d1", 5, 2), ("<b>d2</b>", 3, 0)]:
        s = tmp_path / f"{len(summaries)}.summary.json"
        s.write_text(json.dumps({"dataset": name, "source": "x", "format": "query", "n_read": kept + bad,
                                 "n_rejected": bad, "n_rows": kept, "n_without_reference": 0}))  # fmt: skip
        r = tmp_path / f"{len(summaries)}.rejects.jsonl"
        r.write_text(
            "".join(
                json.dumps({"row": i, "reason": f"bad {i}", "raw": ""}) + "\n" for i in range(bad)
            )
        )
        summaries.append(s)
        rejects.append(r)
    env = tmp_path / "env.json"
    env.write_text(json.dumps({"environment": "core", "python": "3.11.7", "packages": {"torch": "2.13.0"},
                               "imports": {"torch": {"ok": True}}, "ok": True}))  # fmt: skip
    out = {k: tmp_path / f"{k}.parquet" for k in ("models", "datasets", "environments")}
    aggregate_overview(
        [handle], summaries, rejects, [env], out["models"], out["datasets"], out["environments"]
    )
    return out


def chart_specs(doc: str) -> list[dict]:
    m = re.search(r"const charts = (\[.*?\]);\n", doc, re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))


def test_overview_aggregates(overview_tables):
    d = pl.read_parquet(overview_tables["datasets"])
    assert d["n_rows"].to_list() == [5, 3] and d["first_rejects"].to_list() == [
        "row 0: bad 0; row 1: bad 1",
        None,
    ]
    m = pl.read_parquet(overview_tables["models"])
    assert m.select("model", "ckpt", "kind").row(0) == ("tiny", "base", "local")


def test_report_is_self_contained_and_escaped(overview_tables, tmp_path):
    out = tmp_path / "report.html"
    built = report.build_report(overview_tables, {"title": "T <x>", "config_hash": "abc123"}, out)
    assert built == ["overview"]
    doc = out.read_text()
    assert "<script src" not in doc and "<link" not in doc  # nothing loaded from elsewhere
    assert "vegaEmbed" in doc and len(doc) > 500_000  # Vega, Vega-Lite and Vega-Embed are inlined
    assert (
        "<title>T &lt;x&gt;</title>" in doc
        and "&lt;b&gt;d2&lt;/b&gt;" in doc
        and "<b>d2</b>" not in doc
    )
    assert "abc123" in doc
    # the chart carries the data: kept and rejected rows per dataset
    (spec,) = [c["spec"] for c in chart_specs(doc)]
    values = next(iter(spec["datasets"].values()))
    assert {(v["dataset"], v["rows"], v["count"]) for v in values} == {
        ("d1", "kept", 5), ("d1", "rejected", 2), ("<b>d2</b>", "kept", 3), ("<b>d2</b>", "rejected", 0)
    }  # fmt: skip
    assert not list(tmp_path.glob("*.tmp"))


def test_a_stage_plugs_in_a_section(overview_tables, tmp_path):
    table = tmp_path / "entropy.parquet"
    pl.DataFrame({"ckpt": ["base", "final"], "entropy": [2.5, 1.25]}).write_parquet(table)

    @report.section("test-entropy", "Entropy (test)", order=50, tables=("entropy",))
    def entropy_section(tables, context):
        df = tables["entropy"]
        return [
            "Mean entropy per checkpoint.",
            alt.Chart(df).mark_bar().encode(x="ckpt:N", y="entropy:Q"),
            df,
        ]

    try:
        out = tmp_path / "r.html"
        # without its table the section is left out ...
        assert report.build_report(overview_tables, {}, out) == ["overview"]
        # ... with it, it follows the overview, in order
        built = report.build_report({**overview_tables, "entropy": table}, {}, out)
        assert built == ["overview", "test-entropy"]
        doc = out.read_text()
        assert doc.index('id="overview"') < doc.index('id="test-entropy"')
        assert "<p>Mean entropy per checkpoint.</p>" in doc and '<td class="num">1.25</td>' in doc
        assert len(chart_specs(doc)) == 2
    finally:
        report.SECTIONS.pop("test-entropy")


def test_bad_block_type_is_an_error(tmp_path):
    sec = report.Section("x", "X", 0, (), lambda t, c: [])
    with pytest.raises(TypeError, match="a report block must be"):
        report.render([(sec, [object()])], "t")
