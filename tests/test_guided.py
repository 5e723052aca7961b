"""Guided inference (reasonlab.guided) against independent greedy loops."""

import pytest
import torch

from reasonlab.guided import (
    GuidedError,
    Policy,
    Stream,
    check_tokenizers,
    guided_generate,
    next_token_stats,
)


def pair_models(tiny_model_dir, dtype=torch.float64):
    """The tiny demo model (base) and another of the same shape and tokenizer (oracle, seed 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasonlab import demo

    out = tiny_model_dir.parent / "oracle-seed1"
    if not out.is_dir():
        demo.build_tiny_model(tiny_model_dir.parent / "tokenizer", out,
                              demo.TinyModelSpec(num_hidden_layers=2), seed=1)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=dtype).eval()  # noqa: E731
    return load(tiny_model_dir), load(out), tok


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    return pair_models(tiny_model_dir)


def prompts(tok):
    texts = ["What is 2 + 3?", "Ana buys three packs of 4 pens. How many pens?", "Say hi."]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def greedy(model, ids, n, eos):
    """Plain greedy decoding of one prompt, recomputing the whole text every step (no cache)."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
        out.append(int(torch.argmax(logits)))
        if out[-1] == eos:
            break
    return out


def test_a_cache_with_holes_gives_each_row_its_own_logits(pair):
    base, _, tok = pair
    ps = prompts(tok)
    s = Stream(base, 0, len(ps))
    s.feed(ps)
    s.feed([[5, 6], [], [7]])  # rows advance by different numbers of tokens
    s.feed([[8], [9, 10, 11], []])
    full = [ps[0] + [5, 6, 8], ps[1] + [9, 10, 11], ps[2] + [7]]
    for r, ids in enumerate(full):
        with torch.no_grad():
            want = base(input_ids=torch.tensor([ids])).logits[0, -1].float()
        assert torch.allclose(s.last[r], want, atol=1e-6), r
    assert s.count == [len(x) for x in full]


def test_no_consultation_is_the_base_alone_and_always_is_the_oracle_alone(pair):
    base, oracle, tok = pair
    ps = prompts(tok)
    never = guided_generate(base, oracle, tok, ps, Policy("never", step_size=4), max_new_tokens=12)
    always = guided_generate(base, oracle, tok, ps, Policy("always"), max_new_tokens=12)
    for p, a, b in zip(ps, never, always, strict=True):
        assert a["token_ids"] == greedy(base, p, 12, tok.eos_token_id) and a["oracle_tokens"] == 0
        assert b["token_ids"] == greedy(oracle, p, 12, tok.eos_token_id)
        assert set(b["source"]) == {"oracle"} and b["oracle_fraction"] == 1.0


def test_the_budget_is_kept_and_consultations_are_where_the_statistic_fires(pair):
    base, oracle, tok = pair
    ps = prompts(tok)
    # every position's entropy is above 0: the base consults at once, up to c times
    got = guided_generate(base, oracle, tok, ps, Policy("entropy", c=2, k=3, step_size=4, threshold=0.0),
                          max_new_tokens=20)  # fmt: skip
    for p, g in zip(ps, got, strict=True):
        assert g["n_consultations"] <= 2 and g["oracle_tokens"] <= 2 * 3
        for cons in g["consultations"]:
            pos = cons["position"]
            assert g["source"][pos : pos + 3] == ["oracle"] * len(g["source"][pos : pos + 3])
        # the statistics at a consultation point are the base's next-token distribution there
        first = g["consultations"][0]
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([p + g["token_ids"][: first["position"]]])).logits[
                0, -1
            ]
        assert first["entropy"] == pytest.approx(next_token_stats(logits)["entropy"], abs=1e-6)
        # after the budget the base continues alone, greedily, from the mixed text
        n = len(g["token_ids"])
        last = max(c["position"] for c in g["consultations"]) + 3
        if n > last:
            rest = greedy(base, p + g["token_ids"][:last], n - last, tok.eos_token_id)
            assert g["token_ids"][last:] == rest


def test_bad_inputs_are_one_clear_error(pair, tmp_path):
    _, _, tok = pair
    with pytest.raises(GuidedError, match="unknown policy 'sometimes'"):
        Policy("sometimes")
    with pytest.raises(GuidedError, match="policy entropy needs a threshold"):
        Policy("entropy")
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    other.add_tokens(["<extra>"])
    with pytest.raises(
        GuidedError, match="the base model tiny and the oracle big have different tokenizers"
    ):
        check_tokenizers(tok, other, "tiny", "big")
    check_tokenizers(tok, AutoTokenizer.from_pretrained(tok.name_or_path))


