"""Interventions (reasonlab.intervene) against independent computations on random tiny models."""

import copy

import pytest
import torch
from test_activations import random_model

from reasonlab import synth
from reasonlab.activations import ActivationError, decoder_parts, forward_sites, residual_writers
from reasonlab.intervene import (
    DirectionAblator,
    InterventionError,
    InterventionHandler,
    LayerAblator,
    PathPatcher,
    mean_contributions,
    mean_residual_norms,
    record_residuals,
)

ARCHS = ["qwen2", "gpt2"]  # a block returning a tensor, and one returning a tuple


SMALL = synth.DemoSizes(eval=6, pool_per_type=1, control=1, pretrain=1, pairs=8)


def job_inputs(model_dir, tmp_path, rows: list[dict], name: str, fmt: str = "math") -> None:
    """What a job reads: `h.json` (a handle of `model_dir`) and `{name}.parquet` (rows in format
    `fmt`, prepared as the workflow prepares a dataset)."""
    import json

    from reasonlab import data
    from reasonlab.models import resolve, write_handle

    h = resolve("tiny", "base", {"source": str(model_dir), "checkpoints": {"base": None},
                                 "dtype": "float32", "tokenizer": None, "download": False})  # fmt: skip
    write_handle(h, tmp_path / "h.json")
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = data.prepare({"source": str(tmp_path / f"{name}.jsonl"), "format": fmt}, name)
    data.write_prepared(prepared, tmp_path / f"{name}.parquet", tmp_path / f"{name}.rejects.jsonl",
                        tmp_path / f"{name}.summary.json")  # fmt: skip


def hidden(model) -> int:
    return model.get_input_embeddings().weight.shape[1]


def batch(seed=0, n=3, length=9, vocab=97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    return ids, torch.ones_like(ids)


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def greedy(model, ids, n=6):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_strength_zero_reproduces_the_baseline_exactly(arch):
    model = random_model(arch)
    d = torch.randn(hidden(model), dtype=torch.float64)
    ids, mask = batch()
    base, base_gen = logits(model, ids, mask), greedy(model, ids[:1])
    with InterventionHandler(model, d, [0, 1, 3], strength=0.0):
        same, gen = logits(model, ids, mask), greedy(model, ids[:1])
    assert torch.equal(same, base)
    assert torch.equal(gen.sequences, base_gen.sequences)
    assert all(torch.equal(a, b) for a, b in zip(gen.scores, base_gen.scores, strict=True))
    # a non-zero strength changes them
    with InterventionHandler(model, d, [1], strength=4.0):
        assert not torch.allclose(logits(model, ids, mask), base)


@pytest.mark.parametrize("arch", ARCHS)
def test_steering_adds_the_vector_at_its_site_and_relative_strength_scales_by_the_norm(arch):
    model = random_model(arch)
    parts = decoder_parts(model)
    n = parts.n_layers
    d = torch.randn(hidden(model), dtype=torch.float64)
    ids, mask = batch()
    base = forward_sites(model, parts, ids, mask, [1])[1]
    with InterventionHandler(model, d, [1], strength=2.5):
        steered = forward_sites(model, parts, ids, mask, [1])[1]
    torch.testing.assert_close(steered - base, (2.5 * d).float().expand_as(base), rtol=0, atol=1e-5)
    norms = mean_residual_norms(model, [(ids, mask)], [1, n])
    want = torch.linalg.vector_norm(base.double(), dim=-1).mean().item()
    assert norms[1] == pytest.approx(want, rel=1e-6)
    with InterventionHandler(model, d, [1], strength=0.5, norms=norms):
        rel = forward_sites(model, parts, ids, mask, [1])[1]
    added = (rel - base).double()
    assert torch.linalg.vector_norm(added, dim=-1).mean().item() == pytest.approx(
        0.5 * norms[1], rel=1e-4
    )
    cos = torch.nn.functional.cosine_similarity(added[0, 0], d, dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-5)
    # the last site (the last layer's output before the final norm) is steered too
    final = forward_sites(model, parts, ids, mask, [n])[n]
    with InterventionHandler(model, d, [n], strength=1.0):
        torch.testing.assert_close(
            forward_sites(model, parts, ids, mask, [n])[n] - final,
            d.float().expand_as(final), rtol=0, atol=1e-5,
        )  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_the_steering_hook_fires_once_per_decode_step(arch):
    model = random_model(arch)
    d = torch.randn(hidden(model))
    ids, _ = batch(n=2)
    seen = []
    parts = decoder_parts(model)
    probe = parts.layers[2].register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True
    )
    try:
        with InterventionHandler(model, d, [2], strength=1.0) as h:
            greedy(model, ids, n=6)
        with InterventionHandler(model, d, [2], strength=1.0, positions="generated") as g:
            greedy(model, ids, n=6)
    finally:
        probe.remove()
    # 6 new tokens: one prompt pass, then 5 decode steps of one token each (KV cache)
    assert seen[:6] == [ids.shape[1], 1, 1, 1, 1, 1]
    assert h.calls == {2: 6}
    assert g.calls == {2: 5}


