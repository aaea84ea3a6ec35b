"""The recipes run end to end on CPU, offline, with hf_optim names from the command line.

They are called in-process through their ``main(argv)`` (the same argv the
command line and ``hf-optim compare`` pass), with small step counts.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

import hf_optim

pytestmark = pytest.mark.slow


def _load(name: str):
    return importlib.import_module(f"hf_optim.recipes.{name}")


@pytest.fixture(scope="module")
def train_clm():
    return _load("train_clm")


@pytest.fixture(scope="module")
def finetune_minilm():
    return _load("finetune_minilm")


def test_every_hf_optim_name_parses(train_clm, tmp_path):
    for name in hf_optim.hf_optim_names():
        _, _, args = train_clm.parse(["--output_dir", str(tmp_path), "--optim", name])
        assert args.optim == name
    with pytest.raises(ValueError, match="Unknown optim 'lamb_9bit'"):
        train_clm.parse(["--output_dir", str(tmp_path), "--optim", "lamb_9bit"])


def _history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def test_train_clm_learns_checkpoints_and_is_seeded(train_clm, tmp_path):
    schedule = "warmup_cosine"
    argv = [
        "--optim", "adamw", "--optim_args", "betas=(0.9,0.95)", "--lr_scheduler_type", schedule,
        "--learning_rate", "1e-2",
        "--max_steps", "6", "--eval_steps", "3", "--save_steps", "3", "--logging_steps", "1",
        "--per_device_train_batch_size", "8", "--max_eval_blocks", "16", "--warmup_steps", "1", "--seed", "3",
    ]
    out = tmp_path / "a"
    metrics = train_clm.main(["--output_dir", str(out), *argv])
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.2, metrics
    history = _history(out)
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in history if "eval_loss" in e][:2] == [3, 6]
    assert (out / "checkpoint-6" / "optimizer.pt").is_file()
    tokenizer = out / "tokenizer" / "bpe1024" / "tokenizer.json"
    assert tokenizer.is_file()

    # same seed, same losses; the cached tokenizer is reused, not retrained
    again = tmp_path / "b"
    (again / "tokenizer" / "bpe1024").mkdir(parents=True)
    (again / "tokenizer" / "bpe1024" / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    stamp = (again / "tokenizer" / "bpe1024" / "tokenizer.json").stat().st_mtime_ns
    train_clm.main(["--output_dir", str(again), *argv])
    assert [e["loss"] for e in _history(again) if "loss" in e] == [e["loss"] for e in history if "loss" in e]
    assert (again / "tokenizer" / "bpe1024" / "tokenizer.json").stat().st_mtime_ns == stamp


def test_finetune_minilm_improves_with_adamw_8bit(finetune_minilm, tmp_path):
    optim = "adamw_8bit"
    schedule = "warmup_cosine"
    metrics = finetune_minilm.main([
        "--output_dir", str(tmp_path), "--optim", optim, "--lr_scheduler_type", schedule,
        "--max_steps", "30", "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "5",
        "--learning_rate", "3e-4", "--warmup_steps", "3", "--trainable_layers", "2", "--max_length", "48",
    ])
    # 8 topics: the untuned model (pretrained body, fresh head) is near chance (1/8)
    assert metrics["eval_accuracy_before"] < 0.3, metrics
    assert metrics["eval_accuracy"] > metrics["eval_accuracy_before"] + 0.3, metrics
    assert metrics["eval_loss"] < metrics["eval_loss_before"], metrics
