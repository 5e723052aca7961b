"""Shared fixtures: a tiny demo tokenizer and model built once per test session."""

from pathlib import Path

import pytest

from reasonlab import demo, synth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A freshly built demo tokenizer + 2-layer tiny Qwen2 model (fast to build and run)."""
    root = tmp_path_factory.mktemp("tiny")
    data = synth.build_demo_data(
        0, synth.DemoSizes(pool_per_type=10, eval=10, control=10, pretrain=300)
    )
    demo.build_tokenizer(synth.corpus_texts(data), root / "tokenizer", vocab_size=400)
    demo.build_tiny_model(
        root / "tokenizer", root / "model", demo.TinyModelSpec(num_hidden_layers=2), seed=0
    )
    return root / "model"