@pytest.mark.parametrize("arch", ARCHS)
def test_ablation_leaves_every_hooked_residual_orthogonal(arch):
    model = random_model(arch)
    parts = decoder_parts(model)
    d = torch.randn(hidden(model), dtype=torch.float64)
    u = (d / d.norm()).float()
    ids, mask = batch()
    seen = []

    def record(x):
        x = x[0] if isinstance(x, tuple | list) else x
        seen.append(x.detach().clone())

    with DirectionAblator(model, d):
        # registered after the ablator's hooks: they see what the model sees next
        extra = []
        for block in parts.layers:
            extra.append(block.register_forward_pre_hook(
                lambda m, a, k: record(a[0] if a else k["hidden_states"]), with_kwargs=True))  # fmt: skip
            for w in residual_writers(block):
                extra.append(w.register_forward_hook(lambda m, a, o: record(o)))
        extra.append(parts.layers[-1].register_forward_hook(lambda m, a, o: record(o)))
        try:
            logits(model, ids, mask)
        finally:
            for e in extra:
                e.remove()
    assert (
        len(seen) == parts.n_layers * 3 + 1
    )  # each input, attention and MLP output; the last output
    for x in seen:
        dots = (x.double() @ u.double()).abs()
        assert (dots <= 1e-5 * torch.linalg.vector_norm(x.double(), dim=-1).clamp_min(1e-6)).all()


def test_hooks_are_removed_after_an_exception_inside_the_context():
    model = random_model("qwen2")
    before = hook_counts(model)
    d = torch.randn(hidden(model))
    ids, mask = batch()
    src = record_residuals(model, ids, mask, [0, 1])
    means = mean_contributions(model, [(ids, mask)], [1])
    for make in (
        lambda: InterventionHandler(model, d, [0, 2], 1.0),
        lambda: DirectionAblator(model, d),
        lambda: LayerAblator(model, [1], "mean", means),
        lambda: PathPatcher(model, src, [0, 1]),
    ):
        with pytest.raises(RuntimeError, match="boom"), make():
            assert hook_counts(model) != before
            raise RuntimeError("boom")
        assert hook_counts(model) == before


