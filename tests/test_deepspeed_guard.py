"""A DeepSpeed config must not silently replace the hf_optim optimizer.

DeepSpeed is not installed here (and needs a GPU); what decides whether our
optimizer runs is the config alone, so these tests drive the real
TrainingArguments / Trainer / HfArgumentParser with real config dicts, files
and accelerate's DeepSpeed environment variables.
"""

from __future__ import annotations

import base64
import json

import pytest
import torch
import transformers

import hf_optim
from hf_optim.integrations import deepspeed as ds_guard
from hf_optim.integrations.deepspeed import DeepSpeedOptimizerConflict

OPTIMIZER_SECTION = {
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
    "zero_optimization": {"stage": 2},
}
OFFLOAD = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
HARMLESS = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}, "train_batch_size": "auto"}


def test_optimizer_section_names_deepspeeds_optimizer(tmp_path):
    with pytest.raises(DeepSpeedOptimizerConflict, match=r"build its own AdamW optimizer.*optim='lion' would never"):
        ds_guard.check(OPTIMIZER_SECTION, "lion")
    with pytest.raises(DeepSpeedOptimizerConflict, match=r"AdamW optimizer .*optim='adamw' would never run"):
        hf_optim.TrainingArguments(str(tmp_path), optim="adamw", deepspeed=OPTIMIZER_SECTION)


def test_offload_from_json_file_names_zero_offload(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(OFFLOAD))
    with pytest.raises(DeepSpeedOptimizerConflict, match=r"ZeRO-Offload .* on cpu.*allow_deepspeed_optimizer"):
        hf_optim.TrainingArguments(str(tmp_path), optim="adamw", deepspeed=str(path))


@pytest.mark.parametrize(
    "encode",
    [lambda c: c, json.dumps, lambda c: base64.urlsafe_b64encode(json.dumps(c).encode()).decode()],
    ids=["dict", "json-string", "base64"],
)
def test_every_config_form_is_read(encode):
    both = {**OPTIMIZER_SECTION, **OFFLOAD}
    assert len(ds_guard.conflicts(ds_guard.load_config(encode(both)), "adamw")) == 2
    with pytest.raises(DeepSpeedOptimizerConflict, match=r"'optimizer' section.*; and .*offload_optimizer"):
        ds_guard.check(encode(both), "adamw")


def test_legacy_cpu_offload_flag_and_nvme():
    assert "on cpu" in ds_guard.conflicts({"zero_optimization": {"cpu_offload": True}}, "adamw")[0]
    assert "on nvme" in ds_guard.conflicts({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}, "x")[0]


def test_config_without_those_sections_passes():
    assert ds_guard.conflicts(HARMLESS, "adamw") == []
    ds_guard.check(HARMLESS, "adamw")  # no error
    ds_guard.check(None, "adamw")


def test_opt_out_lets_deepspeed_choose(tmp_path):
    ds_guard.check(OPTIMIZER_SECTION, "adamw", allow=True)
    # our guard steps aside; transformers then needs DeepSpeed itself, which is not installed here
    with pytest.raises(Exception) as err:
        hf_optim.TrainingArguments(
            str(tmp_path), optim="adamw", deepspeed=OPTIMIZER_SECTION, allow_deepspeed_optimizer=True
        )
    assert not isinstance(err.value, DeepSpeedOptimizerConflict)


def test_transformers_optimizer_names_are_not_ours_to_guard(tmp_path):
    with pytest.raises(Exception) as err:
        hf_optim.TrainingArguments(str(tmp_path), optim="adamw_torch", deepspeed=OPTIMIZER_SECTION)
    assert not isinstance(err.value, DeepSpeedOptimizerConflict)


def test_opt_out_flag_parses_from_the_command_line(tmp_path):
    (args,) = transformers.HfArgumentParser(hf_optim.TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "adamw", "--allow_deepspeed_optimizer"]
    )
    assert args.allow_deepspeed_optimizer is True
    (args,) = transformers.HfArgumentParser(hf_optim.TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "adamw"]
    )
    assert args.allow_deepspeed_optimizer is False


def _tiny_model() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    return transformers.BertForSequenceClassification(config)


def test_trainer_checks_accelerate_deepspeed_environment(tmp_path, monkeypatch):
    """`accelerate launch --use_deepspeed --deepspeed_config_file ds.json` reaches the Trainer only by env vars."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(OPTIMIZER_SECTION))
    args = hf_optim.TrainingArguments(str(tmp_path), optim="adamw", report_to=[], use_cpu=True)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    with pytest.raises(DeepSpeedOptimizerConflict, match="AdamW optimizer"):
        hf_optim.Trainer(model=_tiny_model(), args=args)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "nvme")
    with pytest.raises(DeepSpeedOptimizerConflict, match="on nvme"):
        hf_optim.Trainer(_tiny_model(), args)  # positional args too


def test_arguments_check_accelerate_environment_at_creation(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(DeepSpeedOptimizerConflict, match="ZeRO-Offload"):
        hf_optim.TrainingArguments(str(tmp_path), optim="adamw", report_to=[], use_cpu=True)


def test_trainer_guard_steps_aside_when_opted_out_or_not_ours(tmp_path, monkeypatch):
    opted_out = hf_optim.TrainingArguments(str(tmp_path), optim="adamw", report_to=[], use_cpu=True)
    opted_out.allow_deepspeed_optimizer = True
    plain = transformers.TrainingArguments(str(tmp_path), optim="adamw_torch", report_to=[], use_cpu=True)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    for args in (opted_out, plain):
        try:
            hf_optim.Trainer(model=_tiny_model(), args=args)
        except DeepSpeedOptimizerConflict:  # pragma: no cover - the failure this test looks for
            pytest.fail(f"guard fired for optim={args.optim!r}, "
                        f"allow={getattr(args, 'allow_deepspeed_optimizer', None)}")
        except Exception:
            pass  # past the guard, accelerate wants DeepSpeed itself, which is not installed here
