"""DDP worker under ``accelerate launch --config_file recipes/accelerate/ddp.yaml``.

``tests/dist/ddp_worker.py OUT_DIR OPTIM...``: trains tests/dist/common.py's
model with ``hf_optim.Trainer`` for each optimizer name, each rank on its own
shard of the data, and writes ``rank{r}.pt`` (world size, the optimizer class
that really ran, final params). The test checks two ranks ran and ended with
identical parameters.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import HYPER, IN, OUT, make_model

import hf_optim


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.net(x), labels)}


def dataset(n: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(IN, OUT, generator=g) / IN**0.5
    xs = torch.randn(n, IN, generator=g)
    return [{"x": x, "labels": torch.tanh(x @ w)} for x in xs]


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    result: dict = {"runs": {}}
    for name in names:
        args = hf_optim.TrainingArguments(
            os.path.join(out, name), optim=name, learning_rate=HYPER["lr"], weight_decay=HYPER["weight_decay"],
            max_steps=4, per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to=[],
            seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),  # else each CPU process trains alone (see the test)
        )
        model = Regression()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = hf_optim.Trainer(model=model, args=args, train_dataset=dataset())
        trainer.train()
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        result["runs"][name] = {
            "optimizer": f"{type(inner).__module__}.{type(inner).__qualname__}",
            "state_dtypes": sorted({str(t.dtype) for s in inner.state.values() for t in s.values()}),
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "initial": initial,
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        }
    result.update(
        rank=dist.get_rank(), world=dist.get_world_size(), backend=str(dist.get_backend()),
        num_processes=trainer.accelerator.num_processes,
    )
    torch.save(result, os.path.join(out, f"rank{result['rank']}.pt"))
    # a barrier that names a missing rank after a minute instead of hanging until the test's timeout
    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60), wait_all_ranks=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
