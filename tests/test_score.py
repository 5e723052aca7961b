"""Token scoring, checked against independent computations."""

import math

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasonlab.score import (
    ScoreError,
    ScoreOptions,
    TextItem,
    batches,
    head_stats,
    score_items,
    token_stats,
)

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    # sharpen the random model so that distributions are far from uniform
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


ITEMS = [
    TextItem(
        "a",
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
        "<think>\n2 + 3 = 5.\n</think>\nThe answer is \\boxed{5}.",
    ),
    TextItem("b", "Repeat this word: apple.", " apple"),
    TextItem(
        "c",
        "A pack holds 4 apples. Ben buys 7 packs. How many apples does Ben have?",
        " 7 * 4 = 28, so 28 apples in all.",
    ),
    TextItem("d", "Say hello.", ""),
    TextItem("e", "x", "Step 1: 10 * 3 = 30.\nStep 2: 30 - 4 = 26.\nStep 3: 26 / 2 = 13."),
]


def test_entropy_and_varentropy_match_categorical():
    torch.manual_seed(0)
    logits = torch.randn(64, 1000) * 3
    targets = torch.randint(0, 1000, (64,))
    st = token_stats(logits, targets)
    dist = torch.distributions.Categorical(logits=logits)
    assert torch.allclose(st["entropy"], dist.entropy(), atol=1e-5)
    surprisal = -dist.logits  # normalized log-probabilities
    var = (dist.probs * (surprisal - dist.entropy()[:, None]) ** 2).sum(-1)
    assert torch.allclose(st["varentropy"], var, atol=1e-5)
    assert torch.allclose(st["logprob"], dist.log_prob(targets), atol=1e-5)
    order = logits.argsort(-1, descending=True)
    assert torch.equal(st["rank"], (order == targets[:, None]).float().argmax(-1) + 1)
    assert torch.equal(st["top1_id"], order[:, 0])
    sorted_p = dist.probs.sort(-1, descending=True).values
    assert torch.allclose(st["margin"], sorted_p[:, 0] - sorted_p[:, 1], atol=1e-6)
    assert torch.allclose(st["top1_logprob"].exp(), sorted_p[:, 0], atol=1e-6)


def test_uniform_and_one_hot_limits():
    v = 4096
    st = token_stats(torch.zeros(3, v), torch.tensor([0, 5, v - 1]))
    assert torch.allclose(st["entropy"], torch.full((3,), math.log(v)), atol=1e-5)
    assert torch.allclose(st["varentropy"], torch.zeros(3), atol=1e-5)
    assert torch.allclose(st["logprob"], torch.full((3,), -math.log(v)), atol=1e-5)
    one_hot = torch.full((2, v), float("-inf"))
    one_hot[0, 7] = 0.0
    one_hot[1, 9] = 3.0
    st = token_stats(one_hot, torch.tensor([7, 9]))
    assert torch.equal(st["entropy"], torch.zeros(2)) and torch.equal(
        st["varentropy"], torch.zeros(2)
    )
    assert torch.equal(st["logprob"], torch.zeros(2)) and torch.equal(
        st["rank"], torch.ones(2, dtype=torch.long)
    )
    # a very peaked but finite distribution: numerically one-hot
    peaked = torch.zeros(1, v)
    peaked[0, 3] = 1e4
    st = token_stats(peaked, torch.tensor([3]))
    assert float(st["entropy"][0]) == pytest.approx(0.0, abs=1e-6)


def test_statistics_are_float32_whatever_the_input_dtype():
    logits = torch.randn(8, 300) * 2
    st32 = token_stats(logits, torch.arange(8))
    st16 = token_stats(logits.bfloat16(), torch.arange(8))
    assert st16["entropy"].dtype == torch.float32
    ref = torch.distributions.Categorical(logits=logits.bfloat16().float()).entropy()
    assert torch.allclose(st16["entropy"], ref, atol=1e-5) and not torch.equal(
        st16["entropy"], st32["entropy"]
    )


