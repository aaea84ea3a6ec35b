"""Which precision each parameter's state is stored in, and what it costs.

With ``state_precision="8bit"`` the per-parameter policy (``codec_for``) keeps
small tensors, embeddings, the output head and norms in fp32, so "8-bit"
alone does not say what memory a model's state takes. This report lists
every parameter with the codec of its state and the state's bytes: measured
from the tensors once state exists, from the codecs' exact memory model
before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from . import planned_bytes


@dataclass(frozen=True)
class PrecisionRow:
    name: str
    shape: tuple[int, ...]
    numel: int
    precision: str  # codec name, or "a+b" when buffers differ
    state_bytes: int
    measured: bool  # bytes summed from allocated state tensors (else: the codecs' model)


@dataclass(frozen=True)
class PrecisionReport:
    rows: tuple[PrecisionRow, ...]

    @property
    def total_state_bytes(self) -> int:
        return sum(row.state_bytes for row in self.rows)

    @property
    def bytes_per_param(self) -> float:
        numel = sum(row.numel for row in self.rows)
        return self.total_state_bytes / numel if numel else 0.0

    def by_precision(self) -> dict[str, int]:
        """Parameter elements per state precision."""
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.precision] = out.get(row.precision, 0) + row.numel
        return out

    def __str__(self) -> str:
        width = max([len(row.name) for row in self.rows] + [9])
        lines = [f"{'parameter':{width}s} {'shape':>18s} {'precision':>9s} {'state bytes':>12s}"]
        for row in self.rows:
            mark = "" if row.measured else "*"
            shape = "x".join(map(str, row.shape)) or "scalar"
            lines.append(f"{row.name:{width}s} {shape:>18s} {row.precision:>9s} {row.state_bytes:>11d}{mark or ' '}")
        lines.append(f"total {self.total_state_bytes} bytes, {self.bytes_per_param:.3f} bytes/param"
                     + ("; * = not allocated yet (modelled)" if any(not r.measured for r in self.rows) else ""))
        return "\n".join(lines)


def precision_report(optimizer: Any) -> PrecisionReport:
    """The report for an ``hf_optim.engine.Optimizer``."""
    rows = []
    for group in optimizer.param_groups:
        for name, p in optimizer._named(group):
            layout = optimizer._layout(p, name, group)
            precision = "+".join(sorted({codec.name for _, codec in layout})) or "none"
            state = optimizer.state.get(p)
            if state:
                nbytes = sum(t.nbytes for t in state.values() if isinstance(t, Tensor))
            else:  # step counter + every buffer (+ the Kahan buffer of a bf16/fp16 parameter)
                rule = optimizer._rule_for(p, name)  # a Muon optimizer's AdamW parameters: AdamW's buffers
                nbytes = planned_bytes(rule, optimizer._group_for(rule, group), name, p.numel(), p.dtype)
            rows.append(PrecisionRow(name, tuple(p.shape), p.numel(), precision, nbytes, bool(state)))
    return PrecisionReport(tuple(rows))
