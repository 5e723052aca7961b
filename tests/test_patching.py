"""Activation patching (reasonlab.patching) against independent computations."""

import json

import polars as pl
import pytest
import torch
from test_activations import random_model
from test_intervene import SMALL, job_inputs

from reasonlab.patching import (
    Pair,
    PatchingError,
    answer_logprobs,
    pair_rows,
    patch_pair,
    run_metric,
    summarize,
    tokenize_pair,
    trace_prefix,
)
from reasonlab.report.html import chart_specs, unpacked

ARCHS = ["qwen2", "gpt2"]


def seq_logprob(model, ctx, answer) -> float:
    """log p(answer | ctx) from one unpadded forward of the whole text, written out here."""
    ids = torch.tensor([ctx + answer])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(answer))


def a_pair(n_prompt=6, n=11) -> Pair:
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(1, 90, (n,), generator=g).tolist()
    corrupted = list(clean)
    corrupted[2] = (clean[2] % 89) + 1  # a changed prompt token
    corrupted[8] = (clean[8] % 89) + 1  # a changed trace token
    groups = []
    for i, (a, b) in enumerate(zip(clean, corrupted, strict=True)):
        if i == n - 1:
            groups.append("last")
        elif i < n_prompt:
            groups.append("changed" if a != b else "prompt")
        else:
            groups.append("trace changed" if a != b else "trace")
    return Pair("p", "c", "x", clean, corrupted, [5, 7], [9], n_prompt, groups)