def hf_llh(model, ids, n_prompt):
    """Log-likelihood of ids[n_prompt:] from the model's own `labels=` cross-entropy loss."""
    x = torch.tensor([ids])
    labels = x.clone()
    labels[0, :n_prompt] = -100
    with torch.no_grad():
        loss = model(input_ids=x, labels=labels).loss
    return -float(loss) * (len(ids) - n_prompt)


def test_llh_matches_the_models_own_loss(lm):
    model, tok = lm
    tokens, seqs = score_items(model, tok, ITEMS, ScoreOptions(**QUIET))
    for it in ITEMS:
        if not it.completion:
            continue
        p = tok(it.prompt, add_special_tokens=False)["input_ids"]
        c = tok(it.completion, add_special_tokens=False)["input_ids"]
        row = seqs.filter(pl.col("id") == it.id).row(0, named=True)
        assert row["n_tokens"] == len(c) and row["n_prompt_tokens"] == len(p)
        assert row["llh_sum"] == pytest.approx(hf_llh(model, p + c, len(p)), abs=1e-3)
        assert row["llh_mean"] == pytest.approx(row["llh_sum"] / len(c))
        assert row["perplexity"] == pytest.approx(math.exp(-row["llh_mean"]))
        mine = tokens.filter(pl.col("id") == it.id)
        assert mine["position"].to_list() == list(range(1, len(c) + 1))
        assert mine["token_id"].to_list() == c  # prompt tokens never scored
        assert row["entropy_mean"] == pytest.approx(mine["entropy"].mean())
        assert row["entropy_max"] == pytest.approx(mine["entropy"].max())
    assert tokens["entropy"].std() > 0.1  # the sharpened model is far from uniform


def completion_logits(model, tok, item):
    """The model's own logits at the positions predicting the completion's tokens, and those ids."""
    p = tok(item.prompt, add_special_tokens=False)["input_ids"]
    c = tok(item.completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1], c


def test_per_token_values_match_full_logits(lm):
    model, tok = lm
    it = ITEMS[0]
    tokens, _ = score_items(model, tok, [it], ScoreOptions(**QUIET))
    logits, c = completion_logits(model, tok, it)
    dist = torch.distributions.Categorical(logits=logits)
    assert torch.allclose(
        torch.tensor(tokens["entropy"].to_numpy()), dist.entropy().double(), atol=1e-5
    )
    assert torch.allclose(
        torch.tensor(tokens["logprob"].to_numpy()),
        dist.log_prob(torch.tensor(c)).double(),
        atol=1e-5,
    )
    assert tokens["top1_id"].to_list() == logits.argmax(-1).tolist()
    assert tokens["token"].to_list() == [tok.decode([t]) for t in c]


def near_tie(model, tok, item, position, tol=1e-5) -> bool:
    """Whether the logit of the token at `position` has another within `tol` (relative) of it."""
    p = tok(item.prompt, add_special_tokens=False)["input_ids"]
    c = tok(item.completion, add_special_tokens=False)["input_ids"]
    ids = p + c
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, position - 1].double()
    t = logits[ids[position]]
    close = (logits - t).abs() <= tol * (1 + t.abs())
    return int(close.sum()) > 1


def test_independent_of_batching_and_order(lm):
    model, tok = lm
    together, seq_a = score_items(model, tok, ITEMS, ScoreOptions(token_budget=4096, **QUIET))
    singles = [
        score_items(model, tok, [it], ScoreOptions(token_budget=16, max_batch=1, **QUIET))
        for it in ITEMS
    ]
    one_by_one = pl.concat([t for t, _ in singles])
    reordered, seq_r = score_items(model, tok, ITEMS[::-1], ScoreOptions(token_budget=64, **QUIET))
    key = ["id", "position"]
    for other in (one_by_one, reordered):
        a, b = together.sort(key), other.sort(key)
        assert a.select(key + ["token_id"]).equals(b.select(key + ["token_id"]))
        # rank and top-1 are equal except at a tie within the logits' rounding (another batch
        # shape moves the last bits of every logit)
        differ = a.with_columns(rank_b=b["rank"], top1_b=b["top1_id"]).filter(
            (pl.col("rank") != pl.col("rank_b")) | (pl.col("top1_id") != pl.col("top1_b"))
        )
        assert differ.height <= 2, differ
        for r in differ.iter_rows(named=True):
            assert abs(r["rank"] - r["rank_b"]) <= 1
            assert near_tie(model, tok, next(it for it in ITEMS if it.id == r["id"]), r["position"])
        for col in ("logprob", "entropy", "varentropy", "margin", "top1_prob"):
            assert (a[col] - b[col]).abs().max() <= 1e-5, col
    assert seq_a["id"].to_list() == [it.id for it in ITEMS]  # input order kept
    assert seq_r["id"].to_list() == [it.id for it in ITEMS[::-1]]


