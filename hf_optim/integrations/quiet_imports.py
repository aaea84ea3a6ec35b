"""Keep foreign import-time noise out of hf_optim users' output.

Importing transformers' Trainer imports PEFT when it is installed, and PEFT
imports bitsandbytes and torchao; on a CPU-only machine those log that their
CUDA extensions failed to load ("Failed to load ..._C_mxfp8...", "Failed to
load CPU gemm_4bit_forward ...") and torch's pytree logs a deprecation per
torchao enum. None of it concerns an hf_optim run (those libraries are only
benchmark peers here), so a filter drops exactly these records on exactly
those loggers; everything else they log still shows.
"""

from __future__ import annotations

import logging

#: logger (the module that logs: a logger's filters do not see its children's records) -> noise fragments
_NOISE: dict[str, tuple[str, ...]] = {
    "torchao": ("Failed to load",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class _DropNoise(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def install() -> None:
    """Add the filters (once); call before importing transformers."""
    for name, fragments in _NOISE.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in target.filters):
            target.addFilter(_DropNoise(fragments))
