"""The report: HTML rendering, building the ordered sections, and the chart helper's selectors and
default views, on a hand-made study of 5 models (one with 13 checkpoints) run through every stage's
aggregation."""

import json
import re

import altair as alt
import polars as pl
import pytest
import vl_convert

from reasonlab import compute
from reasonlab.grading import wilson
from reasonlab.models import Handle, write_handle
from reasonlab.report import build, charts, generate, overview, score, training
from reasonlab.report.html import ALL, FOLD_ROWS, Html, render, table_html, unpacked
from reasonlab.report.html import chart_specs as html_chart_specs

RUN_A = [f"step-{10 * i}" for i in range(1, 13)] + ["final"]  # 13 checkpoints
SHORT = ["step-10", "step-20", "final"]
MODELS = {"base-model": ["base"], "run-a": RUN_A, "run-b": SHORT, "run-c": SHORT, "run-d": SHORT}
RUNS = ("run-a", "run-b", "run-c", "run-d")
FINAL_STEP = 130
TYPES = ("canonical", "paraphrase", "terse", "wrong")
SAMPLE_PROMPTS = 2


def ckpt_step(ckpt: str) -> int:
    return FINAL_STEP if ckpt == "final" else int(ckpt.split("-")[1])


def handle(model, ckpt, path):
    return Handle(model=model, ckpt=ckpt, kind="local", path=str(path), hub_id=None, revision=None,
                  commit=None, content_hash="sha256:" + "0" * 64, tokenizer=None, dtype="float32",
                  is_adapter=False, base=None, architecture="Qwen2ForCausalLM", model_type="qwen2",
                  num_hidden_layers=2, hidden_size=64, vocab_size=400)  # fmt: skip


def graded(path, seed, levels):
    """20 graded completions; `levels` None: a dataset without levels."""
    rows = []
    for i in range(20):
        correct = (i * 7 + seed) % 3 != 0
        rows.append({"id": f"q{i}", "sample": 0, "prompt": f"question {i}", "completion": "…",
                     "reasoning": f"think {i}", "answer": str(i), "reference": str(i if correct else -1),
                     "correct": correct, "grade_flag": None, "n_completion_tokens": 10 + (i * seed) % 50,
                     "finish_reason": "stop" if i % 5 else "length",
                     "level": None if levels is None else f"Level {1 + i % levels}", "type": None})  # fmt: skip
    pl.DataFrame(rows, schema_overrides={"grade_flag": pl.String, "level": pl.String,
                                         "type": pl.String}).write_parquet(path)  # fmt: skip


