"""The paged placement (hf_optim.state.paged) on CPU: file-backed states, same numbers, same state dict."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import roundtrip, set_grads, tiny_bert, tiny_dataset

import hf_optim
from hf_optim import optimizers, registry
from hf_optim.state.paged import AUTO_FRACTION, parse_budget

SHAPES = ((64, 80), (100,), (7, 9, 3), (), (4096 + 37,))  # 2-D, 1-D, 3-D, 0-d, ragged over the 8-bit size
HP = {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.1}

CONFIGS = [
    pytest.param(cls_name, precision, id=f"{cls_name.lower()}-{precision}")
    for precision in ("fp32", "8bit")
    for cls_name in ("AdamW", "Lion")
]


def make(cls_name: str, precision: str, seed: int = 0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    hp = {**HP, "lr": HP["lr"] / 10} if cls_name == "Lion" else HP
    opt = getattr(optimizers, cls_name)(params, execution="eager", state_precision=precision, **hp, **kwargs)
    return params, opt


def train(params, opt, steps: int, seed: int = 100) -> None:
    for i in range(steps):
        set_grads(params, seed + i)
        if i == 3:
            params[1].grad = None  # a step without this parameter
        opt.step()


def state_bytes(opt) -> int:
    return sum(t.nbytes for s in opt.state.values() for t in s.values() if t.dim() > 0)


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        assert state.keys() == b["state"][index].keys(), index
        for key, tensor in state.items():
            other = b["state"][index][key]
            assert type(other) is torch.Tensor and other.dtype == tensor.dtype, (index, key)
            assert torch.equal(tensor, other), (index, key)


# --- options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ("fraction", AUTO_FRACTION)),
        ("auto", ("fraction", AUTO_FRACTION)),
        (0, ("bytes", 0)),
        (0.0, ("bytes", 0)),
        (0.25, ("fraction", 0.25)),
        (1.0, ("fraction", 1.0)),
        (5e8, ("bytes", 5e8)),
        (123456, ("bytes", 123456)),
        ("25%", ("fraction", 0.25)),
        ("2GiB", ("bytes", 2 * 2**30)),
        ("1.5 GB", ("bytes", 1.5e9)),
        ("512MiB", ("bytes", 512 * 2**20)),
        ("4096", ("bytes", 4096)),
    ],
)
def test_parse_budget(value, expected):
    assert parse_budget(value) == expected


@pytest.mark.parametrize("value", [-1, -0.5, float("nan"), float("inf"), True, "lots", "150%", "0%", "2 GiBs", [1]])
def test_bad_budget_is_an_error_naming_the_value(value):
    with pytest.raises(ValueError, match=r"Invalid paged_budget: .* \(allowed: "):
        hf_optim.AdamW([torch.zeros(3, requires_grad=True)], placement="paged", paged_budget=value)


def test_paged_options_without_paged_placement_are_errors(tmp_path):
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=r"paged_budget=0\.5 only applies to placement='paged'"):
        hf_optim.AdamW(p, paged_budget=0.5)
    with pytest.raises(ValueError, match=r"paged_dir=.* only applies to placement='paged'"):
        hf_optim.AdamW(p, paged_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"Invalid paged_dir: '/no/such/dir'"):
        hf_optim.AdamW(p, placement="paged", paged_dir="/no/such/dir")
    with pytest.raises(ValueError, match=r"paged_budget=.* only applies to placement='paged'"):
        registry.create_optimizer("adamw", p, paged_budget="1GiB")


def test_names_route_to_the_paged_placement_and_optim_args_set_the_budget(tmp_path):
    for name in ("paged_adamw", "paged_adamw_32bit", "paged_lion_32bit", "paged_adamw_8bit", "paged_lion_8bit"):
        assert registry.resolve(name).placement == "paged", name
    spec = registry.get_spec("paged_adamw")
    kwargs = spec.check_kwargs({"paged_budget": "0", "paged_dir": str(tmp_path)})
    opt = spec.build([torch.zeros(3, requires_grad=True)], **kwargs)
    assert opt.placement == "paged" and opt._placement.budget_spec == ("bytes", 0)
    args = hf_optim.TrainingArguments(str(tmp_path / "out"), optim="paged_adamw", optim_args="paged_budget=25%")
    assert hf_optim.integrations.transformers.optimizer_kwargs(args)["paged_budget"] == "25%"
    with pytest.raises(ValueError, match="paged_budget"):
        hf_optim.TrainingArguments(str(tmp_path / "out"), optim="adamw", optim_args="paged_budget=0.5")


# --- same numbers ------------------------------------------------------------------------


@pytest.mark.parametrize(("cls_name", "precision"), CONFIGS)
@pytest.mark.parametrize("some", [False, True], ids=["all-paged", "some-paged"])
def test_paged_equals_non_paged_bit_for_bit_over_50_steps(cls_name, precision, some, tmp_path):
    if some and precision != "fp32":
        pytest.skip("the budget split does not depend on the storage; all-paged covers 8-bit")
    ref_params, ref = make(cls_name, precision)
    train(ref_params, ref, 50)
    budget = state_bytes(ref) // 2 if some else 0
    params, opt = make(cls_name, precision, placement="paged", paged_budget=budget, paged_dir=str(tmp_path))
    train(params, opt, 50)
    for a, b in zip(ref_params, params, strict=True):
        assert torch.equal(a, b)
    stats = opt.paging_stats()
    assert stats["paged_bytes"] + stats["resident_bytes"] == state_bytes(opt) > 0
    paged = stats["paged_params"]  # the 0-d param has no state to page
    assert 0 < paged < len(SHAPES) - 1 if some else paged == len(SHAPES) - 1
    assert_state_dicts_equal(ref.state_dict(), opt.state_dict())


def test_within_budget_nothing_moves(tmp_path):
    params, opt = make("AdamW", "fp32", placement="paged", paged_dir=str(tmp_path))  # automatic budget
    train(params, opt, 3)
    stats = opt.paging_stats()
    assert stats["paged_bytes"] == stats["paged_params"] == 0 and stats["resident_bytes"] == state_bytes(opt)
    assert 0 < stats["budget_bytes"] and stats["steps"] == 3
    assert hf_optim.AdamW(params).paging_stats() == {}


def test_paged_states_are_file_backed_in_one_nameless_file_and_unmapped_on_del(tmp_path):
    import gc

    def spill_lines() -> list[str]:
        return [line for line in Path("/proc/self/maps").read_text().splitlines() if f" {tmp_path}/" in line]

    params, opt = make("AdamW", "fp32", placement="paged", paged_budget=0, paged_dir=str(tmp_path))
    train(params, opt, 2)
    lines = spill_lines()
    assert len(lines) == len(SHAPES) - 1  # one mapping per paged parameter ...
    assert len({line.split()[4] for line in lines}) == 1  # ... all of one file (one inode) ...
    assert all(line.endswith("(deleted)") for line in lines)  # ... that has no name
    assert not list(tmp_path.iterdir())
    del opt
    gc.collect()
    assert not spill_lines()


# --- state dict --------------------------------------------------------------------------


@pytest.mark.parametrize(("cls_name", "precision"), CONFIGS)
def test_state_dict_plain_and_loads_across_placements(cls_name, precision, tmp_path):
    ref_params, ref = make(cls_name, precision)
    params, opt = make(cls_name, precision, placement="paged", paged_budget=0, paged_dir=str(tmp_path))
    train(ref_params, ref, 10)
    train(params, opt, 10)
    sd = opt.state_dict()
    mapped = {t.untyped_storage().data_ptr() for s in opt.state.values() for t in s.values() if t.dim()}
    for state in sd["state"].values():  # copied out of the mapping
        assert all(t.untyped_storage().data_ptr() not in mapped for t in state.values() if t.dim())
    sd = roundtrip(sd)
    ref_sd = roundtrip(ref.state_dict())
    assert_state_dicts_equal(ref_sd, sd)
    # paged -> non-paged and non-paged -> paged, then 10 more steps in lockstep
    p1, into_plain = make(cls_name, precision, seed=1)
    p2, into_paged = make(cls_name, precision, seed=1, placement="paged", paged_budget=0, paged_dir=str(tmp_path))
    with torch.no_grad():
        for a, b, c in zip(ref_params, p1, p2, strict=True):
            b.copy_(a)
            c.copy_(a)
    into_plain.load_state_dict(opt.state_dict())  # live state dicts: nothing may stay shared with the source
    into_paged.load_state_dict(ref.state_dict())
    assert into_paged.paging_stats()["paged_params"] == len(SHAPES) - 1
    for ps, o in ((ref_params, ref), (p1, into_plain), (p2, into_paged)):
        train(ps, o, 10, seed=500)
    for a, b, c in zip(ref_params, p1, p2, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_deepcopy_keeps_paging_and_numbers(tmp_path):
    params, opt = make("AdamW", "fp32", placement="paged", paged_budget=0, paged_dir=str(tmp_path))
    train(params, opt, 3)
    clone_params, clone = copy.deepcopy((params, opt))  # one memo: the copy's state keys are the copied params
    train(params, opt, 3, seed=7)
    train(clone_params, clone, 3, seed=7)
    assert clone.placement == "paged" and clone.paging_stats()["paged_params"] == len(SHAPES) - 1
    for a, b in zip(params, clone_params, strict=True):
        assert torch.equal(a, b)


# --- memory and clean-up (subprocesses: a clean RSS, and a process that dies) -----------------

_RSS_SCRIPT = """
import sys, torch, hf_optim
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
def run(**kw):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(256, 512, generator=g).requires_grad_() for _ in range(32)]
    opt = hf_optim.AdamW(ps, lr=1e-3, weight_decay=0.1, execution=sys.argv[2], **kw)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return ps, opt
