"""The native bucket cache (hf_optim/buckets.py): reused kernel calls step exactly as the ordinary path does.

Every test runs two optimizers in lockstep on the same parameters and gradients: one keeps its cached kernel
calls, the reference forgets them before every step (so it always builds its buckets, items and checks anew,
the path the rest of the suite tests against the eager step). After whatever a user or a library does between
steps (new gradient tensors, ``p.data = ...``, ``load_state_dict``, ``add_param_group``, a missing gradient, a
dtype change, a state tensor re-pointed with ``set_`` or ``.data =``, edited in place or replaced, a changed
option), both must hold the very same bits, and memory the cache pointed into before must be left alone.
Each test also checks that the cache did step the warm-up, so it cannot pass by never being used.
"""

from __future__ import annotations

import pytest
import torch

import hf_optim
from hf_optim.kernels import native

pytestmark = pytest.mark.skipif(native.library_error() is not None, reason=f"{native.library_error()}")

SHAPES = [(33, 17), (300,), (5,), (64, 8)]  # 2-D and 1-D, ragged and under one block of 256
KINDS = {
    "adamw": lambda ps: hf_optim.AdamW(ps, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, execution="native"),
    "adamw_8bit": lambda ps: hf_optim.AdamW(ps, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, execution="native",
                                            state_precision="8bit", min_8bit_size=0),
    "lamb": lambda ps: hf_optim.LAMB(ps, lr=1e-2, weight_decay=0.05, execution="native"),
    "lars": lambda ps: hf_optim.LARS(ps, lr=0.5, momentum=0.8, weight_decay=1e-3, execution="native"),
    "stable_adamw": lambda ps: hf_optim.StableAdamW(ps, lr=3e-3, weight_decay=0.1, execution="native"),
    "lion_8bit": lambda ps: hf_optim.Lion(ps, lr=1e-4, weight_decay=0.2, execution="native", state_precision="8bit",
                                          min_8bit_size=0),
    "sgd": lambda ps: hf_optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, execution="native"),
}


class Pair:
    """The cached optimizer and its always-rebuilding reference, on equal parameters."""

    def __init__(self, kind: str, dtype: torch.dtype = torch.float32, shapes=SHAPES) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ours = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
        self.refs = [torch.nn.Parameter(p.detach().clone()) for p in self.ours]
        self.opt, self.ref = KINDS[kind](self.ours), KINDS[kind](self.refs)
        self.gen = torch.Generator().manual_seed(1)

    def grads(self, skip=()) -> None:
        """New gradient tensors (``zero_grad(set_to_none=True)``), None for the indices in ``skip``."""
        for i, (p, q) in enumerate(zip(self.ours, self.refs)):
            g = None if i in skip else torch.randn(p.shape, generator=self.gen).to(p.dtype)
            p.grad, q.grad = g, None if g is None else g.clone()

    def step(self, skip=()) -> None:
        self.grads(skip)
        self.opt.step()
        self.ref._buckets.clear()
        self.ref.step()

    def warm(self, steps: int = 3) -> None:
        hits = self.opt._buckets.hits
        for _ in range(steps):
            self.step()
        assert self.opt._buckets.hits >= hits + steps - 1, "the cache did not step the warm-up"
        self.assert_same()

    def both(self, change) -> None:
        """The same change to both optimizers: ``change(opt, params)``."""
        change(self.opt, self.ours)
        change(self.ref, self.refs)

    def assert_same(self) -> None:
        for p, q in zip(self.ours, self.refs):
            assert torch.equal(p.detach(), q.detach())
            ours, ref = self.opt.state[p], self.ref.state[q]
            assert sorted(ours) == sorted(ref)
            for key in ours:
                assert torch.equal(ours[key], ref[key]), key


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_new_gradient_tensors_every_step(kind):
    pair = Pair(kind)
    pair.warm(5)
    hits = pair.opt._buckets.hits
    for _ in range(3):  # gradients accumulated in place: the same tensors, new values
        for p, q in zip(pair.ours, pair.refs):
            g = torch.randn(p.shape, generator=pair.gen)
            p.grad.add_(g)
            q.grad.add_(g)
        pair.opt.step()
        pair.ref._buckets.clear()
        pair.ref.step()
    assert pair.opt._buckets.hits == hits + 3
    pair.assert_same()


def test_bf16_parameters_with_kahan():
    pair = Pair("adamw", torch.bfloat16)
    pair.warm(4)
    assert "kahan_comp" in pair.opt.state[pair.ours[0]]


