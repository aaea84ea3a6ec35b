"""Placement as an axis: a third placement written in this one file runs through an optimizer and its state dict.

``StagingPlacement`` keeps every large enough parameter's state as a *home* copy and steps a staged copy
(what a CPU-offload placement does with a device copy), writing it home after the update; the optimizer's
own state tensors are the home copies. Its numbers must equal the device placement's exactly.
"""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import pytest
import torch
from helpers import roundtrip, set_grads

import hf_optim
from hf_optim import engine, registry
from hf_optim.state import placement
from hf_optim.state.placement import DevicePlacement, Placement, build_placement, register_placement

HP = {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.1}
SHAPES = ((64, 80), (100,), (7, 9, 3), (), (4096 + 37,))


class StagingPlacement(Placement):
    """State lives at home; each update runs on a staged copy that is written home afterwards."""

    name = "staging"
    options = {"stage_min_numel": 0}

    def __init__(self, stage_min_numel: int = 0) -> None:
        if isinstance(stage_min_numel, bool) or not isinstance(stage_min_numel, int) or stage_min_numel < 0:
            raise ValueError(f"Invalid stage_min_numel: {stage_min_numel!r} (allowed: an int >= 0)")
        self.stage_min_numel = stage_min_numel
        self.staged: set[int] = set()  # id(state dict) of the parameters this placement stages
        self.moved_bytes = 0
        self.steps = 0

    def place(self, param, state):
        if param.numel() >= self.stage_min_numel:
            self.staged.add(id(state))

    def run(self, params, items, step, states, with_state):
        resident, staged = [], []
        for p, item in zip(params, items, strict=True):
            state = states[p]
            if id(state) not in self.staged:
                resident.append(item)
                continue
            copies = {k: t.clone() for k, t in state.items()}  # the "device" copy the update works on
            self.moved_bytes += sum(t.nbytes for t in copies.values())
            staged.append((state, copies, with_state(item, copies)))
        step(resident + [item for _, _, item in staged])
        for state, copies, _ in staged:  # written home: the optimizer's tensors are updated only now
            for k, t in copies.items():
                state[k].copy_(t)

    def end_step(self):
        self.steps += 1

    def export(self, state_dict):
        return {**state_dict, "state": {i: {k: t.clone() for k, t in s.items()}
                                        for i, s in state_dict["state"].items()}}

    def stats(self):
        return {"staged_params": len(self.staged), "moved_bytes": self.moved_bytes, "steps": self.steps}


@pytest.fixture
def staging():
    register_placement(StagingPlacement)
    yield StagingPlacement
    placement.PLACEMENTS.pop("staging")


def make(precision: str, execution: str = "eager", seed: int = 0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    params.append(torch.randn(40, 30, generator=gen).t().requires_grad_())  # non-contiguous
    return params, hf_optim.AdamW(params, execution=execution, state_precision=precision, **HP, **kwargs)


def train(params, opt, steps: int, seed: int = 100) -> None:
    for i in range(steps):
        set_grads(params, seed + i)
        if i == 2:
            params[1].grad = None  # a step without this parameter
        opt.step()


def assert_same(a_params, a_opt, b_params, b_opt) -> None:
    for x, y in zip(a_params, b_params, strict=True):
        assert torch.equal(x, y)
    sa, sb = a_opt.state_dict(), b_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for index, state in sa["state"].items():
        assert state.keys() == sb["state"][index].keys()
        for key, tensor in state.items():
            assert type(sb["state"][index][key]) is torch.Tensor and torch.equal(tensor, sb["state"][index][key])


@pytest.mark.parametrize("execution", ["eager", "native"])
@pytest.mark.parametrize("precision", ["fp32", "8bit"])
def test_a_placement_in_one_file_steps_like_the_device_placement(staging, precision, execution):
    ref_params, ref = make(precision, execution)
    params, opt = make(precision, execution, placement="staging", stage_min_numel=50)
    assert isinstance(opt._placement, StagingPlacement) and "placement='staging'" in repr(opt)
    train(ref_params, ref, 5)
    train(params, opt, 5)
    assert_same(ref_params, ref, params, opt)
    stats = opt.paging_stats()
    assert stats["staged_params"] == 5 and stats["steps"] == 5 and stats["moved_bytes"] > 0  # all but the 0-d
    assert ref.paging_stats() == {}


def test_state_dicts_cross_between_a_new_placement_and_the_device(staging):
    ref_params, ref = make("8bit")
    params, opt = make("8bit", placement="staging")
    train(ref_params, ref, 4)
    train(params, opt, 4)
    # staged -> device and device -> staged, through torch.save(weights_only=True); then lockstep
    loaded_params, loaded = make("8bit", seed=0)
    loaded.load_state_dict(roundtrip(opt.state_dict()))
    for p, q in zip(loaded_params, params, strict=True):
        p.data.copy_(q)
    back_params, back = make("8bit", placement="staging")
    back.load_state_dict(roundtrip(ref.state_dict()))
    for p, q in zip(back_params, ref_params, strict=True):
        p.data.copy_(q)
    assert len(back._placement.staged) == len(back.state)  # loaded states were placed
    for ps, o in ((ref_params, ref), (params, opt), (loaded_params, loaded), (back_params, back)):
        train(ps, o, 3, seed=7)
    assert_same(ref_params, ref, loaded_params, loaded)
    assert_same(ref_params, ref, back_params, back)
    assert_same(ref_params, ref, params, opt)


def test_a_registered_placement_is_known_to_the_registry_and_constructor(staging):
    assert engine.constructor_options()["stage_min_numel"] == 0
    assert {"paged_budget", "paged_dir", "execution", "placement"} <= set(engine.constructor_options())
    p = [torch.zeros(3, requires_grad=True)]
    opt = registry.create_optimizer("adamw", p, placement="staging", stage_min_numel=2)
    assert opt._placement.stage_min_numel == 2
    spec = registry.get_spec("adamw")
    assert spec.check_kwargs({"placement": "staging", "stage_min_numel": "4"})["stage_min_numel"] == 4


def test_placement_options_go_only_to_the_placement_that_takes_them(staging, tmp_path):
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=r"stage_min_numel=5 only applies to placement='staging' "
                                         r"\(got placement='device'\); pass placement='staging'"):
        hf_optim.AdamW(p, stage_min_numel=5)
    with pytest.raises(ValueError, match=r"stage_min_numel=5 only applies to placement='staging' "
                                         r"\(got placement='paged'\)"):
        hf_optim.AdamW(p, placement="paged", stage_min_numel=5)
    with pytest.raises(ValueError, match=r"paged_budget=0 only applies to placement='paged' "
                                         r"\(got placement='staging'\); use a paged_ optimizer name"):
        hf_optim.AdamW(p, placement="staging", paged_budget=0)
    with pytest.raises(ValueError, match=r"paged_dir=.* only applies to placement='paged'"):
        registry.create_optimizer("adamw", p, placement="staging", paged_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"stage_min_numel=3 only applies to placement='staging'"):
        registry.get_spec("paged_adamw").check_kwargs({"stage_min_numel": 3})
    with pytest.raises(ValueError, match=r"Invalid stage_min_numel: -1"):
        hf_optim.AdamW(p, placement="staging", stage_min_numel=-1)
    with pytest.raises(ValueError, match=r"Invalid placement: 'nowhere' \(allowed: device, paged, staging\)"):
        hf_optim.AdamW(p, placement="nowhere")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'stage_min'.*valid: .*stage_min_numel"):
        hf_optim.AdamW(p, stage_min=1)
    # a default value is "not given": nothing to ignore
    assert isinstance(hf_optim.AdamW(p, stage_min_numel=0, paged_budget=None)._placement, DevicePlacement)