ps, opt = run(placement="paged", paged_budget=0, paged_dir=sys.argv[1])
before = status("RssAnon")  # the first steps included: states are allocated in the spill file directly
for _ in range(4):
    opt.step()
growth = status("RssAnon") - before
mapped, spill_rss, inside = 0, 0, False
for line in open("/proc/self/smaps"):  # the spill mappings and their resident pages
    if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
        inside = sys.argv[1] + "/" in line
        mapped += inside
    elif inside and line.startswith("Rss:"):
        spill_rss += int(line.split()[1]) * 1024
ref, ref_opt = run()
for _ in range(4):
    ref_opt.step()
same = all(torch.equal(a, b) for a, b in zip(ps, ref))
print(growth, spill_rss, opt.paging_stats()["paged_bytes"], mapped, same)
raise RuntimeError("interrupted mid-training")
"""


@pytest.mark.parametrize("execution", ["eager", "native"])
def test_state_over_budget_leaves_ram_from_the_first_step_and_leaves_no_file(execution, tmp_path):
    from hf_optim.kernels import native

    if execution == "native" and native.library_error():
        pytest.skip(native.library_error())
    # a fresh process for a clean RSS; it ends by an exception, which must leave no spill file
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path), execution], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "interrupted mid-training" in out.stderr, out.stderr[-2000:]
    growth, spill_rss, state, mapped, same = out.stdout.split()[-5:]
    assert int(state) == 32 * 256 * 512 * 4 * 2  # exp_avg and exp_avg_sq, all paged ...
    assert int(mapped) == 32  # ... in one mapping per parameter
    assert int(growth) < 0.1 * int(state), (growth, state)  # no anonymous copy, temporaries returned
    # after its update a parameter's pages leave the process (they stay in the page cache)
    assert int(spill_rss) < 0.05 * int(state), (spill_rss, state)
    assert same == "True"  # training continued correctly
    assert not list(tmp_path.iterdir())


# --- Trainer resume ------------------------------------------------------------------------


def _train(out: Path, optim: str, resume: str | None = None) -> dict[str, torch.Tensor]:
    """10 optimizer steps (checkpoint every 3) of a tiny BERT with dropout, grad accumulation, a frozen param."""
    optim_args = {"min_8bit_size": 256} if optim.endswith("_8bit") else {}
    if optim.startswith("paged_"):
        optim_args["paged_budget"] = 0
    args = hf_optim.TrainingArguments(
        str(out), optim=optim, optim_args=",".join(f"{k}={v}" for k, v in optim_args.items()) or None,
        max_steps=10, save_steps=3, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=1e-3, weight_decay=0.1, seed=0, report_to=[], use_cpu=True, logging_steps=100,
        dataloader_num_workers=0,
    )
    model = tiny_bert()
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)  # a frozen param
    trainer = hf_optim.Trainer(model=model, args=args, train_dataset=tiny_dataset())
    trainer.train(resume_from_checkpoint=resume)
    if optim.startswith("paged_"):
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
        assert optimizer.paging_stats()["paged_params"] > 0
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("storage", ["", "_8bit"])
def test_trainer_resume_is_bit_exact_and_crosses_placements(storage, tmp_path):
    paged, plain = f"paged_adamw{storage}", f"adamw{storage}"
    full = _train(tmp_path / "full", paged)  # checkpoints 3, 6, 9
    # paged checkpoint -> non-paged run (which saves non-paged checkpoints 6, 9) -> paged run; and paged -> paged
    for saved, resumed_by, out in (("full/checkpoint-3", plain, "plain"), ("plain/checkpoint-6", paged, "paged"),
                                   ("full/checkpoint-9", paged, "again")):
        resumed = _train(tmp_path / out, resumed_by, resume=str(tmp_path / saved))
        for key in full:
            assert torch.equal(full[key], resumed[key]), (saved, resumed_by, key)
