"""The paged placement: optimizer states that leave the device when memory runs short.

Why: optimizer state is 2-3x the model for Adam-like rules, and it is touched
once per step, so it is the natural thing to move out of scarce memory. A
paged optimizer keeps each parameter's state beside the parameter while a
budget allows (then it costs nothing: no copy, no check beyond a dict
lookup) and moves only the states over budget:

- **CUDA**: states over the device budget live in pinned host memory, streamed
  to the device around each update with prefetch (``hf_optim.state.paged_cuda``).
- **CPU**: states over the RAM budget live in one file-backed spill file per
  optimizer in ``paged_dir`` (default ``tempfile.gettempdir()``;
  ``hf_optim.state.arena``): a new state is allocated there directly (never a
  full anonymous copy first), the update runs on the mapped memory in place,
  the next parameter's pages are prefetched with ``madvise(MADV_WILLNEED)``
  and, after its update, a parameter's pages leave the process
  (``MADV_DONTNEED``: they stay in the page cache, which the OS writes to disk
  and drops under memory pressure), so a machine without swap can hold states
  larger than its free RAM. The file has no name (``O_TMPFILE``), so nothing
  is left behind however the process ends (even SIGKILL), and every range is
  reserved on disk before it is mapped, so a full disk is an ``OSError`` when
  states are placed, never a SIGBUS mid-step.

Placing is all or nothing: the engine places every new state of a step before
any update (``prepare``) and a load's states inside ``transaction``, so when
space runs out the step changes nothing and a failed load leaves the pager as
it was.

The update itself is the same kernel on the same values, so paged and
non-paged optimizers give bit-identical results; ``export`` copies paged
tensors out into plain CPU tensors so a paged state dict equals a non-paged
one and loads either way.

Options (``PagedPlacement.options``): ``paged_budget`` (``hf_optim.state.budget``;
``paged_budget=0`` pages everything) and ``paged_dir``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .arena import MADV_DONTNEED, MADV_POPULATE_WRITE, MADV_WILLNEED, Region, SpillArena, malloc_trim
from .budget import AUTO_FRACTION, free_bytes, parse_budget  # noqa: F401 (AUTO_FRACTION: API)
from .layouts import flat_state
from .paged_cuda import MAX_IN_FLIGHT, CudaStreams, pinned  # noqa: F401 (MAX_IN_FLIGHT: API)
from .placement import Placement, register_placement
from .traffic import Traffic

#: CPU: paged state stepped by one call (then its pages leave the process): per-call costs (threads
#: waking up, ~ms on a busy machine) are paid per batch, and resident memory stays bounded by it
CPU_BATCH_BYTES = 16 * 2**20


@dataclass
class _Paged:
    """Bookkeeping for one parameter whose state lives off its device."""

    state: dict[str, Tensor]  # the optimizer's state dict for the parameter (home tensors)
    keys: tuple[str, ...]  # which entries are paged
    device: torch.device  # the parameter's device
    nbytes: int
    region: Region | None = None  # CPU: the range of the spill file holding the tensors
    ready: Any = None  # CUDA: event after the host->device copy
    pending: dict[str, Tensor] | None = None  # CUDA: device copies (prefetched or in use)
    written: Any = None  # CUDA: event after the last write-back


@dataclass
class _Journal:
    """What a transaction restores on failure: the pager's books and every state entry it replaced."""

    paged: dict[Tensor, _Paged]
    resident: dict[Tensor, tuple[torch.device, int]]
    used: dict[torch.device, int]
    replaced: list[tuple[dict[str, Tensor], str, Tensor]] = field(default_factory=list)


