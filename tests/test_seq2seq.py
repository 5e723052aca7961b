"""Encoder–decoder (T5-style) models: loading, generation with transformers, scoring, and vLLM's
refusal, checked on a tiny random T5 against direct calls of the model."""

import copy
import json

import polars as pl
import pytest
import torch
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

from reasonlab import synth
from reasonlab.data import prepare, write_prepared
from reasonlab.generate import (
    COLUMNS,
    GenerationError,
    GenOptions,
    check_backend,
    generate_dataset,
    hf_generate,
    render_prompts,
)
from reasonlab.models import is_encoder_decoder, load_model, resolve, write_handle
from reasonlab.score import ScoreError, ScoreOptions, TextItem, score_items

QUIET = {"progress": False, "compile_stats": False}
TEMPLATE = "{question}\n"
PROMPTS = [
    "What is 2 + 3?\n",
    "A pack holds 4 apples. Ben buys 7 packs. How many apples does Ben have?\n",
    "x\n",
    "Repeat this word: apple.\n",
]


@pytest.fixture(scope="module")
def t5(tiny_model_dir, tmp_path_factory):
    """A tiny random T5 saved with the demo tokenizer (its chat template removed, as T5's have
    none), and a handle of it. Its weights are spread wider than T5's default (initializer_factor)
    so that greedy decoding does not repeat one token, and the end-of-sequence token's embedding is
    1.1 x that of the 4th token greedy decoding gives the first prompt, so that some generations
    end there and others run to the length limit."""
    root = tmp_path_factory.mktemp("t5")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir.parent / "tokenizer")
    tok.chat_template = None
    config = T5Config(
        vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=2, dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id, tie_word_embeddings=True, initializer_factor=3.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    with torch.inference_mode():
        fourth = model.generate(**tok(PROMPTS[0], return_tensors="pt"), max_new_tokens=4)[0, -1]
        model.shared.weight[tok.eos_token_id] = 1.1 * model.shared.weight[fourth]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.decoder_start_token_id = tok.pad_token_id
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    spec = {"source": str(root / "model"), "checkpoints": {"base": None}, "dtype": "float32"}
    handle = resolve("t5", "base", spec)
    write_handle(handle, root / "h.json")
    return root, handle


@pytest.fixture(scope="module")
def loaded(t5):
    model, tok = load_model(t5[1])
    return model, tok


# Scoring is compared in float64 (the model's weights; the statistics stay float32) to 1e-5, and
# in float32 to 1e-4: in float32 a text's hidden states in a padded batch differ from its own by
# the rounding of differently shaped matrix products (~4e-6), which logits up to ~36 turn into
# log-probabilities that differ by ~2e-5; in float64 batched and alone agree to 1e-13.
TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4}


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def scorer(loaded, request):
    """(model in the dtype, tokenizer, tolerance)."""
    model, tok = loaded
    return copy.deepcopy(model).to(request.param), tok, TOLERANCE[request.param]


def test_load_model_picks_the_seq2seq_class(t5, loaded, tiny_model_dir):
    model, tok = loaded
    assert isinstance(model, T5ForConditionalGeneration) and not model.training
    assert is_encoder_decoder(t5[1]) and tok.chat_template is None
    qwen = resolve("tiny", "base", {"source": str(tiny_model_dir), "checkpoints": {"base": None}})
    assert not is_encoder_decoder(qwen)


def test_chat_template_without_one_is_a_clear_error(loaded):
    _, tok = loaded
    rows = [{"id": "1", "question": "What is 2 + 3?", "system": None}]
    with pytest.raises(GenerationError, match="generation.template is 'chat'.*no chat template"):
        render_prompts(rows, tok, GenOptions())
    assert render_prompts(rows, tok, GenOptions(template=TEMPLATE)) == ["What is 2 + 3?\n"]


