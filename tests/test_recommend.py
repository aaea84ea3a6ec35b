"""The recommender: one test per branch of the decision flow, model reading, and the outputs."""

from __future__ import annotations

import json

import pytest
import torch

import hf_optim
from hf_optim.guide import cli, memory
from hf_optim.guide.recommend import model_kind


def rec(**kwargs):
    return hf_optim.recommend(**kwargs)


# --- transformer branch ----------------------------------------------------------------------


def test_transformer_default_is_adamw_with_warmup_cosine():
    r = rec(n_params="125M")
    assert (r.optim, r.lr_scheduler_type, r.warmup_ratio) == ("adamw", "warmup_cosine", 0.05)
    assert r.hyperparameters == {"lr": 1e-4, "weight_decay": 0.01}
    assert r.memory == memory.optimizer_memory("adamw", "125M").total
    assert any("warmup" in reason for reason in r.reasons)


def test_transformer_that_fits_stays_adamw_and_says_so():
    r = rec(n_params="1B", device_memory="80GB")
    assert r.optim == "adamw" and any("AdamW fits" in reason for reason in r.reasons)
    assert r.hyperparameters["weight_decay"] == 0.1  # large model: upper end of the range


def test_memory_constrained_transformer_gets_8bit_adamw():
    # 1B fp32: AdamW needs 16 GB, 8-bit AdamW 4 + 4 + 2.03 GB
    r = rec(n_params="1B", device_memory="12GB")
    assert r.optim == "adamw_8bit"
    assert any("memory-constrained" in reason for reason in r.reasons)
    assert r.memory == memory.optimizer_memory("adamw_8bit", "1B").total < 12e9


def test_tighter_memory_gets_8bit_lion_with_lion_hyperparameters():
    r = rec(n_params="1B", device_memory="9.5GB")  # 8-bit AdamW (10.03 GB) does not fit, 8-bit Lion (9.02 GB) does
    assert r.optim == "lion_8bit"
    assert r.hyperparameters == {"lr": 2e-05, "weight_decay": 0.5, "betas": (0.9, 0.99)}
    # the same advice as translate_hparams gives for AdamW's lr 1e-4 and weight decay 0.1
    assert r.hyperparameters == hf_optim.translate_hparams("adamw", "lion", lr=1e-4, weight_decay=0.1).values
    assert any("5x smaller lr (2e-05)" in reason for reason in r.reasons)


def test_8bit_adamw_is_preferred_whenever_it_fits():
    assert rec(n_params="1B", device_memory="10.1GB").optim == "adamw_8bit"
    assert rec(n_params="1B", device_memory="10.0GB", tuning_budget="high").optim == "lion_8bit"


def test_when_only_paging_fits_the_state_is_paged():
    r = rec(n_params="1B", device_memory="8.5GB")  # weights + grads = 8 GB, no state fits
    assert r.optim == "paged_adamw_8bit"


def test_when_nothing_fits_it_says_what_else_to_do():
    r = rec(n_params="7B", device_memory="24GB")
    assert r.optim == "paged_adamw_8bit" and any("LoRA" in reason for reason in r.reasons)


def test_large_batch_gets_lamb():
    r = rec(n_params="340M", batch_size=32768)
    assert r.optim == "lamb" and r.hyperparameters["lr"] == 1e-3
    assert any("LAMB" in reason for reason in r.reasons)


def test_batch_over_4k_lowers_beta2():
    r = rec(n_params="340M", batch_size=6000)
    assert r.optim == "adamw" and r.hyperparameters["betas"] == (0.9, 0.95)


def test_unstable_training_gets_stable_adamw():
    assert rec(n_params="125M", unstable=True).optim == "stable_adamw"
    assert rec(n_params="1B", device_memory="12GB", unstable=True).optim == "stable_adamw_8bit"


def test_unstable_large_batch_lowers_beta2_of_lamb():
    r = rec(n_params="340M", batch_size=32768, unstable=True)
    assert r.optim == "lamb" and r.hyperparameters["betas"] == (0.9, 0.95)