@pytest.mark.parametrize("kind", ["adamw", "lamb"])
def test_parameter_data_replaced(kind):
    pair = Pair(kind)
    pair.warm()
    old = pair.ours[0].data
    before = old.clone()
    pair.both(lambda opt, ps: setattr(ps[0], "data", ps[0].data * 0.5))
    pair.step()
    pair.assert_same()
    assert torch.equal(old, before), "the step wrote into the parameter's old memory"
    pair.warm()


@pytest.mark.parametrize("kind", ["adamw", "lamb"])
def test_parameter_data_transposed_in_place_of_itself(kind):
    """Same address, same size, another layout: the cache must not step the strided view as raw memory."""
    pair = Pair(kind)
    pair.warm()
    pair.both(lambda opt, ps: setattr(ps[0], "data", ps[0].data.t()))
    pair.step()
    pair.assert_same()


def test_parameter_reshaped_changes_lambs_configuration():
    """LAMB's trust ratio depends on ndim (biases and norms skip it): a 2-D parameter made 1-D steps as 1-D."""
    pair = Pair("lamb")
    for group in (*pair.opt.param_groups, *pair.ref.param_groups):
        group["exclude_bias_and_norm"] = True
    pair.warm()
    pair.both(lambda opt, ps: setattr(ps[0], "data", ps[0].data.reshape(-1)))
    pair.step()
    pair.assert_same()
    pair.warm()


@pytest.mark.parametrize("kind", ["adamw", "adamw_8bit", "lamb"])
def test_load_state_dict(kind):
    pair = Pair(kind)
    pair.warm()
    saved = pair.ref.state_dict()
    import copy

    saved = copy.deepcopy(saved)
    for _ in range(2):
        pair.step()
    old = {k: v.clone() for k, v in pair.opt.state[pair.ours[0]].items()}
    old_tensors = dict(pair.opt.state[pair.ours[0]])
    pair.both(lambda opt, ps: opt.load_state_dict(saved))
    pair.step()
    pair.assert_same()
    for key, value in old_tensors.items():  # the replaced state is not what the kernel stepped
        assert torch.equal(value, old[key]), key
    pair.warm()


def test_add_param_group():
    pair = Pair("adamw")
    pair.warm()
    gen = torch.Generator().manual_seed(2)
    extra = [torch.nn.Parameter(torch.randn(40, generator=gen)), torch.nn.Parameter(torch.randn(3, 7, generator=gen))]
    extra_ref = [torch.nn.Parameter(p.detach().clone()) for p in extra]
    pair.opt.add_param_group({"params": extra, "lr": 1e-2})
    pair.ref.add_param_group({"params": extra_ref, "lr": 1e-2})
    pair.ours += extra
    pair.refs += extra_ref
    pair.step()
    pair.assert_same()
    pair.warm()


@pytest.mark.parametrize("kind", ["adamw", "lamb", "adamw_8bit"])
def test_gradient_missing_for_some_steps(kind):
    """A parameter without a gradient is not stepped (its counter stays); frozen for a while, then unfrozen, its
    count differs from the others' (two kernel calls in the cache)."""
    pair = Pair(kind)
    pair.warm()
    hits = pair.opt._buckets.hits
    for _ in range(3):
        pair.step(skip={1})
    assert pair.opt._buckets.hits == hits + 2  # the first step without it rebuilt, the next two reused that
    pair.assert_same()
    steps = [pair.opt.state[p]["step"].item() for p in pair.ours]
    assert steps[1] == steps[0] - 3
    pair.warm()


def test_gradient_dtype_change():
    """A bf16 gradient for an fp32 parameter: the kernel cannot read it as fp32."""
    pair = Pair("adamw")
    pair.warm()
    pair.grads()
    for p, q in zip(pair.ours, pair.refs):
        p.grad_dtype = q.grad_dtype = None  # (torch refuses a gradient of another dtype otherwise)
        p.grad, q.grad = p.grad.bfloat16(), q.grad.bfloat16()
    pair.opt.step()
    pair.ref._buckets.clear()
    pair.ref.step()
    pair.assert_same()
    pair.warm()


def test_parameter_dtype_change():
    """A parameter made float64 (no native kernel): the same error on both paths, never the fp32 kernel on it."""
    pair = Pair("adamw")
    pair.warm()
    pair.both(lambda opt, ps: setattr(ps[2], "data", ps[2].data.double()))
    pair.grads()
    for p, q in zip(pair.ours, pair.refs):
        p.grad, q.grad = p.grad.to(p.dtype), q.grad.to(q.dtype)
    errors = []
    for opt in (pair.opt, pair.ref):
        pair.ref._buckets.clear()
        with pytest.raises(ValueError, match=r"not torch\.float64") as err:
            opt.step()
        errors.append(str(err.value))
    assert errors[0] == errors[1]
    pair.assert_same()


