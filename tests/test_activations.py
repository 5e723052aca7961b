"""Activation capture: sites on four architectures, position rules under padding, the content-keyed
store (only new texts computed, resume after a kill, two jobs at once), and reading back."""

import copy
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from reasonlab.activations import (
    ActivationError,
    CaptureOptions,
    Store,
    Text,
    batch_activations,
    capture,
    check_layers,
    dataset_texts,
    decoder_parts,
    forward_sites,
    index_frame,
    load,
    parse_positions,
    post_instruction_tokens,
)

ARCHS = {
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=97),
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=97),
    "gemma2": dict(model_type="gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=97,
                   sliding_window=16),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=3, n_head=4, vocab_size=97, n_positions=64),
}  # fmt: skip


def random_model(arch: str):
    cfg = dict(ARCHS[arch])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().eval()


def texts_of(lengths, n_prompt, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        Text(f"t{i}", torch.randint(1, vocab, (n,), generator=g).tolist(), p, {"set": "s"})
        for i, (n, p) in enumerate(zip(lengths, n_prompt, strict=True))
    ]


def without_final_norm(model):
    """A copy whose final norm is the identity: its last `output_hidden_states` entry is then the
    last layer's output before the norm (the reference for `resid_final`)."""
    m = copy.deepcopy(model)
    parent = m.transformer if hasattr(m, "transformer") else m.model
    name = "ln_f" if hasattr(m, "transformer") else "norm"
    setattr(parent, name, torch.nn.Identity())
    return m


def assert_rel_close(a, b, rel=1e-5):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = b.abs().max().clamp_min(1e-12)
    assert ((a - b).abs().max() / scale).item() <= rel, ((a - b).abs().max() / scale).item()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_sites_equal_hidden_states_and_the_pre_norm_residual(arch):
    model = random_model(arch)
    parts = decoder_parts(model)
    n = parts.n_layers
    ids = torch.randint(1, 97, (1, 11))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        pre_norm = without_final_norm(model)(
            input_ids=ids, output_hidden_states=True
        ).hidden_states[-1]
    # (transformers installs hooks of its own on a first output_hidden_states call)
    hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in parts.layers]
    got = forward_sites(model, parts, ids, mask, list(range(n + 1)))
    for layer in range(n):
        assert_rel_close(got[layer], hs[layer])
    assert_rel_close(got[n], pre_norm)
    # hidden_states[-1] is after the final norm: not the same site
    assert not torch.allclose(got[n], hs[n], atol=1e-3)
    # our hooks are gone (the model's own, where it has any, are untouched)
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in parts.layers] == hooks


def test_capture_stops_at_the_deepest_requested_layer():
    model = random_model("qwen2")
    parts = decoder_parts(model)
    calls = []
    h = parts.layers[2].register_forward_pre_hook(lambda m, a: calls.append(1))
    head = model.lm_head.register_forward_hook(lambda m, a, o: calls.append("head"))
    ids = torch.randint(1, 97, (2, 5))
    forward_sites(model, parts, ids, torch.ones_like(ids), [0, 1])
    h.remove(), head.remove()
    assert calls == []  # neither layer 2 nor the output head ran


