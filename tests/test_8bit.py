"""8-bit optimizer state through the engine (TESTING.md rows 5, 6, 10, 12)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_compiled, roundtrip, tiny_bert, tiny_dataset

import hf_optim
from hf_optim.state import FP32
from hf_optim.state.blockwise import EIGHT_BIT

HP = dict(lr=1e-3, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.1)  # non-default on purpose


def resync_errors(make, steps: int = 50, shape=(8, 4096)) -> tuple[float, float]:
    """Mean abs / rel param error of one step vs torch fp32 AdamW, re-synced after every step."""
    gen = torch.Generator().manual_seed(0)
    p32 = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.1)
    p8 = torch.nn.Parameter(p32.detach().clone())
    ref, opt = torch.optim.AdamW([p32], **HP), make([p8])
    abs_err, rel_err = [], []
    for _ in range(steps):
        grad = torch.randn(shape, generator=gen) * 0.01
        p32.grad, p8.grad = grad.clone(), grad.clone()
        ref.step()
        opt.step()
        err = (p32 - p8).abs()
        abs_err.append(err.mean().item())
        rel_err.append((err / (p32.abs() + 1e-8)).mean().item())
        with torch.no_grad():
            p8.copy_(p32)
    return sum(abs_err) / steps, sum(rel_err) / steps


def test_adamw_8bit_tracks_fp32_and_is_no_worse_than_bitsandbytes():
    ours = resync_errors(lambda ps: hf_optim.AdamW(ps, state_precision="8bit", execution="eager", **HP))
    assert ours[0] < 6e-5 and ours[1] < 6e-4, ours
    bnb = pytest.importorskip("bitsandbytes")
    theirs = resync_errors(lambda ps: bnb.optim.AdamW8bit(ps, **HP))
    assert ours[0] <= theirs[0] and ours[1] <= theirs[1], (ours, theirs)


def test_state_is_quantized_and_measured_bytes_per_param():
    p = torch.nn.Parameter(torch.randn(512, 1024))
    opt = hf_optim.AdamW([p], state_precision="8bit", execution="eager")
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    assert state["exp_avg.codes"].dtype == torch.int8 and state["exp_avg_sq.codes"].dtype == torch.uint8
    assert "exp_avg" not in state
    report = opt.precision_report()
    measured = sum(t.numel() * t.element_size() for t in state.values())
    assert report.rows[0].measured and report.rows[0].state_bytes == measured
    assert report.bytes_per_param <= 2.04
    assert report.rows[0].precision == "8bit" and "8bit" in str(report)


def test_lion_8bit_bytes_per_param():
    p = torch.nn.Parameter(torch.randn(512, 1024))
    opt = hf_optim.Lion([p], state_precision="8bit", execution="eager")
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.precision_report().bytes_per_param <= 1.02


def test_small_tensors_and_named_embeddings_norms_keep_fp32_state_unless_overridden():
    big, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(4095))
    norm, emb = torch.nn.Parameter(torch.randn(8192)), torch.nn.Parameter(torch.randn(128, 64))
    named = [("layer.weight", big), ("layer.bias", small), ("ln_f.weight", norm), ("embed_tokens.weight", emb)]
    opt = hf_optim.AdamW(named, state_precision="8bit", execution="eager")
    report = {row.name: row.precision for row in opt.precision_report().rows}
    assert report == {"layer.weight": "8bit", "layer.bias": "fp32", "ln_f.weight": "fp32",
                      "embed_tokens.weight": "fp32"}
    for p in (big, small, norm, emb):
        p.grad = torch.ones_like(p)
    opt.step()
    assert "exp_avg.codes" in opt.state[big] and opt.state[small]["exp_avg"].dtype == torch.float32
    groups = [{"params": [big, small], "param_names": ["a", "b"], "min_8bit_size": 0},
              {"params": [norm, emb], "param_names": ["ln_f.weight", "embed.weight"], "fp32_patterns": ["^ln"]}]
    report = {r.name: r.precision for r in hf_optim.AdamW(groups, state_precision="8bit").precision_report().rows}
    assert report == {"a": "8bit", "b": "8bit", "ln_f.weight": "fp32", "embed.weight": "8bit"}
    with pytest.raises(ValueError, match="Invalid min_8bit_size: -5"):
        hf_optim.AdamW([big], state_precision="8bit", min_8bit_size=-5)


def _ragged_params():
    gen = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((37, 131), (5000,), (64, 256))]


def _run(opt, params, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_compiled_equals_eager():
    results = []
    for execution in ("eager", "compiled"):
        params = _ragged_params()
        opt = hf_optim.AdamW(params, state_precision="8bit", execution=execution, **HP)
        _run(opt, params, 7)
        results.append((params, opt))
    (pe, oe), (pc, oc) = results
    for a, b in zip(pe, pc, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        for key, value in oe.state[a].items():
            other = oc.state[b][key]
            if value.dtype in (torch.int8, torch.uint8):  # a code may flip only at an exact fp32 tie
                assert (value != other).float().mean() < 1e-3, key
            else:
                torch.testing.assert_close(value, other, atol=1e-6, rtol=1e-5)
    assert_compiled()


def test_save_load_lockstep_is_exact_with_weights_only():
    params = _ragged_params()
    opt = hf_optim.AdamW(params, state_precision="8bit", execution="eager", **HP)
    _run(opt, params, 10)
    saved = roundtrip(opt.state_dict())
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = hf_optim.AdamW(twins, state_precision="8bit", execution="eager", **HP)
    fresh.load_state_dict(saved)
    _run(opt, params, 10, seed=1)
    _run(fresh, twins, 10, seed=1)
    for a, b in zip(params, twins, strict=True):
        assert torch.equal(a, b)
        assert all(torch.equal(opt.state[a][k], fresh.state[b][k]) for k in opt.state[a])


def _decoded(opt, p, name):
    state = {k: v.reshape(-1) if k != "step" else v for k, v in opt.state[p].items()}
    codec = EIGHT_BIT if f"{name}.codes" in state else FP32
    buffer = next(b for b in opt.rule.buffers(opt._flags(opt.param_groups[0])) if b.name == name)
    return codec.decode(state, buffer, p.numel())


@pytest.mark.parametrize("source, target", [("fp32", "8bit"), ("8bit", "fp32")])
def test_load_converts_between_fp32_and_8bit(source, target):
    params = _ragged_params()
    opt = hf_optim.AdamW(params, state_precision=source, execution="eager", **HP)
    _run(opt, params, 5)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = hf_optim.AdamW(twins, state_precision=target, execution="eager", **HP)
    fresh.load_state_dict(roundtrip(opt.state_dict()))
    assert fresh.param_groups[0]["state_precision"] == target  # storage is the loading optimizer's choice
    for a, b in zip(params, twins, strict=True):
        assert ("exp_avg.codes" in fresh.state[b]) == (target == "8bit")
        for name in ("exp_avg", "exp_avg_sq"):
            want, got = _decoded(opt, a, name), _decoded(fresh, b, name)
            blockmax = want.abs().max()
            assert (got - want).abs().max() <= blockmax * 2 / 127 + 1e-12, name
        assert fresh.state[b]["step"] == opt.state[a]["step"]
    _run(fresh, twins, 2)
    assert all(p.isfinite().all() for p in twins)


def test_a_bitsandbytes_8bit_state_dict_is_refused_clearly():
    bnb = pytest.importorskip("bitsandbytes")
    p = torch.nn.Parameter(torch.randn(64, 256))
    theirs = bnb.optim.AdamW8bit([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    theirs.step()
    ours = hf_optim.AdamW([torch.nn.Parameter(p.detach().clone())], state_precision="8bit", execution="eager")
    with pytest.raises(ValueError, match="bitsandbytes 8-bit optimizer state"):
        ours.load_state_dict(theirs.state_dict())


def test_nan_gradient_element_does_not_poison_its_block():
    p = torch.nn.Parameter(torch.randn(16, 512))
    opt = hf_optim.AdamW([p], state_precision="8bit", execution="eager", **HP)
    p.grad = torch.randn_like(p)
    opt.step()
    grad = torch.randn_like(p)
    grad[0, 3] = math.nan
    p.grad = grad
    opt.step()
    assert p[0, 3].isnan()  # visible, as with fp32 state
    others = p.detach().clone()
    others[0, 3] = 0.0
    assert others.isfinite().all()
    for key in ("exp_avg", "exp_avg_sq"):
        value = _decoded(opt, p, key)
        assert value.isfinite().all() and value[3] == 0.0  # NaN stored as 0, neighbours intact
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg.absmax"].isfinite().all()


# --- Trainer ------------------------------------------------------------------------


def _args(tmp_path, optim, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path), learning_rate=1e-3, per_device_train_batch_size=8, report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, optim=optim,
        # tiny_bert's 32x32 weights are 1024 elements; the option exists only for quantized state
        optim_args="min_8bit_size=1024" if optim.endswith("_8bit") else None,
    )
    return hf_optim.TrainingArguments(**{**defaults, **kwargs})


def _train(path, optim, max_steps, resume=None):
    model = tiny_bert(seed=1, dropout=0.1)
    trainer = hf_optim.Trainer(
        model=model,
        args=_args(path, optim, max_steps=max_steps, save_strategy="steps", save_steps=5, weight_decay=0.1,
                   gradient_accumulation_steps=2, per_device_train_batch_size=4),
        train_dataset=tiny_dataset(n=96),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_adamw_8bit_trains_with_decreasing_loss(tmp_path):
    trainer = hf_optim.Trainer(
        model=tiny_bert(dropout=0.0), args=_args(tmp_path, "adamw_8bit", num_train_epochs=4, weight_decay=0.01),
        train_dataset=tiny_dataset(),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(map(math.isfinite, losses)) and sum(losses[-4:]) < sum(losses[:4])
    optimizer = trainer.optimizer.optimizer
    assert type(optimizer) is hf_optim.AdamW
    report = optimizer.precision_report().by_precision()
    assert report.get("8bit", 0) > 0 and report.get("fp32", 0) > 0


def test_trainer_adamw_8bit_resumes_bit_exact(tmp_path):
    _, full = _train(tmp_path / "run", "adamw_8bit", max_steps=12)
    _, resumed = _train(tmp_path / "run", "adamw_8bit", max_steps=12, resume=str(tmp_path / "run" / "checkpoint-5"))
    for name, value in full.items():
        assert torch.equal(resumed[name], value), name


@pytest.mark.parametrize("saved, resumed", [("adamw", "adamw_8bit"), ("adamw_8bit", "adamw")])
def test_trainer_checkpoint_resumes_under_the_other_precision(tmp_path, saved, resumed):
    _train(tmp_path / "run", saved, max_steps=8)
    trainer, params = _train(tmp_path / "run", resumed, max_steps=8, resume=str(tmp_path / "run" / "checkpoint-5"))
    optimizer = trainer.optimizer.optimizer
    assert all(p.isfinite().all() for p in params.values())
    assert trainer.state.global_step == 8 and all(s["step"] == 8 for s in optimizer.state.values())
    quantized = any("exp_avg.codes" in s for s in optimizer.state.values())
    assert quantized == (resumed == "adamw_8bit")  # the checkpoint was converted to this run's storage


@pytest.mark.parametrize("name", ["adamw_8bit", "lion_8bit"])
def test_row_chunked_step_equals_whole_step(monkeypatch, name):
    """Large parameters of elementwise rules are stepped in row chunks: same numbers, one step count."""
    from hf_optim import execution

    def run(chunk_rows):
        monkeypatch.setattr(execution, "CHUNK_ROWS", chunk_rows)
        p = torch.randn(12, 256, generator=torch.Generator().manual_seed(0)).requires_grad_()
        opt = hf_optim.create_optimizer(name, [p], lr=1e-4, min_8bit_size=0, execution="eager")
        for step in range(3):
            p.grad = torch.randn(12, 256, generator=torch.Generator().manual_seed(step + 1))
            opt.step()
        return p.detach().clone(), opt.state[p]

    whole, whole_state = run(4096)
    chunked, chunked_state = run(5)  # 3 chunks, the last one short
    assert torch.equal(whole, chunked)
    assert chunked_state["step"].item() == 3
    for key, value in whole_state.items():
        assert torch.equal(chunked_state[key], value), key
