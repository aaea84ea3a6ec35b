"""Stop a DeepSpeed config from silently replacing the hf_optim optimizer.

With DeepSpeed, transformers' Trainer only calls ``create_optimizer`` when the
DeepSpeed config has no ``optimizer`` section: with one, DeepSpeed builds its
own optimizer (``DummyOptim`` stands in for ours) and ``--optim`` is dropped
without a word (transformers #38753, accelerate #3255). With ZeRO-Offload
(``zero_optimization.offload_optimizer.device`` = ``cpu``/``nvme``), DeepSpeed
runs the optimizer step itself over flattened fp32 partitions on that device,
so hf_optim's per-parameter storage policy, paging and layer-wise norms no
longer describe what runs. Both are detected from the config alone (a dict, a
JSON file or a JSON string, as ``TrainingArguments.deepspeed`` takes it, or
``accelerate launch --use_deepspeed``'s environment) before DeepSpeed is even
imported, and stop the run with an error naming what would really run, unless
the user opts out with ``allow_deepspeed_optimizer=True``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: the TrainingArguments field (and CLI flag) that lets DeepSpeed's choice stand
OPT_OUT_FLAG = "allow_deepspeed_optimizer"
_OFFLOAD_DEVICES = ("cpu", "nvme")


class DeepSpeedOptimizerConflict(ValueError):
    """A DeepSpeed config would run something other than the chosen hf_optim optimizer."""


def load_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config as a dict, from a dict, a JSON file, a JSON string or base64 JSON."""
    if isinstance(config, Mapping):
        return dict(config)
    text = str(config)
    if Path(text).is_file():
        with open(text, encoding="utf-8") as fh:
            return json.load(fh)
    for decode in (lambda s: s, lambda s: base64.urlsafe_b64decode(s).decode("utf-8")):
        try:
            loaded = json.loads(decode(text))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(loaded, dict):
            return loaded
    raise ValueError(f"deepspeed={text!r} is neither a JSON file, a JSON string nor a dict")


def conflicts(config: Mapping[str, Any], optim: str) -> list[str]:
    """What the config would run instead of ``optim``, one sentence per cause (empty: no conflict)."""
    found = []
    section = config.get("optimizer")
    if section:
        kind = section.get("type", "?") if isinstance(section, Mapping) else section
        params = section.get("params", {}) if isinstance(section, Mapping) else {}
        found.append(
            f"its 'optimizer' section makes DeepSpeed build its own {kind} optimizer"
            f"{f' with {dict(params)}' if params else ''}, and optim={optim!r} would never run"
        )
    zero = config.get("zero_optimization") or {}
    offload = zero.get("offload_optimizer") or {}
    device = offload.get("device") if isinstance(offload, Mapping) else None
    if device in _OFFLOAD_DEVICES or zero.get("cpu_offload") is True:
        device = device or "cpu"
        found.append(
            f"'zero_optimization.offload_optimizer.device' = {device!r} makes DeepSpeed ZeRO-Offload run the "
            f"optimizer step over flattened fp32 partitions on {device}: optim={optim!r}'s per-parameter state "
            "storage, paging and layer-wise norms would not apply"
        )
    return found


def accelerate_env_config() -> dict[str, Any] | None:
    """The DeepSpeed config ``accelerate launch --use_deepspeed`` passes through the environment, if any."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() not in ("1", "true", "yes"):
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path.lower() != "none":
        return load_config(path)
    device = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    return {"zero_optimization": {"offload_optimizer": {"device": device}}}


def check(deepspeed: Any, optim: str, *, allow: bool = False) -> None:
    """Raise ``DeepSpeedOptimizerConflict`` if DeepSpeed would replace hf_optim's ``optim``.

    ``deepspeed`` is ``TrainingArguments.deepspeed`` (None, a path, a JSON
    string or a dict); without one, accelerate's DeepSpeed environment is
    checked. With ``allow=True`` nothing is raised.
    """
    config = load_config(deepspeed) if deepspeed else accelerate_env_config()
    if allow or not config:
        return
    found = conflicts(config, optim)
    if found:
        raise DeepSpeedOptimizerConflict(
            f"The DeepSpeed config would replace the hf_optim optimizer: {'; and '.join(found)}. "
            f"Remove the section(s) from the DeepSpeed config to train with optim={optim!r}, or pass "
            f"--{OPT_OUT_FLAG} (TrainingArguments({OPT_OUT_FLAG}=True)) to let DeepSpeed's choice run."
        )