def test_agreement_and_quantile_thresholds(pair):
    import numpy as np

    from reasonlab.guided import agreement, quantile_threshold

    base, oracle, tok = pair
    ps = prompts(tok)
    run = guided_generate(
        base, oracle, tok, ps, Policy("never"), max_new_tokens=10, position_stats=True
    )
    stats = [s for r in run for s in r["position_stats"]]
    assert len(stats) == sum(len(r["token_ids"]) for r in run)
    t = quantile_threshold(stats, "entropy", 0.25)
    assert t == pytest.approx(np.quantile([s["entropy"] for s in stats], 0.75))
    assert quantile_threshold(stats, "top1", 0.25) == pytest.approx(
        np.quantile([s["top1"] for s in stats], 0.25)
    )
    # agreement at a consultation point: recomputed from fresh forwards of both models
    got = guided_generate(
        base, oracle, tok, ps[:1], Policy("entropy", c=1, k=2, threshold=t), max_new_tokens=10
    )
    assert got[0]["consultations"]
    for cons in got[0]["consultations"]:
        ids = torch.tensor([ps[0] + got[0]["token_ids"][: cons["position"]]])
        with torch.no_grad():
            lb, lo = base(input_ids=ids).logits[0, -1], oracle(input_ids=ids).logits[0, -1]
        want = agreement(lb, lo)
        pb, po = torch.softmax(lb.double(), -1), torch.softmax(lo.double(), -1)
        assert cons["kl"] == pytest.approx(float((pb * (pb.log() - po.log())).sum()), abs=1e-6)
        m = 0.5 * (pb + po)
        js = 0.5 * float((pb * (pb / m).log()).sum()) + 0.5 * float((po * (po / m).log()).sum())
        assert (
            cons["js"] == pytest.approx(js, abs=1e-6) and cons["top1_match"] == want["top1_match"]
        )
    same = agreement(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert same == {"top1_match": True, "kl": 0.0, "js": pytest.approx(0.0, abs=1e-12)}


def test_statistics_at_consultation_points_equal_the_scorers(pair):
    """Entropy and varentropy where the base consulted = the scorer's for the token at that
    position, scored on the exact token ids of the mixed trace."""
    from reasonlab.score import ScoreOptions, TextItem, score_items

    base, oracle, tok = pair
    ps = prompts(tok)
    got = guided_generate(base, oracle, tok, ps, Policy("entropy", c=2, k=3, step_size=4, threshold=0.5),
                          max_new_tokens=16)  # fmt: skip
    items = [TextItem(f"r{i}", "", prompt_ids=p, completion_ids=g["token_ids"])
             for i, (p, g) in enumerate(zip(ps, got, strict=True))]  # fmt: skip
    tokens, _ = score_items(base, tok, items, ScoreOptions(progress=False))
    checked = 0
    for i, g in enumerate(got):
        rows = tokens.filter(tokens["id"] == f"r{i}").sort("position")
        for c in g["consultations"]:
            row = rows.row(c["position"], named=True)
            assert c["entropy"] == pytest.approx(row["entropy"], abs=1e-5)
            assert c["varentropy"] == pytest.approx(row["varentropy"], abs=1e-4)
            checked += 1
    assert checked >= 3


def sharpened(model, factor: float = 30.0):
    """The same model with its query projections scaled: peaked attention, so that a wrong mask
    or a missed normalisation would show."""
    import copy

    m = copy.deepcopy(model)
    for name, p in m.named_parameters():
        if "q_proj.weight" in name:
            p.data *= factor
    return m


def test_attention_statistics_use_the_valid_context_only(pair):
    """Attention entropy at chosen positions from one padded batch = each sequence alone through
    eager attention (`output_attentions`), each head's entropy over its causal context ÷ log of
    the context length; padding never enters."""
    from reasonlab.guided import attention_stats

    base, _, tok = pair
    m = sharpened(base)
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16], [17, 18, 19, 20, 21]]
    queries = [[1, 4, 8], [2], []]
    got = attention_stats(m, seqs, queries, layer=-1, pad=0, batch_size=8)
    assert got[2] == []
    m.set_attn_implementation("eager")
    spread = []
    for seq, qs, stats in zip(seqs, queries, got, strict=True):
        with torch.no_grad():
            att = (
                m(input_ids=torch.tensor([seq]), output_attentions=True).attentions[-1][0].double()
            )
        for q, st in zip(qs, stats, strict=True):
            p = att[:, q, : q + 1]
            ent = -(p * p.clamp_min(1e-300).log()).sum(-1) / torch.log(
                torch.tensor(q + 1.0).double()
            )
            assert st["context"] == q + 1
            assert st["attn_entropy"] == pytest.approx(float(ent.mean()), abs=1e-6)
            assert st["attn_varentropy"] == pytest.approx(float(ent.var(unbiased=False)), abs=1e-6)
            agree = (p - p.mean(0, keepdim=True)).abs().mean(-1).mean()  # entropix's, valid keys
            assert st["attn_agreement"] == pytest.approx(float(agree), abs=1e-6)
            spread.append(float(ent.mean()))
    assert max(spread) - min(spread) > 0.05  # peaked attention: the values differ
    assert m.config._attn_implementation == "eager"  # restored to what it was