def test_empty_completion_is_a_row_with_null_statistics(lm):
    model, tok = lm
    _, seqs = score_items(model, tok, ITEMS, ScoreOptions(**QUIET))
    d = seqs.filter(pl.col("id") == "d").row(0, named=True)
    assert (
        d["n_tokens"] == 0
        and d["llh_sum"] is None
        and d["perplexity"] is None
        and d["entropy_mean"] is None
    )
    _, only = score_items(model, tok, [ITEMS[3]], ScoreOptions(**QUIET))
    assert only.height == 1 and only["n_tokens"].to_list() == [0]


def test_scope_all_scores_every_token_after_the_first(lm):
    model, tok = lm
    it = ITEMS[2]
    tokens, seqs = score_items(model, tok, [it], ScoreOptions(scope="all", **QUIET))
    ids = (
        tok(it.prompt, add_special_tokens=False)["input_ids"]
        + tok(it.completion, add_special_tokens=False)["input_ids"]
    )
    assert tokens.height == len(ids) - 1 and tokens["token_id"].to_list() == ids[1:]
    assert seqs["llh_sum"][0] == pytest.approx(hf_llh(model, ids, 1), abs=1e-3)
    n_prompt = len(tok(it.prompt, add_special_tokens=False)["input_ids"])
    assert tokens["is_prompt"].sum() == n_prompt - 1


def test_joint_boundary_splits_at_the_prompts_last_character(lm):
    model, tok = lm
    it = TextItem("j", "The answer is 2", "8.")  # "2" and "8" may merge across the boundary
    tokens, seqs = score_items(model, tok, [it], ScoreOptions(boundary="joint", **QUIET))
    joint = tok(it.prompt + it.completion, add_special_tokens=False, return_offsets_mapping=True)
    n_prompt = seqs["n_prompt_tokens"][0]
    assert (
        joint["offset_mapping"][n_prompt - 1][1]
        <= len(it.prompt)
        < joint["offset_mapping"][n_prompt][1]
    )
    assert tokens["token_id"].to_list() == joint["input_ids"][n_prompt:]
    assert seqs["llh_sum"][0] == pytest.approx(
        hf_llh(model, joint["input_ids"], n_prompt), abs=1e-3
    )


