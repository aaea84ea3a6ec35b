"""FSDP2 worker: ``torchrun --nproc_per_node 2 tests/dist/fsdp_worker.py OUT_DIR STEPS OPTIM...``.

Shards tests/dist/common.py's model with ``fully_shard`` (uneven row shards),
trains it with an hf_optim optimizer, each rank on its half of every batch,
then round-trips the optimizer state through ``torch.distributed.checkpoint``
and keeps training both copies. Each rank writes ``rank{r}.pt``; the test
compares them with a single-process run, so a launch that ran one process,
or ran unsharded, fails there.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from common import batch, loss_fn, make_model, make_optimizer


def sharded_model(mesh):
    model = make_model()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model, opt, steps: range, rank: int, world: int) -> list[float]:
    losses = []
    for step in steps:
        x, y = batch(step)
        loss = loss_fn(model, x.chunk(world)[rank], y.chunk(world)[rank])
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def full_params(model) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}


def run_one(name: str, out: str, steps: int, mesh, rank: int, world: int) -> dict:
    model = sharded_model(mesh)
    opt = make_optimizer(name, model)
    losses = train(model, opt, range(steps), rank, world)
    return {
        "losses": losses,
        "params": full_params(model),
        "local_shapes": {n: tuple(p.to_local().shape) for n, p in model.named_parameters()},
        "state_dtypes": sorted({str(t.dtype) for s in opt.state.values() for t in s.values()}),
    }


def checkpoint_round_trip(name: str, out: str, steps: int, mesh, rank: int, world: int) -> dict:
    """Train, save the optimizer state with DCP, load it into a fresh copy, train both on."""
    half = steps // 2
    model = sharded_model(mesh)
    opt = make_optimizer(name, model)
    train(model, opt, range(half), rank, world)
    ckpt = os.path.join(out, f"dcp_{name}")
    dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=ckpt)
    dist.barrier()
    resumed = sharded_model(mesh)
    resumed.load_state_dict(model.state_dict())
    resumed_opt = make_optimizer(name, resumed)
    loaded = get_optimizer_state_dict(resumed, resumed_opt)
    dcp.load(loaded, checkpoint_id=ckpt)
    set_optimizer_state_dict(resumed, resumed_opt, loaded)
    train(model, opt, range(half, steps), rank, world)
    train(resumed, resumed_opt, range(half, steps), rank, world)
    return {"params": full_params(model), "resumed_params": full_params(resumed)}


def main() -> None:
    out, steps, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    result: dict = {"rank": rank, "world": world, "runs": {}, "dcp": {}}
    try:
        for name in names:
            result["runs"][name] = run_one(name, out, steps, mesh, rank, world)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        for name in names:  # last: a failure here must not cost the parity results
            try:
                result["dcp"][name] = checkpoint_round_trip(name, out, steps, mesh, rank, world)
            except (Exception, CheckpointException) as err:  # recorded for the test to report
                result["dcp"][name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