def test_interaction_strength_is_the_mean_absolute_pre_softmax_score():
    """GPT-2 (no rotary embedding): q and k recomputed from the layer's normed input by hand."""
    from test_activations import random_model

    from reasonlab.guided import attention_stats

    m = random_model("gpt2")
    m.config._attn_implementation = "sdpa"
    seq, q = [3, 9, 4, 27, 8, 15], 4
    got = attention_stats(m, [seq, seq[:2]], [[q], [1]], layer=1, pad=0)[0][0]
    block = m.transformer.h[1]
    seen = {}
    hook = block.ln_1.register_forward_hook(lambda mod, a, out: seen.setdefault("x", out))
    with torch.no_grad():
        m(input_ids=torch.tensor([seq]))
    hook.remove()
    heads = m.config.n_head
    with torch.no_grad():
        qkv = block.attn.c_attn(seen["x"][0])
    qs, ks, _ = qkv.split(m.config.n_embd, dim=-1)
    d = m.config.n_embd // heads
    qh = qs.view(len(seq), heads, d).transpose(0, 1).double()
    kh = ks.view(len(seq), heads, d).transpose(0, 1).double()
    scores = (qh[:, q : q + 1] @ kh[:, : q + 1].transpose(-1, -2))[:, 0] / d**0.5  # [heads, q + 1]
    assert got["interaction"] == pytest.approx(float(scores.abs().mean()), rel=1e-6)
    p = torch.softmax(scores, -1)
    ent = -(p * p.log()).sum(-1) / torch.log(torch.tensor(q + 1.0).double())
    assert got["attn_entropy"] == pytest.approx(float(ent.mean()), abs=1e-6)


def test_budget_matching_lands_on_its_target_and_says_so(pair):
    """The entropy threshold and the random rate searched for a target oracle-token fraction: the
    realised fraction recomputed from the sources, the threshold the quantile of the base's own
    statistic at the knob, `matched` exactly when within the tolerance."""
    import numpy as np

    from reasonlab.guided import calibrate, quantile_threshold

    base, oracle, tok = pair
    ps = prompts(tok)
    free = guided_generate(base, oracle, tok, ps, Policy("never"), 24, position_stats=True)
    stats = [s for r in free for s in r["position_stats"]]

    def run(policy):
        return guided_generate(base, oracle, tok, ps, policy, 24)

    for start in (Policy("entropy", c=3, k=3, step_size=4, threshold=0.0),
                  Policy("random", c=3, k=3, step_size=4)):  # fmt: skip
        pol, res, info = calibrate(run, start, 0.25, stats, 24, runs=6, tolerance=0.15)
        frac = np.mean([r["source"].count("oracle") / len(r["source"]) for r in res])
        assert info["realised"] == pytest.approx(frac)
        assert info["matched"] == (abs(frac / 0.25 - 1) <= 0.15)
        assert sum(r["oracle_tokens"] for r in res) <= 3 * 3 * len(ps)
        if start.name == "entropy":
            assert pol.threshold == pytest.approx(
                quantile_threshold(stats, "entropy", info["knob"])
            )
        else:
            assert pol.p0 == pytest.approx(start.p0 * info["knob"])
        assert 1 <= info["runs"] <= 6


