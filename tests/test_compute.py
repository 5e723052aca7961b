"""The device policy (reasonlab.compute): plan-time requests, job-time placement, and that the
placement reaches `from_pretrained`, the input tensors and vLLM's engine arguments — checked here
without a GPU by inspecting what would be passed (tests/test_gpu.py runs them on CUDA)."""

import json
import subprocess
import sys

import pytest
import torch

from reasonlab import compute as cp
from reasonlab.compute import ComputeError, Gpu, Machine, Placement, Request
from reasonlab.generate import GenOptions, vllm_kwargs
from reasonlab.models import Handle, input_device, load_model, resolve, weights_kwargs, write_handle

H100 = Gpu("NVIDIA H100 80GB HBM3", 79.2, True)
V100 = Gpu("Tesla V100-SXM2-32GB", 31.7, False)
CPU_ONLY = Machine((), 2)
FOUR = Machine((H100,) * 4, 16)


def req(**kw) -> Request:
    return cp.request(kw.pop("compute", {}), kw.pop("stage", {}), "score", kw.pop("model_dtype", None),
                      "m", kw.pop("gpus", 0))  # fmt: skip


# ------------------------------------------------------------------ plan time


def test_precedence_model_then_stage_then_compute():
    r = req(compute={"dtype": "bfloat16"}, stage={"dtype": "float16"}, model_dtype="float32")
    assert (r.dtype, r.key("dtype")) == ("float32", "models.m.dtype")
    r = req(compute={"dtype": "bfloat16"}, stage={"dtype": "float16"}, model_dtype="auto")
    assert (r.dtype, r.key("dtype")) == ("float16", "score.dtype")
    r = req(compute={"dtype": "bfloat16", "device": "cuda:1"}, stage={"dtype": None})
    assert (r.dtype, r.key("dtype"), r.device, r.key("device")) == ("bfloat16", "compute.dtype", "cuda:1", "compute.device")  # fmt: skip


def test_auto_dtype_is_float32_on_a_cpu_plan_and_the_checkpoints_own_on_a_gpu_plan():
    assert req().dtype == "float32" and not req().gpu_planned
    assert req(gpus=1).dtype == "auto" and req(gpus=1).gpu_planned
    assert req(compute={"device": "cuda"}).dtype == "auto"  # asked for explicitly
    assert req(compute={"device": "cpu"}, gpus=4).dtype == "float32"  # kept off the GPUs


def test_bad_settings_name_their_key():
    with pytest.raises(
        ComputeError, match=r"score.device must be auto, cpu, cuda or cuda:<N>, not 'gpu'"
    ):
        req(stage={"device": "gpu"})
    with pytest.raises(ComputeError, match=r"compute.dtype must be one of"):
        req(compute={"dtype": "fp8"})


def test_rule_gpus_from_the_profile_or_this_machine():
    rules = ["score", "generate"]
    assert cp.rule_gpus(rules, {"score": {"gpu": 2}}, None, local=8) == {"score": 2, "generate": 0}
    assert cp.rule_gpus(rules, {}, {"gpus": "1"}, local=0) == {"score": 1, "generate": 1}
    assert cp.rule_gpus(rules, {}, {"mem_mb": 4000}, local=2) == {"score": 2, "generate": 2}
    assert cp.rule_gpus(rules, {}, None, local=0) == {"score": 0, "generate": 0}


def test_local_gpus_follow_cuda_visible_devices(tmp_path):
    proc = tmp_path / "gpus"
    for i in range(3):
        (proc / f"0000:0{i}:00.0").mkdir(parents=True)
    assert cp.local_gpus({}, str(proc)) == 3
    assert cp.local_gpus({"CUDA_VISIBLE_DEVICES": "1,2"}, str(proc)) == 2
    assert cp.local_gpus({"CUDA_VISIBLE_DEVICES": ""}, str(proc)) == 0
    assert cp.local_gpus({}, str(tmp_path / "none")) == 0


# ------------------------------------------------------------------ job time


def test_auto_without_cuda_is_the_cpu_in_float32():
    p = cp.resolve(req(), CPU_ONLY, ckpt_dtype="bfloat16")
    assert p == Placement("cpu", "float32", None, 0, 1) and not p.on_gpu
    assert cp.resolve(req(compute={"dtype": "bfloat16"}), CPU_ONLY).dtype == "bfloat16"


def test_four_gpus_spread_the_model_and_set_tensor_parallelism():
    p = cp.resolve(req(gpus=4), FOUR, ckpt_dtype="bfloat16")
    assert p == Placement("cuda:0", "bfloat16", "auto", 4, 4)
    one = cp.resolve(req(gpus=1), Machine((H100,), 8), ckpt_dtype="bfloat16")
    assert one == Placement("cuda:0", "bfloat16", None, 1, 1)
    pinned = cp.resolve(req(compute={"device": "cuda:2"}, gpus=4), FOUR, ckpt_dtype=None)
    assert pinned == Placement("cuda:2", "float32", None, 1, 1)  # unknown checkpoint dtype: float32
    explicit = cp.resolve(
        req(compute={"device_map": "auto"}, gpus=1), Machine((H100,), 8), "float16"
    )
    assert explicit.device_map == "auto" and explicit.dtype == "float16"


