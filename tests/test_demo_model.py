"""The demo tokenizer and tiny model: deterministic, loadable, the shape vLLM needs."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasonlab import demo, synth


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_tokenizer_round_trip_and_chat_template(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "<think>\nStep 1: bought: 7 * 4 = 28.\nStep 2: kept: 28 / 2 = 14.\n</think>\nThe answer is \\boxed{14}."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(ids[0]) == "<think>"  # a single token
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == synth.chatml(None, "Hi")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_model_shape_for_vllm(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 32
    assert cfg["vocab_size"] == len(tok)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([tok("What is 2 + 3?")["input_ids"]])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_same_seed_gives_identical_files(tiny_model_dir, tmp_path):
    # rebuild tokenizer and model from the same inputs: byte-identical
    data = synth.build_demo_data(
        0, synth.DemoSizes(pool_per_type=10, eval=10, control=10, pretrain=300)
    )
    demo.build_tokenizer(synth.corpus_texts(data), tmp_path / "tok", vocab_size=400)
    demo.build_tiny_model(
        tmp_path / "tok", tmp_path / "model", demo.TinyModelSpec(num_hidden_layers=2), seed=0
    )
    assert digest(tmp_path / "model") == digest(tiny_model_dir)
    demo.build_tiny_model(
        tmp_path / "tok", tmp_path / "other", demo.TinyModelSpec(num_hidden_layers=2), seed=1
    )
    assert (
        digest(tmp_path / "other")["model.safetensors"]
        != digest(tiny_model_dir)["model.safetensors"]
    )


def test_head_size_16_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="head size 16"):
        demo.build_tiny_model(
            tiny_model_dir,
            tmp_path / "m",
            demo.TinyModelSpec(hidden_size=64, num_attention_heads=4),
            0,
        )


ROOT = Path(__file__).resolve().parents[1]
TOKENIZE = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps(tok(json.loads(sys.argv[2]), add_special_tokens=False)["input_ids"]))
"""


def test_operand_words_are_single_tokens(tmp_path):
    # the demo's problems put each operand in a word of its own kind (a number word, "half",
    # "doubles", ...) so that the tiny model finds it by what it is; that needs one token per word
    from transformers import AutoTokenizer

    demo.build_tokenizer(synth.corpus_texts(synth.build_demo_data(0, synth.DemoSizes())), tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    words = [*synth.NUMBER_WORDS.values(), *synth.SPLITS.values(), "doubles", "triples", "dozen"]
    for w in words:
        ids = tok(" " + w.split()[-1], add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (w, tok.convert_ids_to_tokens(ids))


@pytest.mark.parametrize("env", ["train", "gen"])
def test_every_environment_tokenizes_alike(tiny_model_dir, env):
    # transformers versions differ between environments (LlamaFactory's, vLLM's, ours); the demo
    # tokenizer must split text the same way in each, or training and scoring see different tokens
    python = ROOT / ".venvs" / env / "bin" / "python"
    if not python.exists():
        pytest.skip(f"the {env} environment is not built (bash envs/setup.sh {env})")
    texts = [
        "Step 1: bought: 7 * 4 = 28.",
        "Omar buys three packs of 8 buttons. Omar keeps half of them.",
        "It's 1,234 km; don't stop!\n\n  x",
        synth.chatml("sys", "Hi 12", "<think>\n</think>\nThe answer is \\boxed{5}."),
    ]
    ids = subprocess.run(
        [str(python), "-c", TOKENIZE, str(tiny_model_dir), json.dumps(texts)],
        capture_output=True,
        text=True,
        check=True,
    )
    mine = AutoTokenizer.from_pretrained(tiny_model_dir)(texts, add_special_tokens=False)[
        "input_ids"
    ]
    assert json.loads(ids.stdout.strip().splitlines()[-1]) == mine
