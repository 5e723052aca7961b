"""Model handles: local directories, hub ids from the local cache (offline), LoRA adapters, errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from reasonlab.config import validate
from reasonlab.models import (
    ModelError,
    folder_checkpoints,
    hash_directory,
    holds_weights,
    load_model,
    read_handle,
    resolve,
    write_handle,
)


def entry(source, ckpts=None, **kw):
    return {
        "source": str(source),
        "checkpoints": ckpts or {"base": None},
        "dtype": "float32",
        "tokenizer": None,
        "download": False,
        **kw,
    }


def test_local_handle_and_loading(tiny_model_dir, tmp_path):
    h = resolve("tiny", "base", entry(tiny_model_dir))
    assert (h.kind, h.path, h.architecture, h.model_type) == (
        "local",
        str(tiny_model_dir),
        "Qwen2ForCausalLM",
        "qwen2",
    )
    assert (
        h.num_hidden_layers == 2 and h.hidden_size == 128 and h.content_hash.startswith("sha256:")
    )
    write_handle(h, tmp_path / "h.json")
    assert read_handle(tmp_path / "h.json") == h
    model, tok = load_model(tmp_path / "h.json")
    assert model.dtype == torch.float32 and not model.training
    assert tok.chat_template


def test_handle_is_stable_and_tracks_content(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert hash_directory(copy) == hash_directory(tiny_model_dir)  # content, not path or mtime
    a = resolve("tiny", "base", entry(copy)).to_json()
    assert resolve("tiny", "base", entry(copy)).to_json() == a  # rewriting gives identical bytes
    cfg = json.loads((copy / "generation_config.json").read_text())
    cfg["max_length"] = 7
    (copy / "generation_config.json").write_text(json.dumps(cfg))
    assert hash_directory(copy) != hash_directory(tiny_model_dir)


def test_checkpoint_directory_entry(tiny_model_dir, tmp_path):
    h = resolve("m", "step-5", entry("org/name", {"step-5": str(tiny_model_dir)}))
    assert h.kind == "local" and h.path == str(tiny_model_dir)


def test_missing_or_non_model_directory(tmp_path):
    with pytest.raises(
        ModelError, match=r"models\.m\.checkpoints\.base: model directory '.*/nope' does not exist"
    ):
        resolve("m", "base", entry(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json or adapter_config.json"):
        resolve("m", "base", entry(tmp_path / "empty"))
    with pytest.raises(ModelError, match="is not an existing directory; for a local source"):
        resolve("m", "ft", entry(tmp_path / "empty", {"ft": "v1.0"}))


def make_hub_cache(cache, repo, model_dir, commit, refs):
    """A Hugging Face hub cache laid out as huggingface_hub writes it (models--org--name)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(model_dir, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)


HUB_SCRIPT = """
import json, sys, torch
from reasonlab.models import resolve, load_model
spec = {"source": sys.argv[1], "checkpoints": {"base": None, "v1": "v1"}, "dtype": "float32", "tokenizer": None, "download": False}
out = {}
for ckpt in ("base", "v1"):
    try:
        h = resolve("hubbed", ckpt, spec)
    except Exception as e:
        out[ckpt] = {"error": str(e)}
        continue
    model, tok = load_model(h)
    ids = torch.tensor([tok("12 * 3 =")["input_ids"]])
    out[ckpt] = {"kind": h.kind, "hub_id": h.hub_id, "revision": h.revision, "commit": h.commit,
                 "content_hash": h.content_hash, "logit_sum": float(model(ids).logits.sum())}
print(json.dumps(out))
"""