def test_greedy_generation_equals_generate_on_each_prompt_alone(loaded):
    model, tok = loaded
    opts = GenOptions(backend="transformers", template=TEMPLATE, max_new_tokens=10, logprobs=3,
                      batch_size=4)  # fmt: skip
    seen = []

    def extra(step_logits, new, lengths):
        seen.append((len(step_logits), new.clone(), list(lengths)))
        return [{"n_kept": n} for n in lengths]

    out = hf_generate(model, tok, torch.device("cpu"), PROMPTS, opts, extra=extra)
    assert len(out) == len(PROMPTS) and all(len(s) == 1 for s in out)
    (n_steps, new, lengths), = seen  # fmt: skip
    assert new.shape == (len(PROMPTS), n_steps)  # one logits tensor per generated token
    start = model.config.decoder_start_token_id
    for i, (prompt, (rec,)) in enumerate(zip(PROMPTS, out, strict=True)):
        # the encoder's input, this prompt alone: no padding
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        assert ref.sequences[0, 0] == start  # the decoder's start token: not a generated token
        toks = ref.sequences[0, 1:].tolist()
        if tok.eos_token_id in toks:
            toks = toks[: toks.index(tok.eos_token_id) + 1]
        assert rec["token_ids"] == toks and len(toks) > 0
        assert rec["prompt_ids"] == ids[0].tolist() and rec["n_prompt_tokens"] == ids.shape[1]
        assert rec["n_kept"] == lengths[i] == len(toks) and new[i, : len(toks)].tolist() == toks
        lp = torch.stack([torch.log_softmax(x[0].float(), -1) for x in ref.logits[: len(toks)]])
        want = lp.gather(1, torch.tensor(toks)[:, None])[:, 0]
        # float32, batched with left padding: within the rounding of TOLERANCE's note (seen: 4e-6)
        assert torch.allclose(torch.tensor(rec["token_logprobs"]), want, atol=1e-4)
        top = lp.topk(3, dim=-1)
        assert rec["top_ids"] == top.indices.tolist()
        assert torch.allclose(torch.tensor(rec["top_logprobs"]), top.values, atol=1e-4)
        finished = toks[-1] == tok.eos_token_id
        assert rec["finish_reason"] == ("stop" if finished else "length")
        assert rec["completion"] == tok.decode(toks, skip_special_tokens=True)
    assert {rec["finish_reason"] for (rec,) in out} == {"stop", "length"}


def test_generate_dataset_with_transformers(t5, tmp_path):
    root, _ = t5
    rows = synth.build_demo_data(
        0, synth.DemoSizes(pool_per_type=1, eval=3, control=1, pretrain=1)
    )["eval"]
    src = tmp_path / "eval.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = prepare({"source": str(src), "format": "math", "columns": {}}, "eval")
    write_prepared(p, tmp_path / "eval.parquet", tmp_path / "rej.jsonl", tmp_path / "sum.json")
    opts = GenOptions(backend="transformers", template=TEMPLATE, max_new_tokens=6, batch_size=2)
    summary = generate_dataset(root / "h.json", tmp_path / "eval.parquet", tmp_path / "out.parquet",
                               opts, progress=False)  # fmt: skip
    table = pl.read_parquet(tmp_path / "out.parquet")
    assert summary["completions"] == 3 and table.columns == COLUMNS
    for r in table.iter_rows(named=True):
        assert len(r["token_ids"]) == r["n_completion_tokens"] == len(r["token_logprobs"]) > 0
        assert r["n_prompt_tokens"] == len(r["prompt_ids"]) and r["backend"] == "transformers"


def test_vllm_refuses_an_encoder_decoder_model(t5, tiny_model_dir):
    _, handle = t5
    with pytest.raises(GenerationError) as e:
        check_backend("vllm", handle, "vllm")
    msg = str(e.value)
    assert "t5/base" in msg and "encoder–decoder" in msg and "vLLM does not serve" in msg
    assert "set generation.backend: transformers" in msg
    with pytest.raises(GenerationError, match=r"'auto' resolved to vllm"):
        check_backend("vllm", handle, "auto")
    check_backend("transformers", handle, "transformers")  # no error
    qwen = resolve("tiny", "base", {"source": str(tiny_model_dir), "checkpoints": {"base": None}})
    check_backend("vllm", qwen, "vllm")  # a decoder-only model: no error (vLLM is not started)


ITEMS = [
    TextItem("a", "What is 2 + 3?\n", "2 + 3 = 5. The answer is \\boxed{5}."),
    TextItem("b", "Repeat this word: apple.\n", " apple"),
    TextItem("c", "A pack holds 4 apples. Ben buys 7 packs. How many?\n", "7 * 4 = 28, so 28."),
    TextItem("d", "Say hello.\n", ""),
    TextItem("e", "x\n", "Step 1: 10 * 3 = 30.\nStep 2: 30 - 4 = 26.\nStep 3: 26 / 2 = 13."),
]


