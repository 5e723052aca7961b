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
