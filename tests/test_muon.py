"""Muon (``hf_optim.rules.muon``) against torch.optim.Muon, and AdamW for the parameters Muon leaves.

Every parity test uses non-default hyperparameters (torch's defaults would hide a swapped or ignored key).
The optimizer splits one model between two rules, so the state-dict tests step a mixed optimizer.
"""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch
from helpers import assert_compiled, roundtrip
from transformers import LlamaConfig, LlamaForCausalLM

import hf_optim
import hf_optim.guide.memory
from hf_optim.execution import flat_state
from hf_optim.kernels import native
from hf_optim.rules.base import ParamInfo
from hf_optim.rules.muon import Muon as MuonRule

SHAPES = {"tall": (24, 10), "wide": (10, 24), "square": (16, 16)}
#: hyperparameter sets, none of them torch's defaults
HPARAMS = [
    dict(lr=0.03, weight_decay=0.05, momentum=0.9, nesterov=False, ns_steps=3, ns_coefficients=(3.0, -3.9, 1.8),
         eps=1e-4, adjust_lr_fn="match_rms_adamw"),
    dict(lr=0.02, weight_decay=0.2, momentum=0.8, nesterov=True, ns_steps=6, ns_coefficients=(3.2, -4.4, 2.0),
         eps=1e-6, adjust_lr_fn="original"),
    dict(lr=0.05, weight_decay=0.0, momentum=0.5, nesterov=True, ns_steps=2, ns_coefficients=(2.9, -3.5, 1.5),
         eps=1e-3, adjust_lr_fn=None),
]


def _grads(shape: tuple[int, ...], steps: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


def _step_both(ref: torch.optim.Optimizer, ours: torch.optim.Optimizer, ref_p, our_p, grads) -> None:
    for g in grads:
        ref_p.grad, our_p.grad = g.clone(), g.clone()
        ref.step()
        ours.step()


@pytest.mark.parametrize("hp_index", range(len(HPARAMS)))
@pytest.mark.parametrize("kind", SHAPES)
def test_eager_matches_torch_muon(kind, hp_index):
    shape, hp = SHAPES[kind], HPARAMS[hp_index]
    start = torch.randn(shape, generator=torch.Generator().manual_seed(hp_index))
    ref_p, our_p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ref, ours = torch.optim.Muon([ref_p], **hp), hf_optim.Muon([our_p], execution="eager", **hp)
    _step_both(ref, ours, ref_p, our_p, _grads(shape, 6, seed=10 + hp_index))
    # the momentum is the same arithmetic; the parameter may differ by the rounding of lr * scale * O
    assert torch.equal(ours.state[our_p]["momentum_buffer"], ref.state[ref_p]["momentum_buffer"])
    torch.testing.assert_close(our_p, ref_p, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ref_p, start)


def test_transposed_parameter_is_stepped_as_its_logical_matrix():
    """A non-contiguous (transposed) matrix: Muon sees its logical (rows, cols), as torch does."""
    hp = HPARAMS[1]
    base = torch.randn(10, 24, generator=torch.Generator().manual_seed(3))
    ref_p = torch.nn.Parameter(base.T.contiguous())
    our_p = torch.nn.Parameter(base.clone().T)  # (24, 10), strides of the transpose
    assert not our_p.is_contiguous()
    ref, ours = torch.optim.Muon([ref_p], **hp), hf_optim.Muon([our_p], execution="eager", **hp)
    _step_both(ref, ours, ref_p, our_p, _grads((24, 10), 4, seed=5))
    torch.testing.assert_close(our_p, ref_p, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", SHAPES)
def test_compiled_matches_torch_muon(kind):
    """One configuration (and so one compile) per shape, each with its own non-default hyperparameters."""
    shape, hp = SHAPES[kind], HPARAMS[list(SHAPES).index(kind)]
    start = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    ref_p, our_p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ref, ours = torch.optim.Muon([ref_p], **hp), hf_optim.Muon([our_p], execution="compiled", **hp)
    grads = _grads(shape, 5, seed=20)
    _step_both(ref, ours, ref_p, our_p, grads[:2])
    for group in (ours.param_groups[0], ref.param_groups[0]):  # an lr change must not recompile
        group["lr"] *= 0.5
    _step_both(ref, ours, ref_p, our_p, grads[2:])
    assert_compiled()
    # the bf16 roundings are emulated (rounds_inside): what is left is fp32 rounding of the fused elementwise math
    torch.testing.assert_close(our_p, ref_p, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.state[our_p]["momentum_buffer"], ref.state[ref_p]["momentum_buffer"],
                               rtol=1e-6, atol=1e-6)


# --- the parameters Muon leaves to AdamW --------------------------------------------------------------

NAMED_SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.mlp.up_proj.weight": (32, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 32),
    "model.layers.0.mlp.up_proj.bias": (32,),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.norm.weight": (16,),
    "lm_head.weight": (40, 16),
}
HIDDEN = {"model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"}
ADAMW_HP = dict(adamw_lr=3e-3, adamw_betas=(0.8, 0.99), adamw_eps=1e-6, adamw_weight_decay=0.05)


def _named_params(seed: int = 0) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(s, generator=gen)) for n, s in NAMED_SHAPES.items()}


