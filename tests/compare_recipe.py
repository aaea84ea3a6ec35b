"""A tiny training recipe for testing ``hf-optim compare`` (seconds per run, CPU).

Same interface as recipes/train_clm.py: ``HfArgumentParser`` over
``hf_optim.TrainingArguments``; trains a two-layer MLP on a fixed random
regression task, evaluates, and saves ``trainer_state.json``.
"""

from __future__ import annotations

import sys

import torch
from transformers import HfArgumentParser

import hf_optim


class TinyRegressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.net(x).squeeze(-1), labels)}


def dataset(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(32, generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, 32, generator=gen)
    y = torch.sin(x @ w / 4)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def main() -> int:
    parser = HfArgumentParser(hf_optim.TrainingArguments)
    parser.set_defaults(learning_rate=3e-3, warmup_steps=0, lr_scheduler_type="constant")
    (args,) = parser.parse_args_into_dataclasses()
    torch.manual_seed(args.seed)
    trainer = hf_optim.Trainer(
        model=TinyRegressor(), args=args, train_dataset=dataset(256, 1), eval_dataset=dataset(64, 2)
    )
    trainer.train()
    trainer.evaluate()
    trainer.save_state()
    return 0


if __name__ == "__main__":
    sys.exit(main())
