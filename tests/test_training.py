"""Training-data selection, LlamaFactory files, and real LlamaFactory runs (full, LoRA, broken)."""

import json
import subprocess
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml

from reasonlab.models import ModelError, checkpoint_dir, load_model, resolve, write_handle
from reasonlab.training import (
    TrainingError,
    read_loss_curve,
    select_rows,
    train_config,
    write_llamafactory_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / ".venvs" / "train" / "bin" / "python"

DATA = pl.DataFrame(
    {
        "id": [f"r{i}" for i in range(6)],
        "question": [f"q{i}" for i in range(6)],
        "solution": [f"s{i}" for i in range(6)],
        "system": [None] * 6,
        "type": ["a", "a", "b", "b", "c", "c"],
    }
)
SCORES = pl.DataFrame(
    {
        "id": [f"r{i}" for i in range(6)],
        "llh_mean": [-1.0, -3.0, -0.5, -2.0, -4.0, -0.1],
        "llh_sum": [-9.0, -3.0, -8.0, -2.0, -1.0, -5.0],
    }
)


def chosen(df):
    return sorted(df.filter(pl.col("selected"))["id"].to_list())


def test_select_high_low_random_all():
    assert chosen(select_rows(DATA, SCORES, "high", 2, 0)) == ["r2", "r5"]
    assert chosen(select_rows(DATA, SCORES, "low", 2, 0)) == ["r1", "r4"]
    assert chosen(select_rows(DATA, SCORES, "high", 2, 0, by="llh_sum")) == ["r3", "r4"]
    assert chosen(select_rows(DATA, None, "all", None, 0)) == [f"r{i}" for i in range(6)]
    a, b = select_rows(DATA, None, "random", 3, 7), select_rows(DATA, None, "random", 3, 7)
    assert chosen(a) == chosen(b) and len(chosen(a)) == 3
    assert chosen(select_rows(DATA, SCORES, "high", 100, 0)) == [
        f"r{i}" for i in range(6)
    ]  # n > rows: all
    scored = select_rows(DATA, SCORES, "high", 2, 0)
    assert scored.filter(pl.col("id") == "r5")["score"][0] == -0.1  # the score is recorded


def test_rounding_noise_does_not_flip_a_selection():
    # r1 and r3 tie at -0.5; another batch composition moves each by ~1e-7, either way
    base = [-1.0, -0.5, -2.0, -0.5, -3.0, -4.0]
    picks = set()
    for noise in ([0, 1e-7, 0, -1e-7, 0, 0], [0, -1e-7, 0, 1e-7, 0, 0], [0] * 6):
        scores = DATA.select("id").with_columns(
            llh_mean=pl.Series([b + e for b, e in zip(base, noise, strict=True)])
        )
        picks.add(tuple(chosen(select_rows(DATA, scores, "high", 1, 0))))
        assert chosen(select_rows(DATA, scores, "low", 2, 0)) == ["r4", "r5"]
    assert picks == {("r1",)}  # the tie goes to the smaller id, whatever the noise


def test_select_needs_scores_for_every_row():
    with pytest.raises(TrainingError, match="no log-likelihood score"):
        select_rows(DATA, SCORES.head(3), "high", 2, 0)
    with pytest.raises(TrainingError, match="keep must be"):
        select_rows(DATA, SCORES, "best", 2, 0)


def test_llamafactory_dataset_files(tmp_path):
    n = write_llamafactory_dataset(DATA.head(2), "sft", tmp_path / "sft")
    assert n == 2
    assert json.loads((tmp_path / "sft/train.json").read_text())[0] == {
        "instruction": "q0",
        "input": "",
        "output": "s0",
    }
    info = json.loads((tmp_path / "sft/dataset_info.json").read_text())
    assert info == {
        "train": {
            "file_name": "train.json",
            "columns": {"prompt": "instruction", "query": "input", "response": "output"},
        }
    }
    with_system = DATA.head(2).with_columns(system=pl.Series(["be brief", None]))
    write_llamafactory_dataset(with_system, "sft", tmp_path / "sys")
    assert (
        json.loads((tmp_path / "sys/dataset_info.json").read_text())["train"]["columns"]["system"]
        == "system"
    )
    assert json.loads((tmp_path / "sys/train.json").read_text())[0]["system"] == "be brief"
    write_llamafactory_dataset(
        DATA.head(1).with_columns(solution=pl.lit(None, pl.String)), "pt", tmp_path / "pt"
    )
    assert json.loads((tmp_path / "pt/train.json").read_text()) == [{"text": "q0"}]
    with pytest.raises(TrainingError, match="no training rows"):
        write_llamafactory_dataset(DATA.head(0), "sft", tmp_path / "none")


def test_train_config_layers_and_owned_keys(tmp_path):
    cfg = train_config({"learning_rate": 0.1, "max_steps": 3}, "/m", tmp_path, tmp_path / "o")
    assert cfg["learning_rate"] == 0.1 and cfg["bf16"] is False and cfg["report_to"] == "none"
    assert (cfg["model_name_or_path"], cfg["dataset"], cfg["output_dir"]) == (
        "/m",
        "train",
        str(tmp_path / "o"),
    )
    with pytest.raises(TrainingError, match="may not set output_dir"):
        train_config({"output_dir": "/elsewhere"}, "/m", tmp_path, tmp_path / "o")


needs_train_env = pytest.mark.skipif(
    not TRAIN_PY.exists(), reason="the train environment is not built (bash envs/setup.sh train)"
)


def finetune(tmp_path, base_handle, data_dir, settings):
    out = tmp_path / "output"
    cmd = [str(TRAIN_PY), "-m", "reasonlab", "finetune", "--base", str(base_handle), "--data-dir", str(data_dir),
           "--template", str(ROOT / "resources/llamafactory/train.yaml"), "--output-dir", str(out),
           "--yaml", str(tmp_path / "train.yaml"), "--settings", json.dumps(settings)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600), out


@pytest.fixture(scope="module")
def base_handle(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("handles") / "tiny.json"
    write_handle(
        resolve(
            "tiny",
            "base",
            {"source": str(tiny_model_dir), "checkpoints": {"base": None}, "dtype": "float32"},
        ),
        path,
    )
    return path


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    from reasonlab import synth

    rows = synth.build_demo_data(
        0, synth.DemoSizes(pool_per_type=8, eval=1, control=1, pretrain=1)
    )["pool"]
    df = pl.DataFrame({"id": [str(i) for i in range(len(rows))], "question": [r["input"] for r in rows],
                       "solution": [r["output"] for r in rows], "system": [None] * len(rows), "type": [r["type"] for r in rows]})  # fmt: skip
    d = tmp_path_factory.mktemp("sft")
    write_llamafactory_dataset(df, "sft", d)
    return d


@needs_train_env
def test_lora_run_gives_loadable_adapter_checkpoints(
    tmp_path, base_handle, sft_data, tiny_model_dir
):
    settings = {"stage": "sft", "finetuning_type": "lora", "lora_target": "all", "lora_rank": 4, "learning_rate": 5e-3,
                "max_steps": 4, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 4, "template": "qwen"}  # fmt: skip
    r, out = finetune(tmp_path, base_handle, sft_data, settings)
    assert r.returncode == 0, r.stdout[-3000:]
    assert (checkpoint_dir(out, "step-2") / "adapter_config.json").exists()
    with pytest.raises(ModelError, match=r"no checkpoint-3 .* \(saved: step-2, step-4\)"):
        checkpoint_dir(out, "step-3")
    base = resolve(
        "tiny",
        "base",
        {"source": str(tiny_model_dir), "checkpoints": {"base": None}, "dtype": "float32"},
    )
    spec = {
        "run": "lora",
        "run_output": str(out),
        "checkpoints": {"step-2": None, "final": None},
        "dtype": "float32",
    }
    for ckpt in ("step-2", "final"):
        h = resolve("tiny-lora", ckpt, spec, base=base)
        assert h.is_adapter and h.base["model"] == "tiny"
    model, tok = load_model(h)
    base_model, _ = load_model(base)
    ids = torch.tensor([tok("A pack holds 4 apples.")["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base_model(ids).logits, atol=1e-4)
    curve = read_loss_curve(out, "lora")
    assert curve["step"].to_list() == [1, 2, 3, 4] and curve["loss"].is_finite().all()


@needs_train_env
def test_broken_llamafactory_config_fails_with_its_message(tmp_path, base_handle, sft_data):
    r, _ = finetune(
        tmp_path, base_handle, sft_data, {"stage": "sft", "max_steps": 1, "no_such_option": 3}
    )
    assert r.returncode != 0
    assert "[finetune] error: llamafactory-cli train" in r.stderr and "no_such_option" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dataset_info.json").write_text(json.dumps({"train": {"file_name": "train.json"}}))
    r, _ = finetune(tmp_path, base_handle, empty, {"stage": "sft", "max_steps": 1})
    assert (
        r.returncode != 0
        and "[finetune] error:" in r.stderr
        and "train.json" in r.stdout + r.stderr
    )


# what `llamafactory-cli train` needs to start a run: the workflow's own keys and the template's
NEEDED = {"model_name_or_path", "dataset", "dataset_dir", "output_dir", "stage", "do_train",
          "finetuning_type", "template", "per_device_train_batch_size", "learning_rate"}  # fmt: skip


def test_shipped_template_with_run_settings_gives_a_complete_config(tmp_path):
    template = yaml.safe_load((ROOT / "resources/llamafactory/train.yaml").read_text())
    settings = {"finetuning_type": "lora", "lora_rank": 4, "learning_rate": 5e-3, "max_steps": 30}
    cfg = train_config(settings, "/m", tmp_path / "data", tmp_path / "out", revision="abc")
    assert set(cfg) >= NEEDED and all(cfg[k] not in (None, "") for k in NEEDED)
    # the run's values win over the template's; the template fills in the rest
    assert template["finetuning_type"] == "full" and cfg["finetuning_type"] == "lora"
    assert template["learning_rate"] == 1e-4 and cfg["learning_rate"] == 5e-3
    assert cfg["lora_rank"] == 4 and cfg["max_steps"] == 30  # keys only the run sets
    assert cfg["cutoff_len"] == template["cutoff_len"] and cfg["stage"] == "sft"
    assert (cfg["dataset_dir"], cfg["output_dir"]) == (
        str(tmp_path / "data"),
        str(tmp_path / "out"),
    )
    assert cfg["model_revision"] == "abc"
    # written as run_llamafactory writes it, it reads back the same
    assert yaml.safe_load(yaml.safe_dump(cfg, sort_keys=False)) == cfg