def test_exact_completion_ids_are_used_as_given(lm):
    model, tok = lm
    ids = tok(" apple", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    tokens, seqs = score_items(
        model,
        tok,
        [TextItem("g", "Repeat this word: apple.", completion_ids=ids)],
        ScoreOptions(**QUIET),
    )
    assert tokens["token_id"].to_list() == ids and seqs["n_tokens"][0] == len(ids)


def test_too_long_texts_follow_the_truncation_policy(lm):
    model, tok = lm
    it = ITEMS[2]
    n_p = len(tok(it.prompt, add_special_tokens=False)["input_ids"])
    n_c = len(tok(it.completion, add_special_tokens=False)["input_ids"])
    with pytest.raises(ScoreError, match=r"text 'c': \d+ tokens exceed the limit of 20"):
        score_items(model, tok, [it], ScoreOptions(max_length=20, **QUIET))
    _, left = score_items(
        model, tok, [it], ScoreOptions(max_length=n_c + 5, truncation="left", **QUIET)
    )
    assert left["truncated"][0] and left["n_tokens"][0] == n_c and left["n_prompt_tokens"][0] == 5
    _, right = score_items(
        model, tok, [it], ScoreOptions(max_length=n_p + 3, truncation="right", **QUIET)
    )
    assert right["truncated"][0] and right["n_tokens"][0] == 3
    _, fine = score_items(model, tok, [it], ScoreOptions(**QUIET))
    assert not fine["truncated"][0]


def test_mismatched_tokenizer_and_nan_logits_are_clear_errors(lm, tmp_path):
    model, tok = lm
    tok2 = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok2.add_tokens([f"<extra{i}>" for i in range(5)])
    with pytest.raises(
        ScoreError, match=r"demo/base: the tokenizer has \d+ tokens but the model's vocabulary has"
    ):
        score_items(model, tok2, ITEMS[:1], ScoreOptions(**QUIET), where="demo/base")
    # NaN hidden states (the output head never runs as a module: it is applied block by block)
    hook = model.model.norm.register_forward_hook(lambda m, i, o: o * float("nan"))
    try:
        with pytest.raises(
            ScoreError,
            match=r"demo/base: non-finite \(NaN or \+inf\) logits while scoring text '(a|c|e|b)'",
        ):
            score_items(model, tok, ITEMS, ScoreOptions(**QUIET), where="demo/base")
    finally:
        hook.remove()


def test_a_nan_or_inf_in_one_vocabulary_row_names_the_text_and_minus_inf_is_probability_zero(lm):
    model, tok = lm
    w = model.get_output_embeddings().weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[7] = float("nan")
        with pytest.raises(
            ScoreError, match=r"non-finite \(NaN or \+inf\) logits while scoring text"
        ):
            score_items(model, tok, ITEMS[:2], ScoreOptions(**QUIET), where="m/c")
    finally:
        with torch.no_grad():
            w.copy_(saved)
    # -inf logits (masked tokens, here through a bias): probability 0, every statistic exact
    head = model.get_output_embeddings()
    bias = torch.zeros(w.shape[0])
    bias[10:20] = float("-inf")
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        it = ITEMS[0]
        tokens, _ = score_items(model, tok, [it], ScoreOptions(**QUIET))
        logits, c = completion_logits(model, tok, it)
        assert torch.isneginf(logits[:, 10:20]).all()
        dist = torch.distributions.Categorical(logits=logits)
        got = torch.tensor(tokens["entropy"].to_numpy())
        assert torch.isfinite(got).all() and torch.allclose(got, dist.entropy().double(), atol=1e-5)
        assert torch.allclose(torch.tensor(tokens["logprob"].to_numpy()),
                              dist.log_prob(torch.tensor(c)).double(), atol=1e-5)  # fmt: skip
    finally:
        head.bias = None


def float64_stats(logits, targets) -> dict:
    """The statistics from float32 logits, computed independently in float64."""
    lf = logits.double()
    lp = torch.log_softmax(lf, -1)
    p = lp.exp()
    entropy = -(p * torch.where(p > 0, lp, 0.0)).sum(-1)
    varentropy = (p * torch.where(p > 0, lp + entropy[:, None], 0.0) ** 2).sum(-1)
    top = lp.topk(2, -1)
    return {"logprob": lp.gather(1, targets[:, None])[:, 0], "entropy": entropy, "varentropy": varentropy,
            "top1_logprob": top.values[:, 0], "margin": top.values[:, 0].exp() - top.values[:, 1].exp(),
            "rank": (lf > lf.gather(1, targets[:, None])).sum(-1) + 1, "top1_id": top.indices[:, 0]}  # fmt: skip


def assert_close_to_float64(st, logits, targets):
    ref = float64_stats(logits, targets)
    for k in ("logprob", "entropy", "varentropy", "top1_logprob", "margin"):
        got, want = st[k].double(), ref[k]
        assert ((got - want).abs() <= 1e-5 + 1e-5 * want.abs()).all(), (k, (got - want).abs().max())
    # rank and top-1: equal but at ties within the logits' rounding
    lt = logits.gather(1, targets[:, None])
    for i in (st["rank"] != ref["rank"]).nonzero()[:, 0].tolist():
        close = ((logits[i] - lt[i]).abs() <= 1e-5 * (1 + lt[i].abs())).sum()
        assert close > 1 and abs(int(st["rank"][i]) - int(ref["rank"][i])) < close
    for i in (st["top1_id"] != ref["top1_id"]).nonzero()[:, 0].tolist():
        assert logits[i].max() - logits[i, st["top1_id"][i]] <= 1e-5 * (1 + logits[i].max().abs())


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("block", [1, 7, 100, 999, 1000, 4096])
def test_head_stats_match_float64_for_any_vocabulary_block(block, compiled):
    torch.manual_seed(1)
    h, w = torch.randn(33, 48), torch.randn(1000, 48) * 0.7
    targets = torch.randint(0, 1000, (33,))
    st = head_stats(h, w, targets, vocab_block=block, compiled=compiled)
    assert st["finite"].all()
    assert_close_to_float64(st, h @ w.T, targets)
    whole = head_stats(h, w, targets, vocab_block=1000)  # the same results for any block size
    for k in ("logprob", "entropy", "varentropy"):
        assert torch.allclose(st[k], whole[k], atol=1e-5, rtol=1e-5)
    assert torch.equal(st["rank"], whole["rank"]) and torch.equal(st["top1_id"], whole["top1_id"])


@pytest.mark.parametrize("compiled", [False, True])
def test_head_stats_stay_exact_for_peaked_and_spread_logits(compiled):
    # logits spread over 1e4: distributions with one token at ~1 - 1e-30 and others far below; a
    # varentropy computed as E[x^2] - E[x]^2 on unshifted logits would cancel to garbage
    torch.manual_seed(2)
    h = torch.randn(40, 32) * torch.logspace(-1, 3, 40)[:, None]
    w = torch.randn(500, 32)
    targets = torch.randint(0, 500, (40,))
    logits = h @ w.T
    assert (logits.max(-1).values - logits.min(-1).values).max() > 1e4
    st = head_stats(h, w, targets, vocab_block=64, compiled=compiled)
    assert_close_to_float64(st, logits, targets)
    assert (st["varentropy"] >= 0).all() and torch.isfinite(st["varentropy"]).all()


def test_head_stats_with_soft_capping_and_half_precision_weights():
    torch.manual_seed(3)
    h, w = torch.randn(16, 32) * 3, torch.randn(300, 32)
    targets = torch.randint(0, 300, (16,))
    capped = head_stats(h, w, targets, softcap=5.0, vocab_block=50)
    assert_close_to_float64(capped, torch.tanh((h @ w.T) / 5.0) * 5.0, targets)
    hb, wb = h.bfloat16(), w.bfloat16()
    st = head_stats(hb, wb, targets, vocab_block=50)
    assert st["entropy"].dtype is torch.float32  # statistics in float32 whatever the model dtype
    assert_close_to_float64(st, torch.nn.functional.linear(hb, wb).float(), targets)


def test_batches_respect_the_token_budget():
    lengths = [5, 50, 20, 20, 3, 49, 7]
    plan = batches(lengths, token_budget=100, max_batch=3)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    for b in plan:
        assert len(b) * max(lengths[i] for i in b) <= 100 and len(b) <= 3
    assert plan[0][0] == 1  # longest first


def test_tokenizer_without_pad_token_scores_the_same(lm):
    # padding positions are masked out, so the pad id never matters: no pad token is needed
    model, tok = lm
    nopad = AutoTokenizer.from_pretrained(tok.name_or_path)
    nopad.pad_token = None
    assert nopad.pad_token_id is None
    _, a = score_items(model, tok, ITEMS, ScoreOptions(**QUIET))
    _, b = score_items(model, nopad, ITEMS, ScoreOptions(**QUIET))
    assert a["n_tokens"].to_list() == b["n_tokens"].to_list()
    for col in ("llh_sum", "entropy_mean", "perplexity"):
        assert (a[col] - b[col]).abs().max() <= 1e-6, col


def test_exact_prompt_ids_and_generator_logprobs(lm):
    """A generator's exact tokens are scored as given (even where re-tokenizing the text would
    differ), its log-probabilities sit beside the scorer's, and the largest difference is reported."""
    model, tok = lm
    prompt_ids = tok("Count: 1 2 3", add_special_tokens=False)["input_ids"]
    comp_ids = tok(" 4 5 6", add_special_tokens=False)["input_ids"]
    x = torch.tensor([prompt_ids + comp_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits[0].double(), -1)
    n = len(prompt_ids)
    truth = [float(lp[n + k - 1, t]) for k, t in enumerate(comp_ids)]
    reported = [v + (0.02 if k == 1 else 0.0) for k, v in enumerate(truth)]
    reported[-1] = None  # a step the generator gave no log-probability for
    items = [
        # the prompt text differs from the ids on purpose: the ids win
        TextItem(
            "gen",
            "unrelated text",
            "",
            completion_ids=comp_ids,
            prompt_ids=prompt_ids,
            completion_logprobs=reported,
        ),  # fmt: skip
        TextItem(
            "ref", "Say hello.", " hello"
        ),  # an ordinary item in the same call (joint boundary)
    ]
    tokens, seqs = score_items(model, tok, items, ScoreOptions(boundary="joint", **QUIET))
    mine = tokens.filter(pl.col("id") == "gen")
    assert mine["token_id"].to_list() == comp_ids
    assert mine["logprob"].to_list() == pytest.approx(truth, abs=1e-4)
    assert mine["gen_logprob"].to_list()[:-1] == pytest.approx(reported[:-1])
    assert mine["gen_logprob"].to_list()[-1] is None
    assert tokens.filter(pl.col("id") == "ref")["gen_logprob"].is_null().all()
    row = seqs.filter(pl.col("id") == "gen").row(0, named=True)
    assert row["n_prompt_tokens"] == n
    assert row["max_abs_logprob_diff"] == pytest.approx(0.02, abs=1e-4)
    assert row["gen_llh_sum"] == pytest.approx(sum(reported[:-1]))


def test_generated_items_from_a_graded_table():
    from reasonlab.score import generated_items

    df = pl.DataFrame(
        {"id": ["q1", "q1", "q2", "q2"], "sample": [0, 1, 0, 1], "prompt": ["p1", "p1", "p2", "p2"],
         "completion": ["a", "b", "c", "d"], "finish_reason": ["stop", "length", "stop", "stop"],
         "prompt_ids": [[1, 2]] * 2 + [[3]] * 2, "token_ids": [[5], [6, 7], [8], []],
         "token_logprobs": [[-0.1], [-0.2, -0.3], [-0.4], []], "correct": [True, False, None, True]}
    )  # fmt: skip
    items = generated_items(df, "eval", "m/final")
    assert [it.id for it in items] == ["q1#0", "q1#1", "q2#0", "q2#1"]
    assert items[1].completion_ids == [6, 7] and items[1].prompt_ids == [1, 2]
    assert items[1].completion_logprobs == [-0.2, -0.3]
    assert [it.meta["type"] for it in items] == ["correct", "incorrect", None, "correct"]
    assert items[0].meta["generator"] == "m/final" and items[1].meta["finish_reason"] == "length"
    single = generated_items(df.filter(pl.col("sample") == 0), "eval", "m/final")
    assert [it.id for it in single] == ["q1", "q2"]  # one sample per prompt: the plain id


def test_sizes_on_a_cpu_and_from_free_gpu_memory(lm):
    from reasonlab.score import CPU_SIZES, gpu_sizes, sized

    model, _ = lm
    opts = sized(ScoreOptions(token_budget=512), model, "cpu")
    assert opts.token_budget == 512  # what was set stays
    assert (opts.chunk_elements, opts.head_positions) == (
        CPU_SIZES["chunk_elements"],
        CPU_SIZES["head_positions"],
    )
    # a 1.5 B model (hidden 1 536, intermediate 8 960, bf16) with 60 GiB free on an 80 GB GPU
    g = gpu_sizes(1536, 8960, 2, 60 * 2**30)
    assert g["token_budget"] == min(int(0.5 * 60 * 2**30 / ((6 * 1536 + 3 * 8960) * 2)), 131072)
    assert (
        g["token_budget"] > 16 * 2048
        and g["chunk_elements"] == 2**28
        and g["head_positions"] == 4096
    )
    # nearly full: never below the CPU sizes
    assert gpu_sizes(1536, 8960, 2, 10 * 2**20) == {
        "token_budget": 2048,
        "chunk_elements": 2**21,
        "head_positions": 4096,
    }