def test_grid_cells_and_the_coloured_view(pair):
    from reasonlab.guided import ansi_view, grid_cells, segments

    s = {"grid": {"c": [1, 2], "k": [4], "step_size": [8]}, "budgets": [0.1, 0.2],
         "thresholds": {"top1": [0.3]}}  # fmt: skip
    assert len(grid_cells("never", s)) == 1 and grid_cells("always", s)[0]["target"] == 1.0
    assert [(c["c"], c["target"]) for c in grid_cells("entropy", s)] == [
        (1, 0.1), (1, 0.2), (2, 0.1), (2, 0.2)]  # fmt: skip
    assert [c["threshold"] for c in grid_cells("top1", s)] == [0.3, 0.3]
    assert all(c["target"] is None for c in grid_cells("structural", s))
    _, _, tok = pair
    ids = tok("2 + 3 = 5 so the answer is 5", add_special_tokens=False)["input_ids"]
    src = ["base"] * 3 + ["oracle"] * 2 + ["base"] * (len(ids) - 5)
    segs = segments(tok, ids, src)
    assert [s["source"] for s in segs] == ["base", "oracle", "base"]
    assert [s["n"] for s in segs] == [3, 2, len(ids) - 5]
    assert "".join(s["text"] for s in segs).replace(" ", "") == tok.decode(ids).replace(" ", "")
    view = ansi_view(segs)
    assert view.count("\x1b[1;33m") == 1 and segs[1]["text"] in view