def direct(model, tok, item: TextItem) -> dict:
    """Per-token statistics of `item`'s completion from the model's own logits, one text alone:
    model(input_ids=prompt, labels=completion) (the decoder reads [start] + completion[:-1])."""
    p = tok(item.prompt)["input_ids"]
    c = tok(item.completion, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([p]), labels=torch.tensor([c])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    pr = lp.exp()
    tgt = torch.tensor(c)
    entropy = -(pr * lp).sum(-1)
    return {
        "token_id": c,
        "logprob": lp.gather(1, tgt[:, None])[:, 0],
        "entropy": entropy,
        "varentropy": (pr * (lp + entropy[:, None]) ** 2).sum(-1),
        "rank": (logits > logits.gather(1, tgt[:, None])).sum(-1) + 1,
        "top1_id": logits.argmax(-1),
        "n_prompt": len(p),
    }


def test_scores_equal_the_models_own_logits(scorer):
    model, tok, tol = scorer
    # several vocabulary blocks and head passes, to go through the blocked statistics
    opts = ScoreOptions(chunk_elements=4096, head_positions=16, **QUIET)
    tokens, seqs = score_items(model, tok, ITEMS, opts)
    assert not tokens["is_prompt"].any()
    for it in ITEMS:
        got = tokens.filter(pl.col("id") == it.id)
        seq = seqs.filter(pl.col("id") == it.id).row(0, named=True)
        if not it.completion:  # nothing to score
            assert seq["n_tokens"] == got.height == 0 and seq["llh_sum"] is None
            continue
        want = direct(model, tok, it)
        assert seq["n_tokens"] == len(want["token_id"]) == got.height
        assert seq["n_prompt_tokens"] == want["n_prompt"]
        assert got["token_id"].to_list() == want["token_id"]
        assert got["position"].to_list() == list(range(1, got.height + 1))  # generation steps
        for k in ("logprob", "entropy", "varentropy"):
            assert torch.allclose(torch.tensor(got[k].to_numpy()), want[k], atol=tol), k
        assert got["rank"].to_list() == want["rank"].tolist()
        assert got["top1_id"].to_list() == want["top1_id"].tolist()
        assert abs(seq["llh_sum"] - float(want["logprob"].sum())) < 10 * tol


def test_scores_are_batch_invariant(scorer):
    model, tok, tol = scorer
    together, seq_together = score_items(model, tok, ITEMS, ScoreOptions(**QUIET))
    alone = [score_items(model, tok, [it], ScoreOptions(**QUIET)) for it in ITEMS]
    tokens_alone = pl.concat([t for t, _ in alone])
    assert together["id"].to_list() == tokens_alone["id"].to_list()
    assert together["token_id"].to_list() == tokens_alone["token_id"].to_list()
    for k in ("logprob", "entropy", "varentropy", "margin"):
        diff = (together[k] - tokens_alone[k]).abs().max()
        assert diff < tol, (k, diff)
    assert together["rank"].to_list() == tokens_alone["rank"].to_list()
    assert seq_together["n_tokens"].to_list() == [s["n_tokens"][0] for _, s in alone]


def test_generated_tokens_score_as_the_generator_saw_them(loaded):
    model, tok = loaded
    opts = GenOptions(template=TEMPLATE, max_new_tokens=8, batch_size=4)
    out = hf_generate(model, tok, torch.device("cpu"), PROMPTS, opts)
    items = [
        TextItem(str(i), p, s["completion"], completion_ids=s["token_ids"],
                 prompt_ids=s["prompt_ids"], completion_logprobs=s["token_logprobs"])
        for i, (p, (s,)) in enumerate(zip(PROMPTS, out, strict=True))
    ]  # fmt: skip
    tokens, seqs = score_items(model, tok, items, ScoreOptions(**QUIET))
    assert seqs["n_tokens"].to_list() == [len(s["token_ids"]) for (s,) in out]
    assert seqs["max_abs_logprob_diff"].max() < 1e-4


def test_prompt_scope_and_joint_boundary_are_refused(loaded):
    model, tok = loaded
    with pytest.raises(ScoreError, match="score.scope 'all'.*encoder–decoder.*scope: completion"):
        score_items(model, tok, ITEMS, ScoreOptions(scope="all", **QUIET))
    with pytest.raises(ScoreError, match="score.boundary 'joint'.*boundary: separate"):
        score_items(model, tok, ITEMS, ScoreOptions(boundary="joint", **QUIET))
    with pytest.raises(ScoreError, match="empty prompt"):
        score_items(model, tok, [TextItem("z", "", "abc")], ScoreOptions(**QUIET))


def test_logits_changed_after_the_head_are_refused(loaded):
    model, tok = loaded
    bias = torch.randn(model.config.vocab_size)

    def add_bias(module, args, output):  # as BART's final_logits_bias does
        output.logits = output.logits + bias
        return output

    hook = model.register_forward_hook(add_bias)
    try:
        with pytest.raises(ScoreError, match="not its output head applied"):
            score_items(model, tok, ITEMS[:2], ScoreOptions(**QUIET))
    finally:
        hook.remove()