def test_unsupported_architecture_and_bad_layers_are_one_clear_error():
    class Odd(torch.nn.Module):
        config = type("C", (), {"model_type": "oddformer"})()

    with pytest.raises(ActivationError, match="Odd .*oddformer.*unsupported architecture"):
        decoder_parts(Odd())
    with pytest.raises(
        ActivationError, match=r"activations.layers: layer 9 is out of range .* 3 layers"
    ):
        check_layers([0, 9], 3)
    assert check_layers([-1, 0], 3) == [0, 3]
    assert check_layers("all", 2) == [0, 1, 2]
    with pytest.raises(ActivationError, match="unknown position 'middle'"):
        parse_positions(["middle"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_every_position_rule_under_padding_matches_unpadded_single_forwards(side):
    model = random_model("llama")
    parts = decoder_parts(model)
    n = parts.n_layers
    texts = texts_of([9, 14, 6, 12], [5, 8, 6, 4])  # the third has an empty completion
    layers = [0, 2, n]
    positions = parse_positions(
        ["last_prompt", "prompt_tail:3", "completion_mean", "completion_all"]
    )
    every = {texts[0].key, texts[1].key}
    out = batch_activations(
        model, parts, texts, layers, positions, every, pad_id=0, padding_side=side
    )
    ref_model = without_final_norm(model)
    off = 0
    for i, t in enumerate(texts):
        with torch.no_grad():
            hs = ref_model(input_ids=torch.tensor([t.ids]), output_hidden_states=True).hidden_states
        ref = torch.stack([hs[layer][0] for layer in layers])  # [layers, seq, hidden]
        assert_rel_close(out["last_prompt"][i], ref[:, t.n_prompt - 1])
        assert_rel_close(out["prompt_tail:3"][i], ref[:, t.n_prompt - 3 : t.n_prompt])
        comp = ref[:, t.n_prompt :]
        if comp.shape[1]:
            assert_rel_close(out["completion_mean"][i], comp.mean(1))
        else:
            assert torch.isnan(out["completion_mean"][i]).all()
        k = out["completion_all.counts"][i].item()
        assert k == (len(t.ids) - t.n_prompt if t.key in every else 0)
        if k:
            assert_rel_close(out["completion_all"][off : off + k], comp.transpose(0, 1))
        off += k
    assert off == out["completion_all"].shape[0]


def test_post_instruction_tokens_and_a_tail_past_the_prompt(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    k = post_instruction_tokens(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    tail = tok.decode(tok(text, add_special_tokens=False)["input_ids"][-k:])
    assert tail.startswith("<|im_end|>") and tail.rstrip().endswith("assistant")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    texts = [Text("short", [5, 6], 2)]
    with pytest.raises(
        ActivationError, match=r"prompt_tail:3 reaches past the prompt of text 'short'"
    ):
        capture(model, tok, texts, Store("/nonexistent/never-written"),
                CaptureOptions(positions=["prompt_tail:3"], progress=False))  # fmt: skip


def counting(model):
    """A forward-pass counter (a pre-hook on the first decoder layer)."""
    calls = []
    decoder_parts(model).layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def test_the_store_computes_only_new_texts_and_shares_one_checkpoint(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    calls = counting(model)
    texts = texts_of([12] * 23, [7] * 23, vocab=300)
    opts = CaptureOptions(
        positions=["last_prompt", "completion_mean"], batch_size=5, progress=False
    )
    first = capture(model, tok, texts[:10], Store(tmp_path / "s"), opts)
    assert len(calls) == math.ceil(10 / 5) and first["computed"] == 10
    calls.clear()
    more = capture(model, tok, texts, Store(tmp_path / "s"), opts)  # 13 new texts
    assert len(calls) == math.ceil(13 / 5) and more["computed"] == 13 and more["reused"] == 10
    calls.clear()
    # the same checkpoint under another model name reads the same store: nothing to compute
    again = capture(model, tok, texts, Store(tmp_path / "s"), opts)
    assert calls == [] and again["computed"] == 0
    # read back in the index's order, equal to a direct computation
    idx = index_frame(texts, again["index"])
    got = load(idx, tmp_path / "s", "last_prompt", layers=[0, 2])
    parts = decoder_parts(model)
    direct = batch_activations(model, parts, texts[17:18], [0, 2], parse_positions(["last_prompt"]),
                               set(), pad_id=0)["last_prompt"][0]  # fmt: skip
    assert got.shape == (23, 2, model.config.hidden_size)
    assert_rel_close(got[17], direct)


def test_bfloat16_storage(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = texts_of([10] * 4, [6] * 4, vocab=300)
    o32 = CaptureOptions(positions=["last_prompt"], progress=False)
    o16 = CaptureOptions(positions=["last_prompt"], progress=False, store_dtype="bfloat16")
    a = load(index_frame(texts, capture(model, tok, texts, Store(tmp_path / "a"), o32)["index"]),
             tmp_path / "a", "last_prompt")  # fmt: skip
    b = load(index_frame(texts, capture(model, tok, texts, Store(tmp_path / "b"), o16)["index"]),
             tmp_path / "b", "last_prompt")  # fmt: skip
    assert np.abs(a - b).max() <= 2**-7 * np.abs(a).max() and not np.array_equal(a, b)


CHILD = textwrap.dedent(
    """
    import os, signal, sys, json
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from reasonlab.activations import CaptureOptions, Store, Text, capture, decoder_parts
    model_dir, store, n, kill_after, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    calls = []
    def hook(m, a):
        calls.append(1)
        if kill_after and len(calls) > kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-job, as SLURM does
    decoder_parts(model).layers[0].register_forward_pre_hook(hook)
    g = torch.Generator().manual_seed(0)
    texts = [Text(f"t{i}", torch.randint(1, 300, (12,), generator=g).tolist(), 7) for i in range(40)]
    texts = texts[start:start + n]
    res = capture(model, tok, texts, Store(store), CaptureOptions(positions=["last_prompt"], batch_size=4, progress=False), poll_s=0.2)
    print(json.dumps({"passes": len(calls), "computed": res["computed"]}))
    """
)


def run_child(tiny_model_dir, store, n, kill_after=0, start=0, wait=True):
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        str(tiny_model_dir),
        str(store),
        str(n),
        str(kill_after),
        str(start),
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p.communicate(timeout=300) + (p.returncode,) if wait else p


def test_a_killed_capture_resumes_from_its_last_finished_batch(tiny_model_dir, tmp_path):
    out, err, rc = run_child(tiny_model_dir, tmp_path / "s", 20, kill_after=3)
    assert rc == -9, err
    shards = list((tmp_path / "s" / "shards").glob("*.json"))
    assert len(shards) == 3  # three finished batches of 4; the fourth was killed before writing
    assert list((tmp_path / "s" / "claims").glob("*.json"))  # the dead job's claim is left behind
    out, err, rc = run_child(tiny_model_dir, tmp_path / "s", 20)
    assert rc == 0, err
    res = json.loads(out.splitlines()[-1])
    assert res == {"passes": math.ceil(8 / 4), "computed": 8}  # its claim is stale: taken over


def test_two_jobs_at_once_never_compute_one_text_twice(tiny_model_dir, tmp_path):
    a = run_child(tiny_model_dir, tmp_path / "s", 30, start=0, wait=False)
    b = run_child(tiny_model_dir, tmp_path / "s", 30, start=10, wait=False)
    ra, rb = (json.loads(p.communicate(timeout=300)[0].splitlines()[-1]) for p in (a, b))
    assert a.returncode == 0 and b.returncode == 0
    keys = [
        k
        for f in (tmp_path / "s" / "shards").glob("*.json")
        for k in json.loads(f.read_text())["texts"]
    ]
    assert len(keys) == len(set(keys)) == 40  # texts 0-39, each written once
    assert ra["computed"] + rb["computed"] == 40


def test_dataset_prompts_are_rendered_as_generation_renders_them(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    df = pl.DataFrame({"id": ["a", "b"], "question": ["What is 2+2?", "Name a prime."],
                       "system": [None, None], "type": ["x", "y"], "level": [1, 2]})  # fmt: skip
    texts = dataset_texts(df, tok, "chat", None, "reasoning")
    want = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    assert texts[0].ids == tok(want, add_special_tokens=False)["input_ids"]
    assert texts[0].n_prompt == len(texts[0].ids)
    assert texts[1].labels == {"set": "reasoning", "type": "y", "level": "2", "correct": None}
    fmt = dataset_texts(df, tok, "Q: {question}\nA:", None, "plain")
    assert tok.decode(fmt[0].ids) == "Q: What is 2+2?\nA:"


def test_dataset_prompts_with_their_reference_solutions(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    df = pl.DataFrame({"id": ["a", "b"], "question": ["What is 2+2?", "Name a prime."],
                       "solution": ["2 + 2 = 4.", "Seven."], "system": [None, None],
                       "type": ["correct", "wrong"], "level": [None, None]})  # fmt: skip
    texts = dataset_texts(df, tok, "chat", None, "traces", solution=True)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                     add_generation_prompt=True)  # fmt: skip
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert texts[0].n_prompt == len(p_ids)
    assert texts[0].ids == p_ids + tok("2 + 2 = 4.", add_special_tokens=False)["input_ids"]
    assert [t.labels["type"] for t in texts] == ["correct", "wrong"]
    # without the flag, the same rows are prompts only
    assert dataset_texts(df, tok, "chat", None, "traces")[0].ids == p_ids
    empty = df.with_columns(pl.Series("solution", ["2 + 2 = 4.", " "]))
    with pytest.raises(ActivationError, match=r"prompt_sets\.traces: .*ids b"):
        dataset_texts(empty, tok, "chat", None, "traces", solution=True)


def test_generations_are_captured_on_their_exact_token_ids():
    from reasonlab.activations import generation_texts

    df = pl.DataFrame({"id": ["a", "a", "b"], "sample": [0, 1, 0], "prompt_ids": [[1, 2, 3], [1, 2, 3], [4, 5]],
                       "token_ids": [[7, 8], [9], []], "correct": [True, False, None], "level": [1, 1, 2]})  # fmt: skip
    texts = generation_texts(df, "gens")
    assert [t.id for t in texts] == ["a#0", "a#1", "b#0"]  # several samples: id#sample
    assert texts[0].ids == [1, 2, 3, 7, 8] and texts[0].n_prompt == 3
    assert [t.labels["type"] for t in texts] == ["correct", "incorrect", None]
    assert texts[2].labels == {"set": "gens", "level": "2", "correct": None, "type": None}
    assert texts[0].key != texts[1].key  # different completions, different store entries
