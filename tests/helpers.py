"""Shared test fixtures: tiny real models and data, and the optimizer lockstep checks."""

from __future__ import annotations

import io

import torch
from datasets import Dataset
from torch import Tensor

from hf_optim.state.blockwise import CodeMap


def tiny_bert(seed: int = 0, dropout: float = 0.1, hidden: int = 32, vocab: int = 128):
    """A 2-layer BERT classifier built from a config (no download), with dropout."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
        max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


def tiny_dataset(n: int = 64, seq: int = 16, seed: int = 0) -> Dataset:
    """A learnable task: the label is whether token 1 is in the upper half of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, seq), generator=gen)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 1] >= 64).long().tolist()})


def quadratic_params(seed: int = 0, shapes=((10, 5), (10,), (3, 4, 2), ())) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def set_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def lockstep(ref_opt, ours_opt, ref_params, our_params, steps: int = 20, seed: int = 0) -> None:
    """Step a reference optimizer and ours on the same gradients (cast to our params' dtype)."""
    for step in range(steps):
        set_grads(ref_params, seed + step)
        for r, o in zip(ref_params, our_params):
            o.grad = r.grad.clone().to(o.dtype)
        ref_opt.step()
        ours_opt.step()


def assert_compiled() -> None:
    """The compiled path really compiled: no missing compiler, no fallback to eager after a failure."""
    from hf_optim.plan import EXECUTOR, compiler_available

    assert compiler_available() and not EXECUTOR._compile_failed


def roundtrip(state_dict: dict) -> dict:
    """Save and load through torch.save / torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def code_units(cmap: CodeMap, x: Tensor, scale: Tensor) -> Tensor:
    """|x| * fl32(levels ** power / scale) (scale 0 -> 1), as the codec normalizes; finite inputs only.
    The top comes from float64 here, not from the codec, so a wrong ``CodeMap.top`` shows."""
    top = torch.tensor(float(cmap.levels**cmap.power), dtype=torch.float64).float()
    return x.abs() * top.expand_as(scale).div(torch.where(scale > 0, scale, 1.0))


def exact_nearest(cmap: CodeMap, u: Tensor) -> Tensor:
    """Nearest exact level c ** power to u (float64: exact), by exhaustive search; ties go down."""
    levels = torch.arange(0, cmap.levels + 1, dtype=torch.float64) ** cmap.power
    # the first minimum of every row; in chunks, so a large u needs no (len(u), levels) matrix at once
    return torch.cat([(chunk.double()[:, None] - levels).abs().argmin(dim=1) for chunk in u.split(1 << 16)])
