"""Shared fixtures: a tiny demo tokenizer and model, and one finished demo run, built once per session."""

import os
import shutil
from pathlib import Path

import pytest
from e2e import ROOT, snakemake

from reasonlab import demo, synth


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


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """A finished demo run (`make demo`'s target, rule all: results/report.html and
    results/figures/) in a temporary working directory."""
    if os.environ.get("REASONLAB_TEST_DEMO"):  # a finished demo to reuse while developing
        workdir = Path(os.environ["REASONLAB_TEST_DEMO"])
        snakemake(workdir)  # brought up to date with the code under test
        return workdir
    workdir = tmp_path_factory.mktemp("demo")
    shutil.copy(ROOT / "config.yaml", workdir / "config.yaml")
    snakemake(workdir)
    return workdir


@pytest.fixture
def scratch(demo_run, tmp_path):
    """A working directory sharing the demo's built data (copied), for runs that change things."""
    work = tmp_path / "w"
    shutil.copytree(demo_run, work)  # with .snakemake: its metadata drives the re-run decisions
    return work