def scores(tokens_path, sequences_path, seed, generated: bool):
    """3 texts of 6 tokens (the last text of a generated set is empty)."""
    trows, srows = [], []
    for t in range(3):
        n = 0 if generated and t == 2 else 6
        ents = [((seed * 13 + t * 5 + p * 3) % 17) / 4 for p in range(n)]
        for p, e in enumerate(ents, 1):
            trows.append({"id": f"t{t}", "position": p, "token": f"<{t}.{p}>", "logprob": -e / 3,
                          "prob": 0.5, "entropy": e, "varentropy": 0.1, "rank": 1 + p % 2,
                          "top1_token": "x", "is_prompt": False}
                         | ({"gen_logprob": -e / 3 + 1e-5} if generated else {}))  # fmt: skip
        llh = sum(-e / 3 for e in ents)
        srows.append({"id": f"t{t}", "n_tokens": n, "llh_sum": llh if n else None,
                      "llh_mean": llh / n if n else None, "perplexity": 2.0 if n else None,
                      "entropy_mean": sum(ents) / n if n else None,
                      "type": ("correct" if t else "incorrect") if generated else TYPES[t]})  # fmt: skip
    pl.DataFrame(trows).write_parquet(tokens_path)
    pl.DataFrame(srows).write_parquet(sequences_path)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Every stage's aggregated tables of a small study: name -> Parquet path."""
    d = tmp_path_factory.mktemp("study")
    out = {}
    handles, gen_jobs, score_jobs = [], [], []
    for m, ckpts in MODELS.items():
        for order, c in enumerate(ckpts):
            seed = 3 * order + len(m)
            h = d / "handles" / m / f"{c}.json"
            if m not in RUNS:
                where = d / "weights"
            elif c == "final":
                where = d / "runs" / m / "output"
            else:
                where = d / "runs" / m / "output" / f"checkpoint-{ckpt_step(c)}"
            write_handle(handle(m, c, where), h)
            handles.append(h)
            for ds, levels in (("math", 5), ("gsm", None)):
                g = d / f"gen_{m}_{c}_{ds}.parquet"
                graded(g, seed, levels)
                gen_jobs.append(generate.GenJob(m, c, order, ds, g))
            for ts in ("pool", f"math@{m}@{c}"):
                tok, seq = d / f"sc_{m}_{c}_{ts}.tok.parquet", d / f"sc_{m}_{c}_{ts}.seq.parquet"
                scores(tok, seq, seed, generated="@" in ts)
                score_jobs.append(score.ScoreJob(m, c, order, ts, tok, seq))
    paths = lambda names: {n: d / f"{n}.parquet" for n in names}  # noqa: E731
    out |= paths(generate.TABLES)
    generate.aggregate_generations(gen_jobs, out)
    out |= paths(score.TABLES)
    score.aggregate_scores(score_jobs, out, sample_prompts=SAMPLE_PROMPTS, extremes=5)
    summaries, rejects = [], []
    for i, (ds, kept, bad) in enumerate((("math", 20, 2), ("<b>gsm</b>", 20, 0))):
        s, r = d / f"{i}.summary.json", d / f"{i}.rejects.jsonl"
        s.write_text(json.dumps({"dataset": ds, "source": "x", "format": "query", "n_read": kept + bad,
                                 "n_rejected": bad, "n_rows": kept, "n_without_reference": 0}))  # fmt: skip
        r.write_text(
            "".join(json.dumps({"row": i, "reason": f"bad {i}"}) + "\n" for i in range(bad))
        )
        summaries.append(s)
        rejects.append(r)
    env = d / "env.json"
    env.write_text(json.dumps({"environment": "core", "python": "3.11.7", "packages": {"torch": "2.13.0"},
                               "imports": {"torch": {"ok": True}}, "ok": True}))  # fmt: skip
    records = []
    for j in score_jobs:  # as the score jobs write them (reasonlab.compute.record)
        rec = compute.record(compute.Placement("cpu", "float32", None, 0, 1), compute.Machine((), 2),
                             "score", model=j.model, ckpt=j.ckpt, textset=j.textset, seconds=1.5)  # fmt: skip
        records.append(d / f"rec_{len(records)}.json")
        compute.write_record(rec, records[-1])
    out |= paths(overview.TABLES)
    overview.aggregate_overview(handles, summaries, rejects, [env], out, records)
    outputs, selections = [], []
    for run in RUNS:
        o = d / "runs" / run / "output"
        o.mkdir(parents=True, exist_ok=True)
        log = [
            {"step": s, "loss": 3.0 / s, "learning_rate": 1e-4} for s in range(5, FINAL_STEP + 1, 5)
        ]
        (o / "trainer_state.json").write_text(
            json.dumps({"global_step": FINAL_STEP, "log_history": log})
        )
        sel = d / f"{run}.selection.parquet"
        pl.DataFrame({"id": ["a", "b", "c"], "type": ["terse", "terse", "wrong"],
                      "score": [-1.0, -2.0, -3.0], "selected": [True, False, True]}).write_parquet(sel)  # fmt: skip
        outputs.append(o)
        selections.append(sel)
    out |= paths(training.TABLES)
    run_handles = [h for h in handles if h.parent.name in RUNS]
    training.aggregate_training(list(RUNS), outputs, selections, run_handles, out)
    return out