def test_a_guide_job_its_aggregation_and_section(pair, tiny_model_dir, tmp_path):
    """Two tiny checkpoints of one tokenizer through the `guide` job (base alone, oracle alone,
    entropy budget-matched, random), aggregated: each cell's accuracy is its graded problems',
    the oracle-token fraction recomputed from the sources, McNemar's counts recomputed by hand,
    every consultation a point with its attention statistics; the section renders, escaped."""
    import json

    import numpy as np
    import polars as pl
    from test_intervene import SMALL, job_inputs

    from reasonlab import synth
    from reasonlab.guided import guided_job
    from reasonlab.report import build, guided
    from reasonlab.report.guided import aggregate_guided
    from reasonlab.report.html import unpacked

    rows = synth.build_demo_data(0, SMALL)["eval"]
    rows[0] = {**rows[0], "problem": rows[0]["problem"] + " <b>bold?</b>"}
    (tmp_path / "b").mkdir()
    (tmp_path / "o").mkdir()
    job_inputs(tiny_model_dir, tmp_path / "b", rows, "e")
    job_inputs(tiny_model_dir.parent / "oracle-seed1", tmp_path / "o", rows, "e")
    settings = {"max_prompts": 6, "max_new_tokens": 16, "template": "chat", "format": "math",
                "grid": {"c": [2], "k": [3], "step_size": [4]}, "budgets": [0.25],
                "calibration_runs": 4, "tolerance": 0.2, "attention_layer": -1}  # fmt: skip
    words, paths = [], []
    for policy in ("never", "always", "entropy", "random"):
        pre = tmp_path / "g" / policy
        out = guided_job(tmp_path / "b" / "h.json", tmp_path / "o" / "h.json",
                         tmp_path / "b" / "e.parquet", policy, settings, f"{pre}.problems.parquet",
                         f"{pre}.cells.parquet", f"{pre}.points.parquet", progress=False)  # fmt: skip
        words.append(f"tiny/base/tiny/base/e/{policy}")
        paths.append(f"{pre}.cells.parquet")
        probs = pl.read_parquet(f"{pre}.problems.parquet")
        for cell in out["cells"]:
            part = probs.filter(pl.col("cell") == cell["cell"])
            assert part.height == 6 and cell["accuracy"] == pytest.approx(
                part["correct"].fill_null(False).mean()
            )
            frac = np.mean([sum(m) / len(m) for m in part["oracle_mask"]])
            assert cell["oracle_fraction"] == pytest.approx(frac)
            pts = pl.read_parquet(f"{pre}.points.parquet").filter(pl.col("cell") == cell["cell"])
            assert pts.height == part["n_consultations"].sum()
            assert pts["attn_entropy"].is_between(0, 1).all() and (pts["context"] > 0).all()
        if policy == "never":
            assert probs["oracle_tokens"].sum() == 0
        if policy == "always":
            assert all(all(m) for m in probs["oracle_mask"])
    tables = {t: tmp_path / "agg" / f"{t}.parquet" for t in guided.TABLES}
    (tmp_path / "agg").mkdir()
    aggregate_guided(words, paths, tables)
    tests = pl.read_parquet(tables["guided_tests"])
    never = pl.read_parquet(tmp_path / "g" / "never.problems.parquet").sort("id")
    always = pl.read_parquet(tmp_path / "g" / "always.problems.parquet").sort("id")
    a, b = always["correct"].fill_null(False).to_list(), never["correct"].fill_null(False).to_list()
    row = tests.filter(pl.col("policy") == "always").row(0, named=True)
    assert (row["wins"], row["losses"]) == (sum(x and not y for x, y in zip(a, b, strict=True)),
                                            sum(y and not x for x, y in zip(a, b, strict=True)))  # fmt: skip
    assert set(tests["policy"]) == {"always", "entropy", "random"}
    doc = tmp_path / "r.html"
    saved = build.SECTIONS
    try:
        build.SECTIONS = (guided,)
        assert build.build_report(tables, {"title": "t"}, doc) == ["guided"]
    finally:
        build.SECTIONS = saved
    text = unpacked(doc.read_text())
    assert "Accuracy against the oracle-token fraction" in text and 'class="oracle"' in text
    assert "&lt;b&gt;bold?&lt;/b&gt;" in text and "<b>bold?</b>" not in text
    seg = json.loads(always["segments"][0])
    assert [s["source"] for s in seg] == ["oracle"]
    # seed 004's JSONL: its field names, one line per problem of every cell
    from reasonlab.guided import export_seed004

    n = export_seed004(tmp_path / "g" / "entropy.problems.parquet", tmp_path / "seed.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "seed.jsonl").read_text().splitlines()]
    probs = pl.read_parquet(tmp_path / "g" / "entropy.problems.parquet")
    assert n == len(lines) == probs.height
    seed_keys = {"c", "k", "base_model_id", "oracle_model_id", "prompt", "result", "ground_truth",
                 "parsed_answer", "interleaved_outputs", "cheat_positions",
                 "total_tokens_generated", "analysis_result", "acc"}  # fmt: skip
    for line, row in zip(lines, probs.iter_rows(named=True), strict=True):
        assert seed_keys <= set(line) and (line["c"], line["k"]) == (2, 3)
        assert line["acc"] == int(bool(row["correct"])) and line["result"] == row["completion"]
        cons = json.loads(row["consultations"])
        assert line["cheat_positions"] == [c["position"] for c in cons]
        for a, c in zip(line["analysis_result"], cons, strict=True):
            assert set(a) == {
                "position",
                "entropy",
                "varentropy",
                "top_prob",
                "prob_top2_diff",
                "attn_entropy",
                "attn_varentropy",
                "agreement",
                "interaction_strength",
            }
            assert (a["top_prob"], a["interaction_strength"]) == (c["top1"], c["interaction"])
        assert "".join(s["text"] for s in line["interleaved_outputs"]) == "".join(
            s["text"] for s in json.loads(row["segments"])
        )


def test_an_unreachable_oracle_server_is_one_clear_error():
    from reasonlab.guided import ServerOracle

    with pytest.raises(GuidedError, match=r"guided.pairs\[\].server: no oracle server answers at "
                                          r"http://127.0.0.1:9/v1 .*vllm serve"):  # fmt: skip
        ServerOracle("http://127.0.0.1:9", timeout=2)


def test_sampling_is_seeded(pair):
    """Sampled (temperature > 0): the same seed gives the same traces and consultations, another
    seed other traces; greedy decoding is not what sampling gives."""
    base, oracle, tok = pair
    ps = prompts(tok)

    def go(seed):
        pol = Policy("random", c=2, k=3, step_size=4, p0=0.5, seed=seed)
        return guided_generate(base, oracle, tok, ps, pol, max_new_tokens=16, temperature=1.0)

    a, b, c = go(0), go(0), go(1)
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
    assert [r["source"] for r in a] == [r["source"] for r in b]
    assert [r["token_ids"] for r in a] != [r["token_ids"] for r in c]
    greedy_run = guided_generate(base, oracle, tok, ps, Policy("random", c=2, k=3, step_size=4,
                                 p0=0.5, seed=0), max_new_tokens=16)  # fmt: skip
    assert [r["token_ids"] for r in greedy_run] != [r["token_ids"] for r in a]
