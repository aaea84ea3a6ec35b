"""An optimizer's state dict: plain tensors out, and back in converted to this optimizer's storage.

Saving: torch's ``state_dict`` plus a format version per param group; a
sharded (FSDP2) parameter's state goes out as DTensors shaped like the
parameter (decoded to fp32: 8-bit blocks follow the local shard, not the
global tensor); the placement copies the tensors it owns into plain CPU ones.

Loading is all or nothing: every group and every tensor is checked and
converted into freshly allocated storage before anything of the optimizer is
replaced, and the placement's ``transaction`` undoes any state it moved.
State saved in another codec's layout (fp32 vs 8-bit, torch.optim's) is
decoded and re-encoded into this optimizer's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .execution import KAHAN_KEY, compute_dtype
from .rules.base import Buffer
from .sharding import is_sharded, local, to_local
from .state import CODECS, StateCodec
from .state.layouts import flat_state
from .state.loading import copy_checked, loaded_step

if TYPE_CHECKING:
    from .engine import Optimizer

#: version of the state-dict layout, stored in every saved param group
FORMAT_VERSION = 1
FORMAT_KEY = "hf_optim_format"


def state_dict(opt: Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """``sd`` (torch's ``Optimizer.state_dict`` of ``opt``) as hf_optim saves it."""
    for group, saved in zip(opt.param_groups, sd["param_groups"]):
        saved[FORMAT_KEY] = FORMAT_VERSION
        for (name, p), pid in zip(opt._named(group), saved["params"]):
            if pid in sd["state"] and is_sharded(p):
                sd["state"][pid] = _global_state(opt, p, name, group)
    return opt._placement.export(sd)  # tensors the placement owns copied out into plain CPU tensors


def _global_state(opt: Optimizer, p: Tensor, name: str, group: Mapping[str, Any]) -> dict[str, Tensor]:
    """A sharded (FSDP2) parameter's state as DTensors shaped like the parameter.

    torch.distributed.checkpoint saves plain tensors once (as replicated) but
    DTensors per shard, so each buffer goes out as its fp32 value sharded like
    the parameter; 8-bit codes are decoded (their blocks follow the local
    shard, not the global tensor) and re-encoded on load by the cross-storage
    conversion.
    """
    from torch.distributed.tensor import DTensor

    state, shard_of = opt.state[p], local(p)

    def shard(t: Tensor) -> Tensor:
        return DTensor.from_local(
            t.reshape(shard_of.shape), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )

    out: dict[str, Tensor] = {"step": state["step"]}
    for buffer, codec in opt._layout(p, name, group):
        out[buffer.name] = shard(codec.decode(flat_state(state), buffer, shard_of.numel()))
    if KAHAN_KEY in state:
        out[KAHAN_KEY] = shard(state[KAHAN_KEY])
    return out


def load_state_dict(opt: Optimizer, state_dict: Any) -> None:
    """``Optimizer.load_state_dict``'s work (its docstring says what is checked); ``opt`` unchanged on error."""
    from .engine import ENGINE_DEFAULTS, STORAGE_OPTIONS

    state_dict = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("param_groups"), list) or \
            not isinstance(state_dict.get("state"), Mapping):
        raise ValueError("loaded state dict must be a mapping with 'state' (a dict) and 'param_groups' (a list)")
    saved_groups = state_dict["param_groups"]
    state_dict = {**state_dict, "state": {k: to_local(v) for k, v in state_dict["state"].items()}}
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, "
            f"this optimizer has {len(opt.param_groups)}"
        )
    new_groups: list[dict[str, Any]] = []
    new_state: dict[Tensor, dict[str, Tensor]] = {}
    with opt._placement.transaction():
        for index, (group, saved_group) in enumerate(zip(opt.param_groups, saved_groups, strict=True)):
            merged = _merged_group(opt, index, group, saved_group, {**opt.rule.defaults, **ENGINE_DEFAULTS},
                                   STORAGE_OPTIONS)
            new_groups.append(merged)
            for (name, p), saved_id in zip(opt._named(merged), saved_group["params"], strict=True):
                saved = state_dict["state"].get(saved_id)
                if saved:
                    if not isinstance(saved, Mapping):
                        raise ValueError(f"loaded state for {name} is a {type(saved).__name__}, not a dict")
                    new_state[p] = _convert(opt, p, name, merged, saved)
                    opt._placement.place(p, new_state[p])  # off the device now, not after all are converted
    # nothing above touched opt: commit only now that everything converted
    opt.param_groups = new_groups
    opt.state = defaultdict(dict, new_state)
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def _merged_group(opt: Optimizer, index: int, group: Mapping[str, Any], saved_group: Any,
                  defaults: Mapping[str, Any], storage_options: tuple[str, ...]) -> dict[str, Any]:
    """The param group ``index`` as loaded: the saved settings, this optimizer's params and storage, validated."""
    if not isinstance(saved_group, Mapping) or not isinstance(saved_group.get("params"), list | tuple):
        raise ValueError(f"loaded state dict: parameter group {index} is not a dict with a 'params' list")
    if len(group["params"]) != len(saved_group["params"]):
        raise ValueError(
            f"loaded state dict contains a parameter group {index} of {len(saved_group['params'])} "
            f"parameters that doesn't match the size of optimizer's group ({len(group['params'])})"
        )
    merged = {k: v for k, v in saved_group.items() if k not in ("params", FORMAT_KEY)}
    for key, value in defaults.items():
        merged.setdefault(key, value)  # a torch.optim or older checkpoint lacks our options
    for key in storage_options:  # storage is this optimizer's choice: saved state converts to it
        merged[key] = group[key]
    merged["params"] = group["params"]
    if "param_names" in group:
        merged["param_names"] = group["param_names"]
    opt._validate_group(merged)
    return merged


def _convert(opt: Optimizer, p: Tensor, name: str, group: Mapping[str, Any],
             saved: Mapping[str, Any]) -> dict[str, Tensor]:
    """One parameter's saved state in this optimizer's layout: every tensor checked, then copied
    into freshly allocated storage (so dtype, strides and device are always this layout's)."""
    shard_of = local(p)
    state = opt._new_state(p, name, group)
    state["step"] = loaded_step(name, saved.get("step"), shard_of.device)
    for buffer, codec in opt._layout(p, name, group):
        saved_codec = codec if codec.holds(saved, buffer) else _find_codec(saved, buffer)
        if saved_codec is None:
            raise ValueError(
                f"loaded state for {name} lacks buffer {buffer.name!r} "
                f"(has: {', '.join(sorted(map(str, saved)))})"
            )
        target = state if saved_codec is codec else saved_codec.allocate(buffer, shard_of)
        for key in saved_codec.keys(buffer):
            copy_checked(name, key, saved[key], target[key])
        if saved_codec is not codec:
            value = saved_codec.decode(flat_state(target), buffer, shard_of.numel())
            codec.encode(value.to(compute_dtype(shard_of.dtype)).clone(), flat_state(state), buffer)
    if KAHAN_KEY in state and KAHAN_KEY in saved:
        copy_checked(name, KAHAN_KEY, saved[KAHAN_KEY], state[KAHAN_KEY])
    return state


def _find_codec(saved: Mapping[str, Any], buffer: Buffer) -> StateCodec | None:
    return next((c for c in CODECS.values() if c.holds(saved, buffer)), None)