class PagedPlacement(Placement):
    """Decides where each parameter's state lives and moves it around the update (the ``Placement`` calls).

    Options: ``paged_budget``: bytes of state kept beside the parameters (a number > 1 or ``"2GiB"``), a
    fraction of the free memory (``0.5`` or ``"50%"``), or ``None``/``"auto"`` (half of what is free); the
    rest is paged. ``paged_dir``: on CPU, the spill directory for file-backed state (default
    ``tempfile.gettempdir()``).
    """

    name = "paged"
    options = {"paged_budget": None, "paged_dir": None}
    hint = "use a paged_ optimizer name or placement='paged'"

    def __init__(self, paged_budget: Any = None, paged_dir: str | None = None) -> None:
        self.budget_spec = parse_budget(paged_budget)
        spill = tempfile.gettempdir() if paged_dir is None else str(paged_dir)
        if not (os.path.isdir(spill) and os.access(spill, os.W_OK)):
            raise ValueError(f"Invalid paged_dir: {paged_dir!r} (not an existing writable directory)")
        self.paged_dir = spill
        self._budget: dict[torch.device, int] = {}
        self._resident: dict[Tensor, tuple[torch.device, int]] = {}
        self._used: dict[torch.device, int] = {}
        self._paged: dict[Tensor, _Paged] = {}
        self._order: list[Tensor] = []
        self._next: dict[Tensor, Tensor] = {}
        self._stats = Traffic()
        self._cuda = CudaStreams(self._stats)
        self._arena = SpillArena(spill)
        self._journal: _Journal | None = None

    def __getstate__(self) -> dict[str, Any]:
        # a copy (deepcopy, pickle) keeps the options; its states are placed anew when first stepped
        return {"budget_spec": self.budget_spec, "paged_dir": self.paged_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(None, state["paged_dir"])  # type: ignore[misc]
        self.budget_spec = state["budget_spec"]

    def __repr__(self) -> str:
        return f"PagedPlacement(budget={self.budget_spec}, paged_dir={self.paged_dir!r})"

    # --- where a state lives ------------------------------------------------------

    def budget(self, device: torch.device) -> int:
        """The bytes of state allowed beside parameters on ``device`` (fixed at first use)."""
        if device not in self._budget:
            kind, value = self.budget_spec
            self._budget[device] = int(value if kind == "bytes" else value * free_bytes(device))
        return self._budget[device]

    def place(self, param: Tensor, state: dict[str, Tensor]) -> None:
        """Keep ``state`` beside its parameter within budget, else move it off the device.

        All or nothing: if the move fails (no space for the spill file), ``state`` and the pager are as before.
        """
        with self.transaction():
            self._place(param, state, fresh=False)

    def allocate(self, param: Tensor, layout: dict[str, Tensor]) -> dict[str, Tensor]:
        """Zero-valued state for ``param`` where it will live, from ``layout`` (its tensors on the meta device).

        Paged CPU state is allocated in the spill file directly: no anonymous copy is ever made of it.
        """
        state = dict(layout)
        self._place(param, state, fresh=True)
        return state

    def prepare(self, states: MutableMapping[Tensor, dict[str, Tensor]],
                makers: Iterable[tuple[Tensor, Callable[..., dict[str, Tensor]]]]) -> None:
        """Before a step updates anything: create the missing states (``maker(allocate=...)``) and place any
        state the pager does not know (e.g. after a deepcopy), all or nothing: a full disk changes nothing."""
        created: list[tuple[Tensor, bool]] = []
        try:
            with self.transaction():
                for param, maker in makers:
                    known = param in states
                    state = states[param]
                    if not state:
                        created.append((param, known))
                        state.update(maker(allocate=lambda layout, p=param: self.allocate(p, layout)))
                        entry = self._paged.get(param)
                        if entry is not None:
                            entry.state = state  # the optimizer's own dict, which ``fetch`` checks
                    elif param not in self._paged and param not in self._resident:
                        self._place(param, state, fresh=False)
        except BaseException:
            for param, known in created:
                if known:
                    states[param].clear()
                else:
                    states.pop(param, None)
            raise

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Placements inside are all or nothing: on an exception the pager and every state dict it changed
        are restored (the spill ranges placed since return to the arena when their tensors are gone)."""
        if self._journal is not None:  # nested: the outer transaction decides
            yield
            return
        journal = self._journal = _Journal(dict(self._paged), dict(self._resident), dict(self._used))
        try:
            yield
        except BaseException:
            for state, key, old in reversed(journal.replaced):
                state[key] = old
            self._paged, self._resident, self._used = journal.paged, journal.resident, journal.used
            raise
        finally:
            self._journal = None
        if journal.replaced and self._paged:
            malloc_trim()  # the copies just moved into the spill file leave the heap

    def _place(self, param: Tensor, state: dict[str, Tensor], fresh: bool) -> None:
        """Register ``state`` (``fresh``: meta tensors to allocate as zeros) beside its parameter or paged."""
        self._forget(param)
        keys = tuple(k for k, t in state.items() if isinstance(t, Tensor) and t.dim() > 0 and t.numel() > 0)
        to_local = getattr(param, "to_local", None)  # a DTensor's state is its local shard's
        device = (to_local() if to_local is not None else param).device
        nbytes = sum(state[k].nbytes for k in keys)
        if keys and self._used.get(device, 0) + nbytes > self.budget(device):
            entry = _Paged(state, keys, device, nbytes)
            if device.type == "cuda":
                moved = pinned(state, keys, fresh)
            elif device.type == "cpu":
                entry.region, moved = self._arena.map_tensors({k: state[k] for k in keys}, fresh)
            else:
                raise RuntimeError(f"placement='paged' supports CPU and CUDA parameters, not {device.type}")
            # the 0-d step (and any empty buffer) stays beside the parameter
            moved.update({k: torch.zeros(t.shape, dtype=t.dtype, device=device)
                          for k, t in state.items() if t.is_meta and k not in moved})
            self._replace(state, moved)
            self._paged[param] = entry
            return
        self._replace(state, {k: torch.zeros(t.shape, dtype=t.dtype, device=device) if t.is_meta
                              else t.to(device)  # a copied paged state coming home
                              for k, t in state.items() if t.device != device})
        self._resident[param] = (device, nbytes)  # (also a state with nothing to page: known, never re-placed)
        self._used[device] = self._used.get(device, 0) + nbytes

    def _replace(self, state: dict[str, Tensor], tensors: Mapping[str, Tensor]) -> None:
        for key, tensor in tensors.items():
            if self._journal is not None:
                self._journal.replaced.append((state, key, state[key]))
            state[key] = tensor

    def _forget(self, param: Tensor) -> None:
        device, nbytes = self._resident.pop(param, (None, 0))
        if device is not None:
            self._used[device] -= nbytes
        self._paged.pop(param, None)

    # --- around the update ----------------------------------------------------------

    def run(
        self,
        params: Sequence[Tensor],
        items: Sequence[Any],
        step: Callable[[list[Any]], None],
        states: Mapping[Tensor, dict[str, Tensor]],
        with_state: Callable[[Any, Mapping[str, Tensor]], Any],
    ) -> None:
        """Run ``step`` over one bucket: resident parameters at once, paged ones in bounded batches.

        ``items`` are the engine's step inputs, one per parameter in ``params``;
        ``states`` is the optimizer's state mapping. A paged parameter's item is
        rebuilt by ``with_state`` on the state ``fetch`` returns, and ``release``
        follows its update.
        """
        items = list(items)
        for i, p in enumerate(params):
            if p not in self._paged and p not in self._resident:  # e.g. after a deepcopy: place, re-read
                self.place(p, states[p])
                items[i] = with_state(items[i], states[p])
        paged = [i for i, p in enumerate(params) if p in self._paged]
        if not paged:
            step(items)
            return
        first = self._paged[params[paged[0]]]
        self._prefetch(first)  # overlaps the resident parameters' update
        chosen = set(paged)
        resident = [item for i, item in enumerate(items) if i not in chosen]
        if resident:
            step(resident)
        for batch in self._batches(params, paged):
            chosen_params = [params[i] for i in batch]
            chosen_states = [states[p] for p in chosen_params]
            working = self.fetch(chosen_params, chosen_states)
            step([with_state(items[i], w) for i, w in zip(batch, working, strict=True)])
            self.release(chosen_params, chosen_states)

    def _batches(self, params: Sequence[Tensor], paged: Sequence[int]) -> list[list[int]]:
        """Paged parameters stepped together: on CPU up to ``CPU_BATCH_BYTES`` of state (one kernel call,
        not one per parameter, and resident memory still bounded), on CUDA one at a time (streamed)."""
        batches: list[list[int]] = []
        size = 0
        for i in paged:
            entry = self._paged[params[i]]
            if entry.device.type == "cpu" and batches and size + entry.nbytes <= CPU_BATCH_BYTES:
                batches[-1].append(i)
                size += entry.nbytes
            else:
                batches.append([i])
                size = entry.nbytes
        return batches

    def fetch(self, params: Sequence[Tensor], states: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Flat (1-D) state dicts to update ``params`` with, on their device; prefetches the next.

        ``states`` are the optimizer's state dicts of ``params``.
        """
        out = []
        for param, state in zip(params, states, strict=True):
            entry = self._paged.get(param)
            if entry is not None and entry.state is not state:  # replaced behind our back: place anew
                self.place(param, state)
                entry = self._paged.get(param)
            if entry is None:
                out.append(flat_state(state))
                continue
            self._order.append(param)
            if entry.device.type == "cpu":
                # map the pages writable in one call (the update writes every one of them): faulting them in
                # one by one costs about twice as much
                entry.region.advise(MADV_POPULATE_WRITE)
                out.append(flat_state(state))  # updated in place in the mapping
            else:
                out.append(flat_state(self._cuda.fetch(entry)))
            nxt = self._paged.get(self._next.get(param))  # type: ignore[arg-type]
            if nxt is not None:
                self._prefetch(nxt)
        return out

    def release(self, params: Sequence[Tensor], states: Sequence[dict[str, Tensor]]) -> None:
        """After the update of ``params``: write device copies back to the host, asynchronously."""
        for param in params:
            entry = self._paged.get(param)
            if entry is not None and entry.region is not None:
                # updated: the pages leave this process (they stay in the page cache, written back by the OS),
                # so resident memory holds one parameter's state at a time
                entry.region.advise(MADV_DONTNEED)
                continue
            if entry is not None and entry.device.type == "cuda":
                self._cuda.write_back(entry)

    def end_step(self) -> None:
        """Close one optimizer step: learn the order for prefetch, roll the statistics."""
        if self._order:
            self._next = dict(zip(self._order, self._order[1:]))
            self._order = []
        if any(entry.region is not None for entry in self._paged.values()):
            malloc_trim()  # the step's temporaries go back to the OS, not into the heap's high-water mark
        self._stats.close_step()

    def _prefetch(self, entry: _Paged) -> None:
        if entry.device.type == "cuda":
            if entry.pending is None:
                self._cuda.to_device(entry)
        elif entry.region is not None:
            entry.region.advise(MADV_WILLNEED)

    # --- state dict and telemetry ---------------------------------------------------

    def synchronize(self) -> None:
        """Wait for every pending write-back (host copies are then current)."""
        self._cuda.synchronize()

    def export(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with paged tensors copied out into plain CPU tensors."""
        if not self._paged:
            return state_dict
        self.synchronize()
        for entry in self._paged.values():
            if entry.region is not None:
                entry.region.advise(MADV_WILLNEED)
        paged = {id(e.state[k]) for e in self._paged.values() for k in e.keys}
        state_dict["state"] = {
            index: {k: _plain(t) if id(t) in paged else t for k, t in state.items()}
            if any(id(t) in paged for t in state.values())
            else state
            for index, state in state_dict["state"].items()
        }
        for entry in self._paged.values():  # read: the pages may leave the process again
            if entry.region is not None:
                entry.region.advise(MADV_DONTNEED)
        return state_dict

    def stats(self) -> dict[str, float]:
        """Telemetry: bytes resident/paged now, and bytes moved / stall of the last step and in total."""
        return {
            "resident_bytes": sum(n for _, n in self._resident.values()),
            "paged_bytes": sum(e.nbytes for e in self._paged.values()),
            "paged_params": len(self._paged),
            "budget_bytes": sum(self._budget.values()),
            **self._stats.report(),
        }


def _plain(t: Tensor) -> Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    out.copy_(t)
    return out


register_placement(PagedPlacement)