@pytest.fixture(scope="module")
def report_doc(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    built = build.build_report(study, {"title": "T <x>", "config_hash": "abc123"}, out)
    return built, unpacked(out.read_text())


def title(spec: dict) -> str:
    t = spec.get("title", "")
    return t["text"] if isinstance(t, dict) else t


def chart_specs(doc: str) -> list[dict]:
    return html_chart_specs(doc)


# ------------------------------------------------------------------ html and build


def test_report_is_self_contained_escaped_and_ordered(report_doc, study):
    built, doc = report_doc
    assert built == ["overview", "generation", "token-scores", "training"]
    assert "<script src" not in doc and "<link" not in doc  # nothing loaded from elsewhere
    assert "vegaEmbed" in doc and len(doc) > 500_000  # Vega, Vega-Lite and Vega-Embed are inlined
    assert "<title>T &lt;x&gt;</title>" in doc and "&lt;b&gt;gsm&lt;/b&gt;" in doc
    assert "<b>gsm</b>" not in doc and "abc123" in doc
    positions = [doc.index(f'<section id="{k}">') for k in built]
    assert positions == sorted(positions)
    assert "Nothing to show" not in doc  # every part of every section had data
    # the overview's chart carries the data: kept and rejected rows per dataset
    bars = next(s for s in chart_specs(doc) if title(s) == "Rows kept and rejected per dataset")
    values = next(iter(bars["datasets"].values()))
    assert {(v["dataset"], v["rows"], v["count"]) for v in values} == {
        ("math", "kept", 20), ("math", "rejected", 2), ("<b>gsm</b>", "kept", 20), ("<b>gsm</b>", "rejected", 0)
    }  # fmt: skip


def test_sections_need_all_their_tables(study, tmp_path):
    out = tmp_path / "r.html"
    only = {k: v for k, v in study.items() if k in overview.TABLES}
    assert build.build_report(only, {}, out) == ["overview"]
    # training reads the score stage's by-type table: without it, it is left out
    no_scores = {k: v for k, v in study.items() if k not in score.TABLES}
    assert build.build_report(no_scores, {}, out) == ["overview", "generation"]
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_sections_are_an_explicit_ordered_list():
    assert [s.KEY for s in build.SECTIONS] == [
        "overview",
        "generation",
        "token-scores",
        "traces",
        "activations",
        "interventions",
        "guided",
        "training",
    ]
    for stage in build.SECTIONS:
        assert stage.TABLES and len(set(stage.TABLES)) == len(stage.TABLES)
    assert training.NEEDS == ("score_by_type",) and set(training.NEEDS) <= set(score.TABLES)


def test_bad_block_type_is_an_error():
    with pytest.raises(TypeError, match="a report block must be"):
        render([("x", "X", [object()])], "t")


def test_long_tables_fold_and_rows_follow_selectors():
    df = pl.DataFrame({"model": [f"m{i % 3}" for i in range(300)], "v": list(range(300))})
    folded = table_html(df, row_attrs={"model": "model"})
    assert folded.startswith("<details>") and "<summary>300 rows" in folded
    assert folded.count("<tr") == 201 and "showing 200 of 300 rows" in folded  # header + cut
    assert folded.count('data-sel-model="m1"') == len([i for i in range(200) if i % 3 == 1])
    short = table_html(df.head(FOLD_ROWS))
    assert "<details>" not in short and "data-sel" not in short


def test_highest_lowest_entropy_tokens_start_folded(report_doc):
    _, doc = report_doc
    body = doc[doc.index("<main>") :]  # (the table of contents names the heading too)
    part = body[body.index("Highest- and lowest-entropy tokens") :]
    part = part[: part.index("<h3")]
    n_jobs = sum(len(c) for c in MODELS.values()) * 2  # two text sets per checkpoint
    assert part.count("<tr class=") == 2 * 5 * n_jobs  # 5 highest and 5 lowest per job, each
    assert part.count('data-sel-set="pool"') == 2 * 5 * n_jobs / 2  # tagged for the selectors
    assert re.search(r"<details><summary>\d+ tokens", part)  # and the table starts folded


# ------------------------------------------------------------------ charts


def eval_expr(expr: str, datum: dict, params: dict):
    """A Vega expression of the helpers' shapes (comparisons, ||, &&, datum.f, datum[...]),
    evaluated in Python."""
    py = re.sub(r"datum\.(\w+)", r'datum["\1"]', expr.replace("||", " or ").replace("&&", " and "))
    return eval(py, {"__builtins__": {}}, {"datum": datum, **params})  # noqa: S307


def eval_filter(expr: str, datum: dict, params: dict) -> bool:
    return bool(eval_expr(expr, datum, params))


def series_per_panel(spec: dict, override: dict | None = None) -> dict:
    """Panel -> number of distinct series a spec draws with its parameters' default values (or
    `override`): its inline data filtered by its filter transforms, split by facet, series told
    apart by their colour, opacity, dash and detail fields."""
    data = spec["datasets"][spec["data"]["name"]]
    params = {p["name"]: p["value"] for p in spec.get("params", [])} | (override or {})
    rows = []
    for r in data:
        r = dict(r)
        for t in spec.get("transform", []):
            if "filter" in t and not eval_filter(t["filter"], r, params):
                break
            if "calculate" in t:
                r[t["as"]] = eval_expr(t["calculate"], r, params)
        else:
            rows.append(r)
    fields = set()
    for unit in [
        spec,
        spec.get("spec", {}),
        *spec.get("layer", []),
        *spec.get("spec", {}).get("layer", []),
    ]:
        for channel in ("color", "opacity", "strokeDash", "detail"):
            enc = unit.get("encoding", {}).get(channel, {})
            if "field" in enc and (channel == "opacity" or enc.get("type") != "quantitative"):
                fields.add(enc["field"])  # (a quantitative colour is a heatmap's value)
    facet = spec.get("facet", {}).get("field")
    panels: dict = {}
    for r in rows:
        panels.setdefault(r.get(facet), set()).add(tuple(r[f] for f in sorted(fields)))
    return {k: len(v) for k, v in panels.items()}


def selector_specs(doc):
    return [s for s in chart_specs(doc) if s.get("params")]


def test_every_chart_compiles_to_vega(report_doc):
    _, doc = report_doc
    specs = chart_specs(doc)
    assert len(specs) >= 12
    for spec in specs:
        vega = vl_convert.vegalite_to_vega(spec, vl_version="v6_4")
        assert vega["marks"]


def test_default_views_draw_a_bounded_number_of_series(report_doc):
    _, doc = report_doc
    specs = selector_specs(doc)
    assert len(specs) >= 10
    for spec in specs:
        panels = series_per_panel(spec)
        assert panels, title(spec)  # the default slice is not empty
        assert max(panels.values()) <= charts.FEW_CHECKPOINTS + 3, title(spec)
        assert len(panels) <= 2 * SAMPLE_PROMPTS, title(spec)
    # the entropy histograms: one curve per model x checkpoint on demand (23 of them) ...
    hist = next(s for s in specs if title(s) == "Token entropy distribution")
    everything = {p["name"]: ALL for p in hist["params"]}
    n = sum(len(c) for c in MODELS.values())
    assert series_per_panel(hist, everything) == {"math@self": n, "pool": n}
    # ... by default a few checkpoints of the model with most of them, in one text set
    assert list(series_per_panel(hist).values()) == [charts.FEW_CHECKPOINTS]


def test_selectors_are_shared_and_colour_is_by_model(report_doc):
    _, doc = report_doc
    for spec in selector_specs(doc):
        for p in spec["params"]:
            section = {"sel-generation", "sel-token-scores", "sel-training"}
            element = p["bind"]["element"]
            assert element.startswith("#") and element.rsplit("-", 1)[0][1:] in section
            assert f'id="{element[1:]}"' in doc  # the <select> it binds to is in the page
        colours = [u["encoding"]["color"] for u in [spec, spec.get("spec", {})] + spec.get("layer", [])
                   + spec.get("spec", {}).get("layer", []) if "color" in u.get("encoding", {})]  # fmt: skip
        assert colours and all(c["field"] != "ckpt" for c in colours), title(spec)
        for c in colours:
            if c["field"] == "model":  # one colour per model, the same in every chart
                assert c["scale"]["domain"] == sorted(MODELS)


def test_checkpoint_order_and_few():
    df = pl.DataFrame({"model": ["a"] * 4 + ["b"] * 2,
                       "ckpt": ["final", "step-100", "step-20", "base", "step-5", "final"],
                       "ckpt_order": [3, 2, 1, 0, 0, 1]})  # fmt: skip
    assert charts.checkpoint_order(df.filter(pl.col("model") == "a")) == [
        "base", "step-20", "step-100", "final"
    ]  # fmt: skip
    assert charts.checkpoint_order(df.drop("ckpt_order")) == [
        "step-5",
        "step-20",
        "step-100",
        "base",
        "final",
    ]
    many = pl.DataFrame(
        {"model": "m", "ckpt": [f"step-{i}" for i in range(1, 21)], "ckpt_order": range(20)}
    )
    pos = charts.run_positions(many).sort("ckpt_order")
    assert pos["_pos"].to_list() == pytest.approx([i / 19 for i in range(20)])
    few = pos.filter(pl.col("_few"))["ckpt"].to_list()
    assert few[0] == "step-1" and few[-1] == "step-20" and len(few) == charts.FEW_CHECKPOINTS
    # report.checkpoints_shown: 3 of the 20, evenly spaced (steps 1, 10 or 11, 20)
    three = charts.run_positions(many, 3).filter(pl.col("_few")).sort("ckpt_order")["ckpt"]
    assert three.to_list() in (["step-1", "step-11", "step-20"], ["step-1", "step-10", "step-20"])
    sel = charts.selectors("s", df)
    assert (sel.model, sel.ckpt, sel.set) == ("a", charts.FEW, ALL)  # a has most checkpoints
    assert sel.few == charts.FEW_CHECKPOINTS and charts.selectors("s", df, few=3).few == 3


def test_chart_of_nothing_is_a_note():
    sel = charts.selectors("s")
    empty = pl.DataFrame(schema={"model": pl.String, "ckpt": pl.String, "v": pl.Float64})
    note = charts.checkpoint_chart(empty, "v", sel, title="V")
    assert isinstance(note, Html) and "Nothing to show" in note.markup
    nulls = pl.DataFrame({"model": ["m", None], "ckpt": [None, "c"], "v": [float("nan"), 1.0]})
    assert isinstance(charts.curve_chart(nulls, "v", "v", sel, title="V"), Html)
    chart = charts.checkpoint_chart(nulls.with_columns(ckpt=pl.lit("c")), "v", sel, title="V")
    assert isinstance(chart, Html)  # the only row with a value has no model


def test_long_tables_are_drawn_whole():
    n = 6000  # more rows than Altair's default cap of 5000
    df = pl.DataFrame(
        {"model": "m", "ckpt": "c", "x": list(range(n)), "y": [float(i % 7) for i in range(n)]}
    )
    with alt.data_transformers.enable(
        "default", max_rows=5000
    ):  # Altair's default, whatever ran before
        spec = charts.curve_chart(df, "x", "y", charts.selectors("s", df), title="Y").to_dict()
        doc = render([("s", "S", [alt.Chart(df).mark_point().encode(x="x", y="y")])], "t")
    assert len(spec["datasets"][spec["data"]["name"]]) == n
    assert len(next(iter(chart_specs(doc)[0]["datasets"].values()))) == n


def test_accuracy_chart_data_matches_the_graded_rows(study):
    acc = pl.read_parquet(study["gen_accuracy"])
    row = acc.filter(
        (pl.col("model") == "run-b") & (pl.col("ckpt") == "step-20") & (pl.col("dataset") == "math")
    )
    seed = 3 * 1 + len("run-b")
    k = sum((i * 7 + seed) % 3 != 0 for i in range(20))
    assert row.select("n", "correct").row(0) == (20, k)
    assert (row["ci_low"][0], row["ci_high"][0]) == pytest.approx(wilson(k, 20))
    spec = charts.checkpoint_chart(acc, "accuracy", charts.selectors("g", acc), title="A",
                                   interval=("ci_low", "ci_high")).to_dict()  # fmt: skip
    drawn = {(r["model"], r["ckpt"], r["dataset"]): (r["accuracy"], r["ci_low"], r["ci_high"])
             for r in spec["datasets"][spec["data"]["name"]]}  # fmt: skip
    assert drawn[("run-b", "step-20", "math")] == pytest.approx((k / 20, *wilson(k, 20)))
    assert len(drawn) == acc.height


def test_contents_sorting_and_filtering(report_doc):
    """The table of contents lists every section and its sub-headings (linked by id); every table
    sorts by a click on a header, and a long one has a filter box."""
    _, doc = report_doc
    nav = doc[doc.index("<nav>") : doc.index("</nav>")]
    body = doc[doc.index("<main>") :]
    for key in re.findall(r'<section id="([^"]+)"', body):
        assert f'href="#{key}"' in nav
    subs = re.findall(r'<h3 id="([^"]+)">', body)
    assert subs and all(f'href="#{i}"' in nav for i in subs) and len(set(subs)) == len(subs)
    page = body[: body.index("<script>")]  # (the inlined Vega bundle holds a "<table" string)
    assert page.count('<table class="rl-sortable">') == page.count("<table") > 3
    assert 'class="rl-filter"' in body and "function rlCell" in doc


def test_chart_data_is_stored_once_by_column_and_read_back():
    """Two charts of one table: its rows stored once, by column, only the fields the charts use,
    names coded, numbers to 5 significant digits; read back as rows (the page's inverse)."""
    import re as _re

    from reasonlab.report.html import RL_STORE, unpack

    df = pl.DataFrame({"model": ["a", "a", "b", "b"], "x": [1.0, 2.123456789, 3.0, None],
                       "unused": ["u1", "u2", "u3", "u4"]})  # fmt: skip
    line = alt.Chart(df).mark_line().encode(x="x:Q", y="x:Q", color="model:N")
    count = alt.Chart(df).mark_bar().encode(y="count():Q")  # names no field: still every row
    doc = render([("s", "S", [line, line.mark_point(), count])], "t")
    store = unpack(_re.search(RL_STORE, doc).group(1))
    assert len(store) == 1  # one table, stored once
    (cols,) = store.values()
    assert cols["model"] == {"values": ["a", "b"], "codes": [0, 0, 1, 1]}
    assert cols["x"] == [1.0, 2.1235, 3.0, None] and "unused" not in cols
    specs = chart_specs(doc)
    assert [len(next(iter(s["datasets"].values()))) for s in specs] == [4, 4, 4]
    assert next(iter(specs[0]["datasets"].values()))[1] == {"model": "a", "x": 2.1235}


def test_long_blocks_are_stored_compressed_and_opened_in_place():
    df = pl.DataFrame({"model": [f"m{i % 7}" for i in range(3000)], "v": list(range(3000))})
    doc = render([("s", "S", [Html("<h3>Big</h3>"), charts.table(df), "after"])], "t")
    assert '<div class="rl-packed" data-z="' in doc and '<td class="num">1999</td>' not in doc
    opened = unpacked(doc)
    assert 'class="rl-packed"' not in opened and '<td class="num">1999</td>' in opened
    assert opened.index("<h3") < opened.index("showing 2000 of 3000") < opened.index("<p>after</p>")
    assert len(doc) < len(opened) / 3