def test_takes_hidden_matrices_only():
    for name, shape in NAMED_SHAPES.items():
        info = ParamInfo(ndim=len(shape), shape=shape, name=name)
        assert MuonRule.takes(info) == (name in HIDDEN), name
    assert not MuonRule.takes(ParamInfo(ndim=4, shape=(8, 4, 3, 3), name="conv.weight"))


def test_adamw_part_matches_torch_adamw_with_namespaced_hyperparameters():
    """Muon for the hidden matrices, torch.optim.AdamW's numbers for the rest, with an LR schedule on both."""
    hp = HPARAMS[0]
    ref_params, our_params = _named_params(), _named_params()
    ref_muon = torch.optim.Muon([ref_params[n] for n in NAMED_SHAPES if n in HIDDEN], **hp)
    ref_adamw = torch.optim.AdamW([ref_params[n] for n in NAMED_SHAPES if n not in HIDDEN], lr=3e-3,
                                  betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    ours = hf_optim.Muon(list(our_params.items()), execution="eager", **hp, **ADAMW_HP)
    factor = lambda step: 1.0 / (1 + step)  # noqa: E731
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in (ref_muon, ref_adamw, ours)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for name in NAMED_SHAPES:
            ref_params[name].grad = torch.randn(NAMED_SHAPES[name], generator=gen)
            our_params[name].grad = ref_params[name].grad.clone()
        for opt in (ref_muon, ref_adamw, ours):
            opt.step()
        for schedule in schedules:
            schedule.step()
    for name in NAMED_SHAPES:
        state = ours.state[our_params[name]]
        assert ("momentum_buffer" in state) == (name in HIDDEN) and ("exp_avg" in state) == (name not in HIDDEN)
        torch.testing.assert_close(our_params[name], ref_params[name], rtol=1e-6, atol=1e-6, msg=name)


def test_adamw_lr_and_weight_decay_default_to_muons():
    params = _named_params()
    ours = hf_optim.Muon(list(params.items()), lr=2e-3, weight_decay=0.03)
    view = MuonRule.other_group(ours.param_groups[0])
    assert (view["lr"], view["weight_decay"], view["betas"], view["eps"]) == (2e-3, 0.03, (0.9, 0.999), 1e-8)


@pytest.mark.skipif(native.library_error() is not None, reason="no native kernel library here")
def test_auto_runs_the_adamw_part_natively_and_muon_eagerly():
    params = _named_params()
    opt = hf_optim.Muon(list(params.items()), execution="auto", **ADAMW_HP)
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    modes = {config.rule.name: mode for (config_id, _), mode in opt._modes.items()
             for config in opt._interned.values() if id(config) == config_id}
    assert modes == {"muon": "eager", "adamw": "native"}
    with pytest.raises(ValueError, match="no native kernel for muon"):
        hf_optim.Muon(list(_named_params().items()), execution="native")


# --- state dicts: mixed rules, round trip and conversion -----------------------------------------------

def _mixed(state_precision: str = "fp32", seed: int = 0):
    params = _named_params(seed)
    params["model.layers.1.self_attn.q_proj.weight"] = torch.nn.Parameter(torch.randn(64, 64))  # 8-bit-sized
    opt = hf_optim.Muon(list(params.items()), execution="eager", state_precision=state_precision, **HPARAMS[1],
                        **ADAMW_HP)
    return params, opt


def _step(params, opt, seed: int, steps: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_mixed_state_dict_round_trip_continues_in_lockstep():
    params_a, opt_a = _mixed()
    _step(params_a, opt_a, seed=0, steps=3)
    saved = roundtrip(opt_a.state_dict())
    params_b, opt_b = _mixed(seed=1)
    with torch.no_grad():
        for name, p in params_b.items():
            p.copy_(params_a[name])
    opt_b.load_state_dict(saved)
    _step(params_a, opt_a, seed=5, steps=3)
    _step(params_b, opt_b, seed=5, steps=3)
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name


def test_fp32_state_converts_to_8bit_on_load():
    params_a, opt_a = _mixed()
    _step(params_a, opt_a, seed=0, steps=3)
    params_b, opt_b = _mixed(state_precision="8bit", seed=1)
    opt_b.load_state_dict(roundtrip(opt_a.state_dict()))
    big = params_b["model.layers.1.self_attn.q_proj.weight"]
    state = opt_b.state[big]
    assert state["momentum_buffer.codes"].dtype == torch.int8  # really quantized, from the fp32 checkpoint
    report = {row.name: row.precision for row in opt_b.precision_report().rows}
    assert report["model.layers.1.self_attn.q_proj.weight"] == "8bit"
    assert report["model.embed_tokens.weight"] == "fp32"  # AdamW's embedding stays fp32 under 8-bit
    (buffer, codec), = opt_b._layout(big, "model.layers.1.self_attn.q_proj.weight", opt_b.param_groups[0])
    value = codec.decode(flat_state(state), buffer, big.numel()).view(64, 64)
    fp32_buffer = opt_a.state[params_a["model.layers.1.self_attn.q_proj.weight"]]["momentum_buffer"]
    torch.testing.assert_close(value, fp32_buffer, rtol=0, atol=fp32_buffer.abs().max().item() / 50)


def test_paged_muon_steps_equal_muon(tmp_path):
    params_a, params_b = _named_params(), _named_params()
    plain = hf_optim.create_optimizer("muon", list(params_a.items()), execution="eager", **ADAMW_HP)
    paged = hf_optim.create_optimizer("paged_muon", list(params_b.items()), execution="eager", paged_budget=0,
                                      paged_dir=str(tmp_path), **ADAMW_HP)
    _step(params_a, plain, seed=3, steps=4)
    _step(params_b, paged, seed=3, steps=4)
    assert paged.paging_stats()["paged_params"] == len(params_b)  # a budget of 0 pages every state out
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name


# --- the Trainer: muon_8bit trains a tiny Llama on real text ------------------------------------------

class _Text(torch.utils.data.Dataset):
    """Python's own help text, as bytes: real language, no download."""

    def __init__(self, seq: int = 32, n: int = 96) -> None:
        text = " ".join(pydoc_data.topics.topics.values()).encode("utf-8", "ignore")
        ids = torch.tensor(list(text[: seq * n]), dtype=torch.long)
        self.ids = ids.view(n, seq)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.slow
def test_muon_8bit_trains_a_tiny_llama(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    args = hf_optim.TrainingArguments(
        output_dir=str(tmp_path), optim="muon_8bit", learning_rate=3e-3, weight_decay=0.01,
        optim_args="adjust_lr_fn=match_rms_adamw,momentum=0.9", lr_scheduler_type="constant",
        per_device_train_batch_size=4, max_steps=36, logging_steps=1, save_strategy="no", use_cpu=True,
        report_to=[], disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = hf_optim.Trainer(model=model, args=args, train_dataset=_Text())
    trainer.train()
    opt = hf_optim.engine.unwrap(trainer.optimizer)
    assert isinstance(opt, hf_optim.Muon)
    assert opt.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    q_proj = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert opt.state[q_proj]["momentum_buffer.codes"].dtype == torch.int8  # Muon's, 8-bit
    embed = dict(model.named_parameters())["model.embed_tokens.weight"]
    assert "exp_avg" in opt.state[embed]  # AdamW's
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 36
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < first - 0.5, (first, last)


# --- bad input --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("ns_steps", 0, "an int from 1 to 99"),
    ("ns_steps", 100, "an int from 1 to 99"),
    ("ns_steps", 2.5, "an int from 1 to 99"),
    ("adjust_lr_fn", "foo", "'match_rms_adamw'"),
    ("ns_coefficients", (3.0, -4.0), "a tuple of 3 finite numbers"),
    ("ns_coefficients", (3.0, float("nan"), 2.0), "a tuple of 3 finite numbers"),
    ("momentum", 1.0, "[0, 1)"),
    ("nesterov", "yes", "True or False"),
])
def test_bad_hyperparameters_name_key_value_and_allowed(key, value, allowed):
    with pytest.raises(ValueError) as err:
        hf_optim.Muon([torch.nn.Parameter(torch.zeros(4, 4))], **{key: value})
    message = str(err.value)
    assert key in message and (repr(value) in message or str(value) in message), message
    assert allowed in message, message


@pytest.mark.parametrize(("key", "value", "words"), [
    ("adamw_lr", -1.0, "learning rate"),
    ("adamw_betas", (0.9, 1.5), "beta"),
    ("adamw_eps", -1e-8, "epsilon"),
])
def test_bad_adamw_hyperparameters_name_the_namespaced_key(key, value, words):
    with pytest.raises(ValueError, match=f"(?s){words}.*adamw_"):
        hf_optim.Muon([torch.nn.Parameter(torch.zeros(4, 4))], **{key: value})


def test_optim_args_reach_the_rule_and_bad_ones_are_refused():
    model = torch.nn.Linear(8, 8)
    opt = hf_optim.create_optimizer("muon", model, adjust_lr_fn="match_rms_adamw", ns_steps=4, adamw_lr=1e-4)
    group = opt.param_groups[0]
    assert (group["adjust_lr_fn"], group["ns_steps"], group["adamw_lr"]) == ("match_rms_adamw", 4, 1e-4)
    with pytest.raises(ValueError, match="ns_steps"):
        hf_optim.create_optimizer("muon", model, ns_steps=0)
    with pytest.raises(ValueError, match="unknown key 'ns_step'"):
        hf_optim.create_optimizer("muon", model, ns_step=3)


# --- the guide, the memory model and the names ---------------------------------------------------------

def test_recommend_suggests_muon_only_for_transformers_trained_from_scratch(tmp_path):
    scratch = hf_optim.recommend(n_params="125M", from_scratch=True)
    assert scratch.optim == "muon" and scratch.hyperparameters["adjust_lr_fn"] == "match_rms_adamw"
    assert any("fine-tuning" in reason for reason in scratch.reasons)
    args = hf_optim.TrainingArguments(str(tmp_path), **scratch.to_training_args())  # accepted as it is
    assert args.optim == "muon"
    assert hf_optim.recommend(n_params="125M").optim == "adamw"  # fine-tuning: AdamW stays
    assert hf_optim.recommend(n_params="125M", task="cnn", from_scratch=True).optim != "muon"
    with pytest.raises(ValueError, match="from_scratch"):
        hf_optim.recommend(n_params="125M", from_scratch="yes")


def test_translation_to_muon_keeps_adamws_lr_and_weight_decay_with_match_rms():
    t = hf_optim.translate_hparams(from_="adamw", to="muon_8bit", lr=3e-4, weight_decay=0.1)
    assert t.values == {"lr": 3e-4, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    assert "from scratch" in t.reasoning and "fine-tuning" in t.reasoning


def test_memory_model_counts_adamws_parameters_with_adamws_buffers():
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    for name in ("muon", "muon_8bit"):
        model = LlamaForCausalLM(config)
        predicted = hf_optim.guide.memory.optimizer_memory(name, model).state
        opt = hf_optim.create_optimizer(name, model)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        assert hf_optim.guide.memory.state_bytes(opt) == predicted == opt.precision_report().total_state_bytes, name


def test_names_come_from_the_grammar():
    for name, precision, placement in [("muon", "fp32", "device"), ("muon_8bit", "8bit", "device"),
                                       ("paged_muon", "fp32", "paged"), ("paged_muon_8bit", "8bit", "paged")]:
        spec = hf_optim.resolve(name)
        assert (spec.rule, spec.state_precision, spec.placement) == ("muon", precision, placement)
        assert spec.load_class() is hf_optim.Muon


# --- FSDP2: a matrix sharded over ranks is refused, clearly ------------------------------------------

@pytest.mark.slow
def test_fsdp2_sharded_matrix_is_refused_naming_the_parameter(tmp_path):
    """Two gloo ranks under torchrun, the model sharded by ``fully_shard``: building Muon raises a ValueError
    that names the parameter and says what to do (before any step could update part of the model)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(root / "tests" / "dist" / "muon_fsdp_worker.py"), str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in results] == [2, 2]  # two ranks really formed one group
    for r in results:
        assert r["error"] is not None, r
        assert "0.weight" in r["error"] and "sharded over ranks" in r["error"] and "DDP" in r["error"], r["error"]
        assert r["adamw_stepped"], r


# --- the rule contract: what of the parameter is part of the step configuration -------------------------

def test_configurations_hold_the_parameter_only_as_far_as_the_rule_reads_it():
    shapes = [(8, 4), (4, 8), (16, 4), (32,), (3, 2, 2)]

    def configs(name):
        params = [(f"layer{i}.weight", torch.nn.Parameter(torch.randn(s))) for i, s in enumerate(shapes)]
        opt = hf_optim.create_optimizer(name, params, execution="eager")
        for _, p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        return {(c.rule.name, c.param) for c in opt._interned.values()}

    assert configs("adamw") == {("adamw", ParamInfo())}  # elementwise: one configuration for every shape
    assert configs("lamb") == {("lamb", ParamInfo(ndim=n)) for n in (1, 2, 3)}
    assert configs("muon") == {("muon", ParamInfo(shape=s)) for s in [(8, 4), (4, 8), (16, 4)]} | {
        ("adamw", ParamInfo())}