# --- CNN and other ---------------------------------------------------------------------------


def test_cnn_with_tuning_time_gets_sgd_nesterov_and_cosine():
    r = rec(task="cnn", n_params="25M", tuning_budget="high")
    assert r.optim == "sgd" and r.warmup_ratio == 0.0 and r.lr_scheduler_type == "warmup_cosine"
    assert r.hyperparameters == {"lr": 0.1, "weight_decay": 1e-4, "momentum": 0.9, "nesterov": True}


def test_cnn_without_tuning_time_gets_adamw():
    r = rec(task="cnn", n_params="25M")
    assert r.optim == "adamw" and r.hyperparameters["lr"] == 1e-3


def test_small_batch_cnn_without_tuning_time_gets_ranger():
    assert rec(task="cnn", n_params="25M", batch_size=128).optim == "ranger"
    assert rec(task="cnn", n_params="25M", batch_size=1024).optim == "adamw"


def test_cnn_large_batch_still_gets_lamb():
    assert rec(task="cnn", n_params="25M", batch_size=16384).optim == "lamb"


def test_other_models_get_adamw():
    r = rec(task="other", n_params="1M", device_memory="1GB")
    assert r.optim == "adamw" and any("neither transformer nor CNN" in reason for reason in r.reasons)


# --- reading a model -------------------------------------------------------------------------


def test_reads_a_transformer():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64))
    r = rec(model=model)
    assert r.task == "transformer" and r.n_params == sum(p.numel() for p in model.parameters())
    assert r.memory == memory.optimizer_memory("adamw", model).total


def test_reads_a_cnn_and_an_mlp():
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3),
                              torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert model_kind(cnn) == "cnn"
    assert rec(model=cnn, tuning_budget="high").optim == "sgd"
    mlp = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 1))
    assert model_kind(mlp) == "other"
    assert model_kind(torch.nn.TransformerEncoderLayer(16, 2)) == "transformer"


# --- outputs and errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_params="125M"),
        dict(n_params="1B", device_memory="9.5GB"),
        dict(n_params="340M", batch_size=32768, unstable=True),
        dict(task="cnn", n_params="25M", tuning_budget="high"),
    ],
)
def test_to_training_args_builds_training_arguments(tmp_path, kwargs):
    r = rec(**kwargs)
    args = hf_optim.TrainingArguments(str(tmp_path), **r.to_training_args())
    assert args.optim == r.optim and args.learning_rate == r.hyperparameters["lr"]
    assert args.weight_decay == r.hyperparameters["weight_decay"]
    from hf_optim.integrations.transformers import optimizer_kwargs

    built = optimizer_kwargs(args)
    for key, value in r.hyperparameters.items():
        if key not in ("weight_decay", "lr"):
            assert tuple(built[key]) == value if isinstance(value, tuple) else built[key] == value


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(task="rnn"), "Invalid task: 'rnn'"),
        (dict(tuning_budget="medium"), "Invalid tuning_budget"),
        (dict(batch_size=0), "Invalid batch_size"),
        (dict(device_memory="lots"), "Invalid memory size"),
        (dict(n_params="many"), "Invalid parameter count"),
        (dict(model=torch.nn.Linear(2, 2), n_params=4), "either model or n_params"),
    ],
)
def test_bad_input_raises_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rec(**kwargs)


def test_str_explains_the_choice():
    text = str(rec(n_params="1B", device_memory="12GB"))
    assert "optim: adamw_8bit" in text and "why:" in text and "memory-constrained" in text


def test_cli_recommend_with_a_model_directory(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    assert cli.main(["recommend", "--model", str(tmp_path), "--batch-size", "20000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["optim"] == "lamb" and out["task"] == "transformer"
    assert out["training_args"]["optim"] == "lamb"
    assert cli.main(["recommend", "--params", "1B", "--device-memory", "12GB"]) == 0
    text = capsys.readouterr().out
    assert "adamw_8bit" in text and "TrainingArguments(optim='adamw_8bit'" in text
