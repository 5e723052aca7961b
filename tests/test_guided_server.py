"""Guided inference with the oracle behind a real `vllm serve` (the gen environment's vLLM, started
by this module on a free port; skipped where the gen environment is not built)."""

import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
import torch
from e2e import ROOT

GEN_PY = ROOT / ".venvs" / "gen" / "bin" / "python"
pytestmark = pytest.mark.skipif(
    not GEN_PY.exists(), reason="the gen environment is not built (bash envs/setup.sh gen)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """`vllm serve` of the tiny demo model (float32, prefix caching on): its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    cmd = [str(GEN_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
           "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
           "--max-model-len", "512", "--served-model-name", "oracle", "--enable-prefix-caching"]  # fmt: skip
    with log.open("w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                             env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"})  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while True:
            if p.poll() is not None:
                pytest.fail(f"vllm serve exited ({p.returncode}): {log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"vllm serve did not answer in 300 s: {log.read_text()[-3000:]}")
                time.sleep(2)
        yield url
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def test_a_served_oracle_writes_what_the_local_oracle_writes(served, tiny_model_dir):
    """Base: another tiny model of the same tokenizer; oracle: the served demo model, and the same
    model loaded here. Greedy: the same tokens from the same sources at the same consultation
    points; the agreement on the server's top-20 equals the local oracle's restricted to the same
    tokens; the oracle alone through the server is its greedy generation."""
    from test_guided import pair_models, prompts

    from reasonlab.guided import Policy, ServerOracle, agreement_topk, guided_generate

    local, base, tok = pair_models(tiny_model_dir, torch.float32)  # the oracle: the served model
    server = ServerOracle(served)
    assert server.model == "oracle"
    ps = prompts(tok)
    for policy in (Policy("entropy", c=3, k=4, step_size=4, threshold=0.5), Policy("always")):
        here = guided_generate(base, local, tok, ps, policy, max_new_tokens=24)
        there = guided_generate(base, None, tok, ps, policy, max_new_tokens=24, server=server)
        assert [r["token_ids"] for r in there] == [r["token_ids"] for r in here]
        assert [r["source"] for r in there] == [r["source"] for r in here]
        for p, a, b in zip(ps, here, there, strict=True):
            assert [c["position"] for c in a["consultations"]] == [
                c["position"] for c in b["consultations"]
            ]
            for c in b["consultations"]:
                assert c["agreement_on"] == "top-20"
                ids = torch.tensor([p + b["token_ids"][: c["position"]]])
                with torch.no_grad():
                    lb, lo = base(input_ids=ids).logits[0, -1], local(input_ids=ids).logits[0, -1]
                v, i = torch.topk(torch.log_softmax(lo.double(), -1), 20)
                top = dict(zip(i.tolist(), v.tolist(), strict=True))
                want = agreement_topk(lb, top)
                assert c["top1_match"] == want["top1_match"]
                assert c["kl"] == pytest.approx(want["kl"], abs=1e-3)
                assert c["js"] == pytest.approx(want["js"], abs=1e-3)


def test_a_guide_job_with_a_served_oracle(served, tiny_model_dir, tmp_path):
    """The `guide` job with `server`: the oracle's weights are not loaded, its tokenizer still
    checked; the traces equal the job with the oracle loaded; agreement is on the top-20."""
    import polars as pl
    from test_intervene import SMALL, job_inputs

    from reasonlab import synth
    from reasonlab.guided import guided_job

    rows = synth.build_demo_data(0, SMALL)["eval"]
    (tmp_path / "b").mkdir()
    (tmp_path / "o").mkdir()
    job_inputs(tiny_model_dir.parent / "oracle-seed1", tmp_path / "b", rows, "e")
    job_inputs(tiny_model_dir, tmp_path / "o", rows, "e")
    settings = {"max_prompts": 4, "max_new_tokens": 16, "template": "chat", "format": "math",
                "grid": {"c": [2], "k": [3], "step_size": [4]}, "thresholds": {"entropy": [0.5]}}  # fmt: skip
    out = {}
    for name, server in (("local", None), ("server", {"url": served, "top_logprobs": 20})):
        pre = tmp_path / name
        guided_job(tmp_path / "b" / "h.json", tmp_path / "o" / "h.json", tmp_path / "b" / "e.parquet",
                   "entropy", settings, f"{pre}.problems.parquet", f"{pre}.cells.parquet",
                   f"{pre}.points.parquet", progress=False, server=server)  # fmt: skip
        out[name] = (
            pl.read_parquet(f"{pre}.problems.parquet"),
            pl.read_parquet(f"{pre}.points.parquet"),
        )
    (lp, lpts), (sp, spts) = out["local"], out["server"]
    assert sp["token_ids"].to_list() == lp["token_ids"].to_list()
    assert (
        sp["oracle_mask"].to_list() == lp["oracle_mask"].to_list() and sp["oracle_tokens"].sum() > 0
    )
    assert set(spts["agreement_on"]) == {"top-20"} and set(lpts["agreement_on"]) == {"full"}
    assert spts["position"].to_list() == lpts["position"].to_list()
    assert spts["attn_entropy"].to_list() == pytest.approx(lpts["attn_entropy"].to_list())
