"""Reasoning directions: difference of means, the interventions they are scored with, the choice."""

import math

import numpy as np
import polars as pl
import pytest
import torch
from test_activations import random_model, texts_of
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasonlab.activations import (
    CaptureOptions,
    Store,
    capture,
    decoder_parts,
    forward_sites,
    index_frame,
    load,
    residual_writers,
)
from reasonlab.directions import (
    DirectionError,
    DirectionOptions,
    _side,
    candidate_directions,
    choose,
    kl_rows,
    log_odds,
    score_candidates,
    split_side,
)
from reasonlab.intervene import ablate_direction, add_direction


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gpt2"])
def test_ablation_leaves_every_hooked_residual_orthogonal_to_the_direction(arch):
    model = random_model(arch)
    parts = decoder_parts(model)
    d = torch.randn(model.config.hidden_size if arch != "gpt2" else model.config.n_embd)
    u = d / d.norm()
    seen = []
    ids = torch.randint(1, 97, (2, 9))
    with ablate_direction(model, d):
        hooks = [w.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
                 for b in parts.layers for w in residual_writers(b)]  # fmt: skip
        got = forward_sites(
            model, parts, ids, torch.ones_like(ids), list(range(parts.n_layers + 1))
        )
        for h in hooks:
            h.remove()
    assert len(seen) == 2 * parts.n_layers and len(got) == parts.n_layers + 1
    for x in [*got.values(), *seen]:
        assert (x @ u).abs().max().item() <= 1e-5 * max(1.0, x.abs().max().item())
    # and the hooks are gone: the model computes as before
    base = forward_sites(model, parts, ids, torch.ones_like(ids), [1])[1]
    assert (base @ u).abs().max().item() > 1e-3


def test_adding_a_direction_shifts_exactly_that_site():
    model = random_model("llama")
    parts = decoder_parts(model)
    ids = torch.randint(1, 97, (2, 6))
    mask = torch.ones_like(ids)
    base = forward_sites(model, parts, ids, mask, [0, 1, 2, 3])
    d = torch.randn(32)
    with add_direction(model, d, [2], strength=3.0):
        got = forward_sites(model, parts, ids, mask, [0, 1, 2, 3])
    for layer in (0, 1):
        torch.testing.assert_close(got[layer], base[layer])
    # the hook added at layer 2's input is seen by hooks registered after it
    torch.testing.assert_close(got[2], base[2] + 3.0 * d, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[3], base[3])


def test_difference_of_means_equals_numpy(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pos, neg = (
        texts_of([10] * 9, [10] * 9, vocab=300, seed=1),
        texts_of([8] * 7, [8] * 7, vocab=300, seed=2),
    )
    opts = CaptureOptions(positions=["last_prompt", "prompt_tail:2"], batch_size=4, progress=False)
    store = Store(tmp_path / "s")
    pdf = index_frame(pos, capture(model, tok, pos, store, opts)["index"])
    ndf = index_frame(neg, capture(model, tok, neg, store, opts)["index"])
    ptr, _ = split_side(9, 0.3, 0, 64)
    ntr, _ = split_side(7, 0.3, 1, 64)
    cands = candidate_directions(
        pdf, ndf, tmp_path / "s", ["last_prompt", "prompt_tail:2"], [0, 1, 2], ptr, ntr
    )
    xp = load(pdf, tmp_path / "s", "prompt_tail:2").astype(np.float64)
    xn = load(ndf, tmp_path / "s", "prompt_tail:2").astype(np.float64)
    want = xp[ptr].mean(0) - xn[ntr].mean(0)  # [layers, 2, hidden]
    by = {(c["position"], c["layer"]): c["direction"] for c in cands}
    assert ("tail-1", 2) not in by  # the same position as last_prompt: one candidate
    np.testing.assert_allclose(by[("tail-2", 0)], want[0, 0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(by[("last_prompt", 1)], want[1, 1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(by[("last_prompt", 2)], want[2, 1], rtol=1e-6, atol=1e-7)
    assert len(cands) == 2 * 3


def test_scores_filters_and_the_choice(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (6, 9, 7, 8)]
    d = np.random.default_rng(0).normal(size=model.config.hidden_size)
    cands = [
        {"position": "last_prompt", "layer": layer, "direction": d * s}
        for layer, s in ((0, 0.0), (1, 5.0), (2, 5.0))
    ]
    rows, deltas = score_candidates(model, tok, cands, prompts[:2], prompts[2:],
                                    DirectionOptions(markers=("<think>",), kl_max=10.0), 2, progress=False)  # fmt: skip
    zero = rows[0]  # a zero direction changes nothing
    assert zero["induce"] == pytest.approx(0, abs=1e-5) and zero["kl"] == pytest.approx(0, abs=1e-6)
    assert (
        "induce" in zero["filtered_by"]
        and rows[2]["filtered_by"]
        and "depth" in rows[2]["filtered_by"]
    )
    assert set(deltas) == {("last_prompt", 0), ("last_prompt", 1), ("last_prompt", 2)}
    rows_ = [
        {"position": "a", "layer": 1, "bypass": -2.0, "passes": True},
        {"position": "b", "layer": 2, "bypass": -3.0, "passes": False},
        {"position": "c", "layer": 3, "bypass": -1.0, "passes": True},
    ]
    assert choose(rows_)["position"] == "a" and choose([rows_[1]]) is None


def test_metric_and_kl():
    v = 10
    logp = torch.log_softmax(torch.zeros(1, v), -1)
    assert log_odds(logp, [1, 2])[0] == pytest.approx(math.log(2 / 8))
    a = torch.log_softmax(torch.tensor([[1.0, 2.0, float("-inf")]]), -1)
    b = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0]]), -1)
    p = a.exp().double()
    assert kl_rows(a, b)[0] == pytest.approx(
        float((p[0, :2] * (a[0, :2] - b[0, :2]).double()).sum())
    )


def test_an_empty_side_is_one_clear_error(tmp_path):
    path = tmp_path / "i.parquet"
    pl.DataFrame({"id": ["a", "b"], "type": ["correct", "correct"]}).write_parquet(path)
    with pytest.raises(
        DirectionError,
        match=r"directions.contrasts.c.negative: this side has 0 text\(s\) of type 'incorrect'",
    ):
        _side(str(path), "incorrect", "directions.contrasts.c.negative")