def run_offline(script, *args, cache):
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cache.parent),
    }
    r = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_hub_id_from_local_cache_offline(tiny_model_dir, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    make_hub_cache(tmp_path / "hub", "acme/tiny", tiny_model_dir, commit, ["main", "v1"])
    out = run_offline(HUB_SCRIPT, "acme/tiny", cache=tmp_path / "hub")
    assert out["base"]["kind"] == "hub" and out["base"]["hub_id"] == "acme/tiny"
    assert out["base"]["commit"] == commit and out["base"]["content_hash"] == f"git:{commit}"
    assert out["v1"]["revision"] == "v1" and out["v1"]["commit"] == commit
    # the same weights loaded from the cache and from the directory give the same logits
    from reasonlab.models import load_model as load

    model, tok = load(resolve("d", "base", entry(tiny_model_dir)))
    ids = torch.tensor([tok("12 * 3 =")["input_ids"]])
    with torch.no_grad():
        assert out["base"]["logit_sum"] == pytest.approx(float(model(ids).logits.sum()), abs=1e-3)


def test_hub_id_not_in_cache_is_a_clear_error(tmp_path):
    (tmp_path / "hub").mkdir()
    out = run_offline(HUB_SCRIPT, "acme/absent", cache=tmp_path / "hub")
    msg = out["base"]["error"]
    assert msg.startswith("models.hubbed.checkpoints.base: 'acme/absent' is not a local directory")
    assert (
        "not in the local Hugging Face cache" in msg
        and "hf download acme/absent --revision main" in msg
    )


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(base, cfg)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(out)
    return out


def test_lora_adapter_handle_and_loading(tiny_model_dir, lora_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_h = resolve("tiny", "base", entry(tiny_model_dir))
    h = resolve("tiny-lora", "base", entry(lora_dir, base="tiny"), base=base_h)
    assert h.is_adapter and h.base["model"] == "tiny" and h.architecture == "Qwen2ForCausalLM"
    model, tok = load_model(h)
    merged, _ = load_model(h, merge_adapter=True)
    # independent computation: peft applied by hand to a freshly loaded base
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_dir
    ).eval()
    base_model, _ = load_model(base_h)
    ids = torch.tensor([tok("What is 2 + 3?")["input_ids"]])
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(merged(ids).logits, want, atol=1e-4)
        assert not torch.allclose(
            base_model(ids).logits, want, atol=1e-3
        )  # the adapter does something


def test_adapter_without_base_is_an_error(lora_dir):
    with pytest.raises(ModelError, match="holds a LoRA adapter; name the model it adapts"):
        resolve("tiny-lora", "base", entry(lora_dir))


def test_relative_handle_paths_resolve_from_the_handles_working_directory(
    tiny_model_dir, tmp_path, monkeypatch
):
    workdir = tmp_path / "project"
    shutil.copytree(tiny_model_dir, workdir / "weights")
    monkeypatch.chdir(workdir)
    h = resolve("tiny", "base", entry("weights"))
    assert h.path == "weights"
    write_handle(h, workdir / "results/models/tiny/base.json")
    monkeypatch.chdir(tmp_path)  # a notebook elsewhere
    back = read_handle(workdir / "results/models/tiny/base.json")
    assert back.path == str(workdir / "weights")
    model, _ = load_model(workdir / "results/models/tiny/base.json")
    assert model.config.model_type == "qwen2"


def test_folder_checkpoints_of_a_training_output_directory(tiny_model_dir, tmp_path):
    """`checkpoints: all` over a real model's training output directory: every expanded checkpoint
    resolves to a handle of its own directory and loads."""
    out = tmp_path / "out"
    for step in (20, 5, 10):
        shutil.copytree(tiny_model_dir, out / f"checkpoint-{step}")
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    (out / "checkpoint-7.tmp").mkdir()  # not a checkpoint-<N>
    (out / "runs").mkdir()
    (out / "training_args.bin").write_bytes(b"args")
    assert not holds_weights(out)  # training_args.bin is no weights, and there is no config.json
    expected = {f"step-{s}": str(out / f"checkpoint-{s}") for s in (5, 10, 20)}
    assert folder_checkpoints(out) == expected
    for f in tiny_model_dir.iterdir():  # the run finished: its final model lands in the directory
        shutil.copy(f, out / f.name)
    assert holds_weights(out)
    assert folder_checkpoints(out) == {**expected, "final": None}

    cfg = validate(
        {
            "models": {"run": {"source": str(out), "checkpoints": "all", "dtype": "float32"}},
            "datasets": {"d": {"source": "x.jsonl", "format": "query"}},
        }
    )
    spec = cfg["models"]["run"]
    handles = {c: resolve("run", c, spec) for c in spec["checkpoints"]}
    assert {c: h.path for c, h in handles.items()} == {**expected, "final": str(out)}
    assert all(h.kind == "local" and h.model_type == "qwen2" for h in handles.values())
    assert len({h.content_hash for h in handles.values()}) == 4  # each checkpoint its own content
    # final's hash is its own files only, not its checkpoint-N sub-directories
    final_only = tmp_path / "final-only"
    shutil.copytree(out, final_only, ignore=shutil.ignore_patterns("checkpoint-*"))
    assert handles["final"].content_hash == hash_directory(final_only)
    model, _ = load_model(handles["step-10"])
    assert model.config.num_hidden_layers == 2


def test_folder_checkpoints_of_an_adapter_run_and_of_nothing(tmp_path):
    assert folder_checkpoints(tmp_path / "missing") == {}
    (tmp_path / "lora" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    assert folder_checkpoints(tmp_path / "lora") == {
        "step-3": os.path.join(str(tmp_path / "lora"), "checkpoint-3"),
        "final": None,
    }
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "model.safetensors").write_bytes(b"\0")
    assert folder_checkpoints(tmp_path / "weights-only") == {}  # no config.json: not a model
