"""Parameter-name patterns shared by the rules and the storage policy (neither imports the other).

Embeddings, the output head and norms behave unlike hidden weight matrices: their gradients are sparse
(a row per token seen) or their tensors small, and they are sensitive to state error. The storage policy
keeps their state fp32 under 8-bit (``hf_optim.state.FP32_PATTERNS``); Muon leaves them to AdamW
(``hf_optim.rules.muon``). Patterns are ``re.search`` regexes, matched case-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: token and position embeddings (``embed_tokens``, GPT-2's ``wte``/``wpe``) and the output head
EMBEDDING_AND_HEAD_PATTERNS: tuple[str, ...] = (r"embed", r"(^|\.)(wte|wpe)(\.|$)", r"lm_head")
#: normalization layers (``input_layernorm``, ``norm``, GPT-2's ``ln_1``/``ln_f``)
NORM_PATTERNS: tuple[str, ...] = (r"norm", r"(^|\.)ln_?\w*(\.|$)")


def matches_any(name: str | None, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of ``patterns`` (False for an unnamed parameter)."""
    return name is not None and any(re.search(pattern, name, re.IGNORECASE) for pattern in patterns)