def test_a_gpu_asked_where_there_is_none_is_one_clear_error():
    with pytest.raises(ComputeError) as e:
        cp.resolve(req(stage={"device": "cuda"}), CPU_ONLY, where="tiny/final")
    msg = str(e.value)
    assert "score.device is 'cuda'" in msg and "tiny/final" in msg
    assert "set-resources" in msg and "score.device: auto" in msg and "\n" not in msg
    with pytest.raises(ComputeError, match=r"compute.device is 'cuda:4' but this job sees 4 GPU"):
        cp.resolve(req(compute={"device": "cuda:4"}), FOUR)
    with pytest.raises(ComputeError, match=r"planned for a GPU but sees none"):
        cp.resolve(req(gpus=1), CPU_ONLY)
    with pytest.raises(
        ComputeError, match=r"bfloat16 \(compute.dtype\) is not supported by Tesla V100"
    ):
        cp.resolve(req(gpus=1), Machine((V100,), 8), ckpt_dtype="bfloat16")


def test_checkpoint_dtype_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert cp.checkpoint_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"dtype": "float16"}}))
    assert cp.checkpoint_dtype(tmp_path) == "float16"
    assert cp.checkpoint_dtype(tmp_path / "missing") is None


def test_record_names_the_gpus_used():
    rec = cp.record(Placement("cuda:0", "bfloat16", "auto", 2, 2), FOUR, "score", model="m")
    assert rec["gpu_name"] == H100.name and rec["gpu_memory_gib"] == pytest.approx(2 * 79.2)
    assert rec["device_map"] == "auto" and rec["dtype"] == "bfloat16" and rec["model"] == "m"
    assert cp.record(Placement("cpu", "float32", None, 0, 1), CPU_ONLY, "score")["gpu_name"] is None


# ------------------------------------------------------------------ what reaches the libraries


def test_weights_kwargs_per_placement():
    assert weights_kwargs(Placement("cpu", "float32", None, 0, 1)) == {"dtype": torch.float32}
    assert weights_kwargs(Placement("cuda:1", "bfloat16", None, 1, 1)) == {
        "dtype": torch.bfloat16, "device_map": {"": "cuda:1"},
    }  # fmt: skip
    assert weights_kwargs(Placement("cuda:0", "float16", "auto", 4, 4)) == {
        "dtype": torch.float16, "device_map": "auto",
    }  # fmt: skip


@pytest.fixture
def handle(tiny_model_dir, tmp_path):
    h = resolve("tiny", "base", {"source": str(tiny_model_dir), "checkpoints": {"base": None}})
    write_handle(h, tmp_path / "h.json")
    return tmp_path / "h.json"


def test_load_model_hands_the_placement_to_from_pretrained(handle, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, location, **kwargs):
        seen.append(dict(kwargs))
        kwargs.pop("device_map", None)  # no GPU here: load on the CPU, but record what was asked
        return real(cls, location, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    model, _ = load_model(handle, Placement("cuda:0", "bfloat16", "auto", 4, 4))
    assert seen[-1]["dtype"] is torch.bfloat16 and seen[-1]["device_map"] == "auto"
    assert next(model.parameters()).dtype is torch.bfloat16
    model, _ = load_model(handle)  # default: the CPU, the handle's dtype (auto -> float32)
    assert "device_map" not in seen[-1] and seen[-1]["dtype"] is torch.float32


def test_inputs_go_to_the_embeddings_device(handle, monkeypatch):
    from reasonlab.score import ScoreOptions, TextItem, score_items

    model, tok = load_model(handle)
    emb = model.get_input_embeddings()
    seen = []
    emb.register_forward_pre_hook(lambda m, args: seen.append(args[0].device))
    score_items(model, tok, [TextItem("a", "2 + 3 =", " 5")], ScoreOptions(progress=False))
    assert seen == [input_device(model)] == [emb.weight.device]
    # the device is the embeddings', not the output head's (they differ under a device_map)
    emb.to("meta")
    assert input_device(model).type == "meta"


def test_vllm_arguments_per_device():
    h = Handle(model="m", ckpt="final", kind="local", path="/models/m", hub_id=None, revision=None,
               commit=None, content_hash="x", tokenizer=None, dtype="auto", is_adapter=False, base=None,
               architecture=None, model_type=None, num_hidden_layers=None, hidden_size=None, vocab_size=None)  # fmt: skip
    gpu = vllm_kwargs(h, GenOptions(seed=3), Placement("cuda:0", "bfloat16", "auto", 4, 4))
    assert gpu == {"model": "/models/m", "seed": 3, "dtype": "bfloat16", "enforce_eager": False,
                   "gpu_memory_utilization": 0.9, "tensor_parallel_size": 4}  # fmt: skip
    asked = vllm_kwargs(h, GenOptions(enforce_eager=True, tensor_parallel_size=2, max_model_len=4096,
                                      gpu_memory_utilization=0.5), Placement("cuda:0", "float16", None, 4, 4))  # fmt: skip
    assert (asked["enforce_eager"], asked["tensor_parallel_size"], asked["max_model_len"],
            asked["gpu_memory_utilization"], asked["dtype"]) == (True, 2, 4096, 0.5, "float16")  # fmt: skip
    cpu = vllm_kwargs(h, GenOptions(), Placement("cpu", "float32", None, 0, 1))
    assert cpu == {"model": "/models/m", "seed": 0, "dtype": "float32", "enforce_eager": True}


def test_the_score_step_stops_with_one_line_when_cuda_is_asked_for(handle, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the request can be met")
    texts = tmp_path / "t.parquet"
    import polars as pl

    from reasonlab.data import COLUMNS

    pl.DataFrame({c: ["1" if c == "id" else "x"] for c in COLUMNS}).with_columns(
        pl.lit(0).alias("row")
    ).write_parquet(texts)
    compute = json.dumps({"device": "cuda", "keys": [["device", "score.device"]]})
    r = subprocess.run(
        [sys.executable, "-m", "reasonlab", "score", "--handle", str(handle), "--texts", str(texts),
         "--tokens", str(tmp_path / "a"), "--sequences", str(tmp_path / "b"), "--compute", compute],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "score.device is 'cuda' but this job" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "a").exists()
