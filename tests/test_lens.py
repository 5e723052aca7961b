"""Logit lens: at the last site it is the model's own distribution; answer prefixes."""

import pytest
import torch
from test_activations import random_model
from transformers import AutoTokenizer

from reasonlab.activations import Text, decoder_parts
from reasonlab.lens import LensText, answer_prefixes, lens_logits, logit_lens


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gpt2"])
def test_the_lens_at_the_last_site_is_the_models_own_distribution(arch):
    model = random_model(arch)
    if arch == "gemma2":
        model.config.final_logit_softcapping = 3.0  # small, so capping changes the logits
    g = torch.Generator().manual_seed(1)
    texts = [LensText(f"t{i}", torch.randint(1, 97, (n,), generator=g).tolist(), 7, {})
             for i, n in enumerate([5, 9, 7])]  # fmt: skip
    rows = logit_lens(model, _Tok(), texts, layers="all", top_k=3, batch_size=2)
    n = decoder_parts(model).n_layers
    last = [r for r in rows if r["layer"] == n]
    assert [r["site"] for r in last] == ["resid_final"] * 3 and len(rows) == 3 * (n + 1)
    for t, r in zip(texts, last, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([t.ids])).logits[0, -1]
        logp = torch.log_softmax(logits.double(), -1)
        assert r["prob"] == pytest.approx(logp[7].exp().item(), rel=1e-5, abs=1e-8)
        assert r["rank"] == int((logp > logp[7]).sum()) + 1
        assert r["top_ids"] == logp.topk(3).indices.tolist()
    # the lens of a middle layer is a different distribution
    parts = decoder_parts(model)
    h = torch.randn(2, model.config.hidden_size)
    assert lens_logits(model, parts, h).shape == (2, model.config.vocab_size)


class _Tok:
    pad_token_id = 0
    eos_token_id = 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_answer_prefixes_end_just_before_the_final_answer(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok(
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )["input_ids"]
    comp = tok(
        "<think>\n2 + 3 = 5.\n</think>\nThe answer is \\boxed{5}.", add_special_tokens=False
    )["input_ids"]
    texts = [Text("a", prompt + comp, len(prompt)), Text("b", prompt + comp, len(prompt))]
    out, skipped = answer_prefixes(texts, ["5", "17"], tok)
    assert skipped == ["b"]
    (lt,) = out
    before = tok.decode(lt.ids[len(prompt) :])
    assert before.endswith("\\boxed{") and tok.decode([lt.target]).startswith("5")