def test_register_placement_rejects_what_it_cannot_honour(staging):
    with pytest.raises(TypeError, match="Placement subclass"):
        register_placement(object)  # type: ignore[arg-type]

    class Clash(Placement):
        name = "clash"
        options = {"paged_dir": None}

    with pytest.raises(ValueError, match="option 'paged_dir', which placement 'paged' already takes"):
        register_placement(Clash)

    class Again(StagingPlacement):
        pass

    with pytest.raises(ValueError, match="placement 'staging' is already registered"):
        register_placement(Again)
    assert set(placement.PLACEMENTS) == {"device", "paged", "staging"}


def test_the_device_placement_is_a_null_object_called_like_any_other():
    params, opt = make("fp32")
    assert type(opt._placement) is DevicePlacement and opt.paging_stats() == {}
    device = build_placement("device")
    sd = {"state": {}, "param_groups": []}
    assert device.export(sd) is sd and device.stats() == {}
    with device.transaction():
        device.place(params[0], {})
    ran = []
    device.run([], ["item"], ran.extend, {}, lambda item, state: pytest.fail("nothing is re-staged"))
    assert ran == ["item"]
    # nothing in the engine or the checkpoint code asks whether there is a placement
    for module in ("engine.py", "checkpoint.py"):
        source = (Path(hf_optim.__file__).parent / module).read_text()
        assert not re.search(r"_placement\s+is\s+(not\s+)?None|\._pager\b|placement\s*==\s*['\"]paged", source), module


def test_old_pickles_with_a_pager_attribute_load(tmp_path):
    params, opt = make("fp32")
    train(params, opt, 2)
    for old_pager in (None, build_placement("paged", paged_budget=0, paged_dir=str(tmp_path))):
        state = opt.__getstate__()
        state.pop("_placement")
        state["_pager"] = old_pager  # how optimizers were pickled before placements were objects
        restored = copy.copy(opt)
        restored.__dict__.clear()
        restored.__setstate__(pickle.loads(pickle.dumps(state)))
        assert "_pager" not in restored.__dict__
        expected = DevicePlacement if old_pager is None else type(old_pager)
        assert type(restored._placement) is expected
        restored.step()  # steps with whichever placement it had


def test_deepcopy_and_pickle_keep_the_placement(staging):
    params, opt = make("fp32", placement="staging", stage_min_numel=7)
    train(params, opt, 1)
    twin = copy.deepcopy(opt)
    assert type(twin._placement) is StagingPlacement and twin._placement.stage_min_numel == 7
    assert type(pickle.loads(pickle.dumps(make("fp32")[1]))._placement) is DevicePlacement
