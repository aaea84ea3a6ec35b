"""FSDP2 + Muon worker: ``torchrun --nproc_per_node 2 tests/dist/muon_fsdp_worker.py OUT_DIR``.

Muon orthogonalizes each whole matrix, which a row shard is not, so hf_optim refuses a matrix sharded over
ranks when the optimizer is built (before any step could update part of the model). Each rank writes
``rank{r}.pt`` with the error it got and whether AdamW then steps the same sharded model.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from common import batch, loss_fn, make_model


def main() -> None:
    import hf_optim

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    error = None
    try:
        hf_optim.create_optimizer("muon", model, execution="eager", lr=0.02)
    except ValueError as err:
        error = str(err)
    # an elementwise optimizer on the same sharded model still trains (the refusal is Muon's alone)
    opt = hf_optim.create_optimizer("adamw", model, execution="eager", lr=0.02)
    x, y = batch(0)
    loss_fn(model, x.chunk(world)[rank], y.chunk(world)[rank]).backward()
    opt.step()
    result = {"rank": rank, "world": world, "error": error, "adamw_stepped": bool(opt.state)}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