def _set_(opt, ps):
    state = opt.state[ps[0]]
    state["exp_avg"].set_(state["exp_avg"].clone())


def _data(opt, ps):
    state = opt.state[ps[0]]
    state["exp_avg"].data = state["exp_avg"].data.clone()


def _data_shrunk(opt, ps):  # the same address, fewer elements: never handed to the kernel as the old size
    state = opt.state[ps[1]]
    state["exp_avg_sq"].data = state["exp_avg_sq"].data[:10]


def _in_place(opt, ps):
    opt.state[ps[0]]["exp_avg"].mul_(0.5)


def _replaced(opt, ps):
    opt.state[ps[0]]["exp_avg"] = opt.state[ps[0]]["exp_avg"] * 2


def _dict_replaced(opt, ps):
    opt.state[ps[3]] = {k: v.clone() for k, v in opt.state[ps[3]].items()}


def _counter(opt, ps):
    opt.state[ps[0]]["step"].fill_(100)


def _counter_replaced(opt, ps):
    opt.state[ps[0]]["step"] = torch.tensor(50.0)


def _resized(opt, ps):
    opt.state[ps[1]]["exp_avg"].resize_(7)


@pytest.mark.parametrize("change", [_set_, _data, _in_place, _replaced, _dict_replaced, _counter, _counter_replaced],
                         ids=lambda f: f.__name__.strip("_"))
def test_state_changed_between_steps(change):
    pair = Pair("adamw")
    pair.warm()
    old = pair.opt.state[pair.ours[0]]["exp_avg"]
    old_storage = old.untyped_storage()
    old_values = old.clone()
    pair.both(change)
    pair.step()
    pair.assert_same()
    if change in (_set_, _data):  # the memory the cache pointed into is no longer the state's: untouched
        stored = torch.tensor([], dtype=old.dtype).set_(old_storage)[: old.numel()]
        assert torch.equal(stored, old_values.reshape(-1))
    pair.warm()


@pytest.mark.parametrize("change", [_data_shrunk, _resized], ids=lambda f: f.__name__.strip("_"))
def test_state_the_kernel_cannot_take_goes_the_ordinary_way(change):
    """A state tensor made the wrong size (the same address, fewer elements): whatever the ordinary path makes of
    it (the eager step, or its error), never the kernel writing the old size."""
    pair = Pair("adamw")
    pair.warm()
    pair.both(change)
    pair.grads()
    outcomes = []
    for opt in (pair.opt, pair.ref):
        pair.ref._buckets.clear()
        try:
            opt.step()
            outcomes.append(None)
        except RuntimeError as err:
            outcomes.append(str(err))
    assert outcomes[0] == outcomes[1]
    if outcomes[0] is None:
        pair.assert_same()


def test_group_options_changed():
    pair = Pair("lamb")
    pair.warm()
    for opt in (pair.opt, pair.ref):
        opt.param_groups[0]["lr"] = 3e-2  # a hyperparameter: the cache steps it
        opt.param_groups[0]["weight_decay"] = 0.0
    pair.step()
    pair.assert_same()
    for opt in (pair.opt, pair.ref):  # a flag: another configuration for the 1-D parameters
        opt.param_groups[0]["exclude_bias_and_norm"] = True
    pair.step()
    pair.assert_same()
    pair.warm()


def test_strided_gradient_steps_as_the_ordinary_path_does():
    pair = Pair("adamw")
    pair.warm()
    pair.grads()
    for p, q in zip(pair.ours, pair.refs):
        if p.dim() == 2:
            g = torch.randn(p.shape[::-1], generator=pair.gen).t()
            p.grad, q.grad = g, g.clone().t().contiguous().t()
    pair.opt.step()
    pair.ref._buckets.clear()
    pair.ref.step()
    pair.assert_same()
    pair.warm()


def test_sparse_gradient_is_the_ordinary_error():
    pair = Pair("adamw")
    pair.warm()
    pair.grads()
    pair.ours[1].grad = pair.ours[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        pair.opt.step()


def test_deepcopy_and_pickle_start_without_a_cache():
    import copy
    import pickle

    pair = Pair("adamw")
    pair.warm()
    for clone in (copy.deepcopy(pair.opt), pickle.loads(pickle.dumps(pair.opt))):
        assert clone._buckets.hits == 0 and not clone._buckets._plans