@pytest.mark.parametrize("arch", ARCHS)
def test_patching_every_site_and_position_reproduces_the_source(arch):
    model = random_model(arch)
    n = decoder_parts(model).n_layers
    src_ids, mask = batch(seed=1)
    tgt_ids, _ = batch(seed=2)
    src = record_residuals(model, src_ids, mask, list(range(n + 1)))
    want = logits(model, src_ids, mask)
    with PathPatcher(model, src, list(range(n + 1)), "all") as p:
        got = logits(model, tgt_ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert p.calls == dict.fromkeys(range(n + 1), 1)
    # patching only some positions of one site changes the target only from there on
    base = logits(model, tgt_ids, mask)
    with PathPatcher(model, src, [1], positions=[4]):
        part = logits(model, tgt_ids, mask)
    torch.testing.assert_close(part[:, :4], base[:, :4], rtol=0, atol=0)
    assert not torch.allclose(part[:, 4], base[:, 4])


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_ablation_equals_the_model_without_the_layer(arch):
    model = random_model(arch)
    ids, mask = batch()
    without = copy.deepcopy(model)
    parts = decoder_parts(without)
    del parts.layers[1]
    for i, block in enumerate(parts.layers):  # keep each remaining layer's own index
        for mod in block.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = i
    with LayerAblator(model, [1], "zero"):
        got = logits(model, ids, mask)
    torch.testing.assert_close(got, logits(without, ids, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_mean_ablation_replaces_the_contribution_by_its_mean_exactly(arch):
    model = random_model(arch)
    parts = decoder_parts(model)
    ids, mask = batch(n=4)
    means = mean_contributions(model, [(ids[:2], mask[:2]), (ids[2:], mask[2:])], [1])
    # the mean, computed independently from the recorded residuals around layer 1
    sites = forward_sites(model, parts, ids, mask, [1, 2])
    independent = (sites[2] - sites[1]).double().reshape(-1, hidden(model)).mean(0)
    torch.testing.assert_close(means[1], independent, rtol=1e-6, atol=1e-7)
    with LayerAblator(model, [1], "mean", means):
        after = forward_sites(model, parts, ids, mask, [1, 2])
    contribution = after[2] - after[1]
    torch.testing.assert_close(
        contribution, means[1].float().expand_as(contribution), rtol=0, atol=1e-6
    )


def test_bad_interventions_are_one_clear_error():
    model = random_model("qwen2")
    with pytest.raises(InterventionError, match=r"shape \(16,\) does not fit .*hidden size 32"):
        InterventionHandler(model, torch.randn(16), [1], 1.0)
    with pytest.raises(InterventionError, match="hidden size 32"):
        DirectionAblator(model, torch.randn(64))
    with pytest.raises(ActivationError, match="intervention layers: layer 7 is out of range"):
        InterventionHandler(model, torch.randn(32), [7], 1.0)
    with pytest.raises(InterventionError, match="layer 3 is the last layer's output"):
        LayerAblator(model, [3], "zero")
    with pytest.raises(InterventionError, match="no mean contribution for layer"):
        LayerAblator(model, [1], "mean")
    with pytest.raises(InterventionError, match="'half'"):
        LayerAblator(model, [1], "half")
    with pytest.raises(InterventionError, match="no reference norm"):
        InterventionHandler(model, torch.randn(32), [1], 1.0, norms={0: 1.0})
    ids, mask = batch()
    src = record_residuals(model, ids, mask, [1])
    with pytest.raises(InterventionError, match="source has no residual at site"):
        PathPatcher(model, src, [2])
    with PathPatcher(model, src, [1]), pytest.raises(InterventionError, match="same shape"):
        logits(model, ids[:, :5], mask[:, :5])


def test_a_sweep_records_each_setting_with_entropy_and_first_token_kl(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasonlab.generate import GenOptions, render_prompts
    from reasonlab.intervene import Setting, sweep, sweep_settings

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = [{"id": str(i), "question": q, "system": None}
            for i, q in enumerate(["What is 2 + 3?", "Name a colour.", "Count to three."])]  # fmt: skip
    opts = GenOptions(template="chat", max_new_tokens=6, batch_size=2, logprobs=2)
    prompts = render_prompts(rows, tok, opts)
    d = torch.randn(hidden(model), generator=torch.Generator().manual_seed(0))
    settings = sweep_settings("steer", layers=[1], strengths=[0.0, 30.0]) + [
        Setting("steer nan", "steer", float("nan"), (1,))
    ]
    records, status = sweep(model, tok, prompts, settings, opts, direction=d, progress=False)
    assert [s["setting"] for s in status] == ["baseline", "steer +0", "steer +30", "steer nan"]
    assert [s["status"] for s in status][:3] == ["ok"] * 3
    assert status[3]["status"].startswith("failed: non-finite logits at generated token 1")
    by = {}
    for r in records:
        by.setdefault(r["setting"], []).append(r)
    assert set(by) == {"baseline", "steer +0", "steer +30"}  # the failed setting has no rows
    for a, b in zip(by["baseline"], by["steer +0"], strict=True):
        assert a["token_ids"] == b["token_ids"] and a["entropy_mean"] == b["entropy_mean"]
        assert b["first_token_kl"] == pytest.approx(0.0, abs=1e-12)
    assert max(r["first_token_kl"] for r in by["steer +30"]) > 1e-3
    # entropy of the generated tokens: recomputed by teacher forcing the baseline's own tokens
    for r in by["baseline"]:
        ids = torch.tensor([r["prompt_ids"] + r["token_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        n_p, n = len(r["prompt_ids"]), len(r["token_ids"])
        ent = -(lp.exp() * lp).sum(-1)[n_p - 1 : n_p - 1 + n]
        assert r["entropy_mean"] == pytest.approx(ent.mean().item(), rel=1e-4, abs=1e-5)
    with pytest.raises(InterventionError, match="unknown intervention kind 'boost'"):
        sweep_settings("boost")
    per_layer = sweep_settings("ablate_layer", layers=[0, 2], methods=["zero", "mean"])
    assert [(s.name, s.layers) for s in per_layer[1:]] == [
        ("zero layers 0", (0,)), ("zero layers 2", (2,)), ("mean layers 0", (0,)), ("mean layers 2", (2,))
    ]  # fmt: skip
    joint = sweep_settings("ablate_layer", layers=[0, 2], methods=["zero"], jointly=True)
    assert [(s.name, s.layers) for s in joint[1:]] == [("zero layers 0,2", (0, 2))]


def test_an_intervene_job_writes_graded_settings_and_their_summary(tiny_model_dir, tmp_path):
    import json

    import polars as pl

    from reasonlab.intervene import intervene_job

    job_inputs(tiny_model_dir, tmp_path, synth.build_demo_data(0, SMALL)["eval"], "e")
    settings = {"kind": "ablate_layer", "layers": [0], "methods": ["zero", "mean"],
                "max_prompts": 4, "max_new_tokens": 5, "format": "math"}  # fmt: skip
    intervene_job(tmp_path / "h.json", tmp_path / "e.parquet", "layer0", settings,
                  tmp_path / "t.parquet", tmp_path / "st.parquet", progress=False)  # fmt: skip
    table, st = pl.read_parquet(tmp_path / "t.parquet"), pl.read_parquet(tmp_path / "st.parquet")
    assert st["setting"].to_list() == ["baseline", "zero layers 0", "mean layers 0"]
    assert st["status"].to_list() == ["ok"] * 3 and st["n"].to_list() == [4] * 3
    assert table.height == 12 and {"correct", "reference", "setting", "entropy_mean"} <= set(
        table.columns
    )
    for s in st.iter_rows(named=True):  # the summary is the table's own
        part = table.filter(pl.col("setting") == s["setting"])
        assert s["accuracy"] == part["correct"].fill_null(False).mean()
        assert s["mean_tokens"] == part["n_completion_tokens"].mean()
    base = table.filter(pl.col("setting") == "baseline")
    assert base["first_token_kl"].max() == pytest.approx(0.0, abs=1e-12)
    # a steer spec reads the chosen direction as `directions` writes it; none chosen: a failed row
    (tmp_path / "chosen.json").write_text(
        json.dumps({"chosen": None, "note": "no candidate passed"})
    )
    steer = {"kind": "steer", "layers": "chosen", "strengths": [1.0], "max_prompts": 2,
             "max_new_tokens": 3}  # fmt: skip
    intervene_job(tmp_path / "h.json", tmp_path / "e.parquet", "s", steer, tmp_path / "t2.parquet",
                  tmp_path / "st2.parquet", chosen_path=tmp_path / "chosen.json",
                  pt_path=tmp_path / "none.pt", progress=False)  # fmt: skip
    st2 = pl.read_parquet(tmp_path / "st2.parquet")
    assert st2["status"].to_list()[0] == "skipped"
    assert st2["status"].to_list()[1].startswith("failed: no direction was chosen")
    chosen = {"chosen": {"position": "last_prompt", "layer": 1}}
    (tmp_path / "chosen.json").write_text(json.dumps(chosen))
    torch.save({"chosen": {"position": "last_prompt", "layer": 1,
                           "direction": torch.randn(64)}}, tmp_path / "d.pt")  # fmt: skip
    with pytest.raises(InterventionError, match=r"interventions.specs.s: .*hidden size 128"):
        intervene_job(tmp_path / "h.json", tmp_path / "e.parquet", "s", steer,
                      tmp_path / "t3.parquet", tmp_path / "st3.parquet",
                      chosen_path=tmp_path / "chosen.json", pt_path=tmp_path / "d.pt",
                      progress=False)  # fmt: skip


def test_a_relative_steer_job_scales_by_the_norm_and_records_marker_log_odds(
    tiny_model_dir, tmp_path
):
    """The job's relative strength is a multiple of the mean residual norm on its own prompts
    (recomputed here with plain hidden states), and the marker log-odds of the first generated
    token are those of an unpadded forward of each prompt."""
    import json

    import numpy as np
    import polars as pl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasonlab.intervene import intervene_job, mean_interval

    job_inputs(tiny_model_dir, tmp_path, synth.build_demo_data(0, SMALL)["eval"], "e")
    (tmp_path / "chosen.json").write_text(
        json.dumps({"chosen": {"position": "last_prompt", "layer": 1}})
    )
    d = torch.randn(128, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.save(
        {"chosen": {"position": "last_prompt", "layer": 1, "direction": d}}, tmp_path / "d.pt"
    )
    steer = {"kind": "steer", "layers": "chosen", "strengths": [0.5], "max_prompts": 4,
             "max_new_tokens": 3, "markers": ["<think>", "Step"]}  # fmt: skip
    intervene_job(tmp_path / "h.json", tmp_path / "e.parquet", "s", steer, tmp_path / "t.parquet",
                  tmp_path / "st.parquet", chosen_path=tmp_path / "chosen.json",
                  pt_path=tmp_path / "d.pt", progress=False)  # fmt: skip
    st, table = pl.read_parquet(tmp_path / "st.parquet"), pl.read_parquet(tmp_path / "t.parquet")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    norms, odds = [], []
    base = table.filter(pl.col("setting") == "baseline")
    for ids in base["prompt_ids"].to_list():
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        norms += torch.linalg.vector_norm(out.hidden_states[1][0].double(), dim=-1).tolist()
        lp = torch.log_softmax(out.logits[0, -1].double(), -1)
        marks = [tok("<think>", add_special_tokens=False)["input_ids"][0],
                 tok("Step", add_special_tokens=False)["input_ids"][0]]  # fmt: skip
        p = float(torch.logsumexp(lp[marks], 0).exp())
        odds.append(np.log(p / (1 - p)))
    row = st.filter(pl.col("setting") == "steer +0.5").row(0, named=True)
    assert row["scale"] == "relative" and row["norm"] == pytest.approx(np.mean(norms), rel=1e-5)
    assert base["marker_logodds"].to_list() == pytest.approx(odds, abs=1e-3)
    b = st.filter(pl.col("setting") == "baseline").row(0, named=True)
    assert (b["logodds_ci_low"], b["logodds_ci_high"]) == pytest.approx(
        mean_interval(odds), abs=1e-3
    )
    lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert (lo, hi) == pytest.approx((2 - 1.96 / 3**0.5, 2 + 1.96 / 3**0.5))
    assert mean_interval([1.0]) == (None, None)