@pytest.mark.parametrize("arch", ARCHS)
def test_answer_logprobs_equal_unpadded_forwards(arch):
    model = random_model(arch)
    rows = [([3, 4, 5, 6], [7, 8, 9]), ([3, 4, 5, 6], [10]), ([11, 12, 13, 14], [15, 16])]
    got = answer_logprobs(model, rows, pad=0)
    for (c, a), v in zip(rows, got, strict=True):
        assert v == pytest.approx(seq_logprob(model, c, a), abs=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_patching_a_token_at_the_embedding_site_equals_the_hybrid_text(arch):
    """At site 0 (layer 0's input) the clean run's residual at position p is the clean token's
    embedding: patching it equals running the corrupted text with that one token replaced."""
    model = random_model(arch)
    p = a_pair()
    m_clean, m_corr, groups, tokens = patch_pair(model, p, [0, 1, 2], pad=0, tokens=True,
                                                  batch_size=6)  # fmt: skip
    assert m_clean == pytest.approx(
        seq_logprob(model, p.clean, p.clean_answer) - seq_logprob(model, p.clean, p.corrupted_answer),
        abs=1e-4,
    )  # fmt: skip
    site0 = {r["position"]: r for r in tokens if r["site"] == 0}
    assert sorted(site0) == list(range(len(p.clean)))
    for pos, r in site0.items():
        hybrid = list(p.corrupted)
        hybrid[pos] = p.clean[pos]
        want = run_metric(model, hybrid, p, 0)[0]
        assert r["metric"] == pytest.approx(want, abs=1e-4)
        if p.clean[pos] == p.corrupted[pos]:  # nothing to patch: exactly the corrupted run
            assert r["metric"] == pytest.approx(m_corr, abs=1e-5) and r[
                "normalised"
            ] == pytest.approx(0, abs=1e-5)
    g0 = {r["group"]: r for r in groups if r["site"] == 0}
    assert set(g0) == {"changed", "prompt", "trace changed", "trace", "last"}
    assert g0["changed"]["n_positions"] == g0["trace changed"]["n_positions"] == 1
    for name in ("prompt", "trace", "last"):  # identical tokens: the corrupted run
        assert g0[name]["metric"] == pytest.approx(m_corr, abs=1e-5)
    # the last site's last position carries the clean run's prediction of the first answer token
    last = next(r for r in groups if r["site"] == 2 and r["group"] == "last")
    assert last["metric"] != pytest.approx(m_corr, abs=1e-6)


def test_summarize_is_the_ratio_of_means():
    pairs = pl.DataFrame({"pair": ["a", "b", "c"], "status": ["ok", "ok", "skipped: x"],
                          "clean_metric": [4.0, 2.0, None], "corrupted_metric": [-2.0, 0.0, None]})  # fmt: skip
    groups = pl.DataFrame({"pair": ["a", "b", "a", "b"], "site": [0, 0, 1, 1],
                           "group": ["last"] * 4, "metric": [1.0, 1.0, 4.0, 2.0]})  # fmt: skip
    s = {r["site"]: r for r in summarize(pairs, groups)}
    # means: clean 3, corrupted -1; patched 1 -> (1 + 1) / 4 = 0.5; 3 -> 1
    assert s[0]["effect"] == pytest.approx(0.5) and s[1]["effect"] == pytest.approx(1.0)
    assert s[0]["n_pairs"] == 2


def frame(rows):
    return pl.DataFrame([{"id": r["id"], "meta": json.dumps(r["meta"]) if r["meta"] else None}
                         for r in rows])  # fmt: skip


def test_pairs_are_read_and_bad_pairs_are_one_clear_error():
    good = [{"id": "a", "meta": {"pair": 1, "role": "clean"}},
            {"id": "b", "meta": {"pair": 1, "role": "corrupted"}}]  # fmt: skip
    assert [(k, c["id"], x["id"]) for k, c, x in pair_rows(frame(good), "d")] == [("1", "a", "b")]
    with pytest.raises(PatchingError, match="d: row 'c' has no `pair` and `role` fields"):
        pair_rows(frame([*good, {"id": "c", "meta": None}]), "d")
    with pytest.raises(
        PatchingError, match="row 'c' has role 'dirty'; expected clean or corrupted"
    ):
        pair_rows(frame([*good, {"id": "c", "meta": {"pair": 2, "role": "dirty"}}]), "d")
    with pytest.raises(PatchingError, match="pair '1' has two clean rows"):
        pair_rows(frame([*good, {"id": "c", "meta": {"pair": 1, "role": "clean"}}]), "d")
    with pytest.raises(PatchingError, match="pair '2' has only a corrupted row"):
        pair_rows(frame([*good, {"id": "c", "meta": {"pair": 2, "role": "corrupted"}}]), "d")


def test_the_trace_ends_where_the_answer_starts():
    assert trace_prefix("Step 1: 2 * 3 = 6.\nThe answer is \\boxed{6}.", "6") == (
        "Step 1: 2 * 3 = 6.\nThe answer is \\boxed{"
    )
    assert trace_prefix("so it is 42 apples", "42") == "so it is "
    assert trace_prefix("no number here", "7") is None and trace_prefix(None, "7") is None


def test_demo_pairs_tokenize_alike_and_a_misaligned_pair_is_skipped(tiny_model_dir):
    from transformers import AutoTokenizer

    from reasonlab import synth
    from reasonlab.generate import GenOptions, render_prompts

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    d = synth.build_demo_data(0, synth.DemoSizes(pairs=6))["pairs"]
    rows = [{"id": r["id"], "question": r["problem"], "solution": r["solution"],
             "reference": r["answer"], "system": None} for r in d]  # fmt: skip
    prompts = render_prompts(rows, tok, GenOptions(template="chat"))
    aligned = 0
    for i in range(0, len(rows), 2):
        p = tokenize_pair(tok, str(i), rows[i], rows[i + 1], (prompts[i], prompts[i + 1]), "trace")
        if isinstance(p, str):
            assert p.startswith("the contexts have different token counts")
            continue
        aligned += 1
        assert len(p.clean) == len(p.corrupted) == len(p.groups) and p.groups[-1] == "last"
        assert "changed" in p.groups and "trace changed" in p.groups
        assert p.clean_answer != p.corrupted_answer
        assert tok.decode(p.clean[p.prompt_len :]).endswith("\\boxed{")
    assert aligned >= 4
    bad = dict(rows[1], question=rows[1]["question"] + " Think.")
    why = tokenize_pair(tok, "x", rows[0], bad, (prompts[0], prompts[1] + " Think."), "prompt")
    assert why.startswith("the contexts have different token counts")


def test_a_patch_job_writes_groups_tokens_and_pairs(tiny_model_dir, tmp_path):
    from reasonlab import data, synth
    from reasonlab.patching import patch_job

    job_inputs(tiny_model_dir, tmp_path, synth.build_demo_data(0, SMALL)["pairs"], "p")
    out = patch_job(tmp_path / "h.json", tmp_path / "p.parquet",
                    {"max_pairs": 3, "token_pairs": 1, "context": "trace"}, str(tmp_path / "o"),
                    batch_size=8, progress=False)  # fmt: skip
    pairs = pl.read_parquet(tmp_path / "o.pairs.parquet")
    groups = pl.read_parquet(tmp_path / "o.groups.parquet")
    tokens = pl.read_parquet(tmp_path / "o.tokens.parquet")
    ok = pairs.filter(pl.col("status") == "ok")
    assert out["pairs"] == ok.height == 3
    assert set(groups["pair"]) == set(ok["pair"]) and set(groups["site"]) == {0, 1, 2}
    first = ok["pair"][0]
    assert set(tokens["pair"]) == {first}  # token by token: the first pair only
    assert tokens.height == 3 * ok["n_tokens"][0]
    prompt0 = groups.filter((pl.col("site") == 0) & (pl.col("group") == "prompt"))
    assert prompt0["normalised"].abs().max() < 1e-5  # identical tokens at the embedding
    # write a pair dataset without the pair fields: one error naming the row
    (tmp_path / "q.jsonl").write_text(json.dumps({"problem": "x", "solution": "\\boxed{1}"}) + "\n")
    prepared = data.prepare({"source": str(tmp_path / "q.jsonl"), "format": "math"}, "q")
    data.write_prepared(prepared, tmp_path / "q.parquet", tmp_path / "r.jsonl", tmp_path / "s.json")
    with pytest.raises(PatchingError, match="has no `pair` and `role` fields"):
        patch_job(tmp_path / "h.json", tmp_path / "q.parquet", {}, str(tmp_path / "q"),
                  progress=False)  # fmt: skip


def test_the_report_section_draws_the_transfer_matrix_and_patching_heatmaps(tmp_path):
    """Aggregated from per-job files as the rules write them; the transfer matrix's cells are each
    setting's change from the baseline of its own job, the diagonal from the spec's own job."""

    from reasonlab.report import build, interventions

    def settings(path, rows):
        cols = ["setting", "order", "kind", "strength", "status", "n", "accuracy", "marker_logodds",
                "mean_tokens"]  # fmt: skip
        pl.DataFrame([dict(zip(cols, r, strict=True)) for r in rows]).write_parquet(path)

    def graded(path):
        pl.DataFrame({"id": ["1", "1"], "sample": [0, 0], "setting": ["baseline", "steer +1"],
                      "prompt": ["Q <b>"] * 2, "completion": ["A", "B"], "answer": ["1", "2"],
                      "reference": ["1"] * 2, "correct": [True, False],
                      "n_completion_tokens": [3, 4]}).write_parquet(path)  # fmt: skip

    jobs = {  # word -> (baseline acc, log-odds), (steered acc, log-odds)
        "m/a/0/steer/m/a": ((0.5, 2.0), (0.25, 1.0)),
        "m/b/1/steer/m/b": ((0.8, 3.0), (0.6, 2.5)),
        "m/b/1/steer/m/a": ((0.8, 3.0), (0.7, 3.5)),  # b steered with a's direction
        "m/a/0/steer/m/b": ((0.5, 2.0), (0.5, 2.0)),
    }
    paths = []
    for i, (base, steered) in enumerate(jobs.values()):
        p = tmp_path / f"j{i}.settings.parquet"
        settings(p, [("baseline", 0, "baseline", None, "ok", 4, *base, 10.0),
                     ("steer +1", 1, "steer", 1.0, "ok", 4, *steered, 12.0)])  # fmt: skip
        graded(tmp_path / f"j{i}.table.parquet")
        paths.append(p)
    pairs = pl.DataFrame({"pair": ["0", "1"], "clean_id": ["c0", "c1"], "corrupted_id": ["x0", "x1"],
                          "status": ["ok", "skipped: different token counts"], "n_tokens": [3, None],
                          "clean_metric": [2.0, None], "corrupted_metric": [-2.0, None]})  # fmt: skip
    pairs.write_parquet(tmp_path / "p.pairs.parquet")
    pl.DataFrame({"pair": ["0"] * 2, "site": [0, 1], "metric": [-2.0, 1.0], "normalised": [0.0, 0.75],
                  "group": ["last", "last"], "n_positions": [1, 1]}).write_parquet(tmp_path / "p.groups.parquet")  # fmt: skip
    pl.DataFrame({"pair": ["0"], "site": [0], "metric": [0.0], "normalised": [0.5], "position": [2],
                  "group": ["last"], "token": ["x"], "clean_token": ["y"]}).write_parquet(tmp_path / "p.tokens.parquet")  # fmt: skip
    out = {t: tmp_path / f"{t}.parquet" for t in interventions.TABLES}
    interventions.aggregate_interventions(list(jobs), paths, out, ["m/a/0/pairs"],
                                          [tmp_path / "p.groups.parquet"])  # fmt: skip
    st = pl.read_parquet(out["int_settings"])
    assert st.filter(pl.col("transfer")).height == 4 and st.height == 8
    ex = pl.read_parquet(out["int_examples"])
    assert ex.height == 4 and set(ex["ckpt"]) == {"a", "b"}  # own jobs only, every setting
    patching = pl.read_parquet(out["int_patching"])
    assert patching.sort("site")["effect"].to_list() == pytest.approx([0.0, 0.75])
    assert set(patching["n_skipped"]) == {1}
    doc_path = tmp_path / "r.html"
    build.build_report(out, {"title": "t"}, doc_path)
    doc = unpacked(doc_path.read_text())
    assert "Q &lt;b&gt;" in doc and "Q <b>" not in doc  # the steered traces, escaped
    cells = {}
    for spec in chart_specs(doc):
        t = spec.get("title", "")
        if "Transfer: accuracy change" in (t["text"] if isinstance(t, dict) else t):
            for v in next(iter(spec["datasets"].values())):
                cells[(v["direction_from"], v["steered"])] = v["d_accuracy"]
    assert cells == pytest.approx({("m/a", "m/a"): -0.25, ("m/b", "m/b"): -0.2,
                                   ("m/a", "m/b"): -0.1, ("m/b", "m/a"): 0.0})  # fmt: skip
    assert "Patching effect by site and position group" in doc and "1 skipped" in doc
