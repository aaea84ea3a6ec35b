"""The CUDA half of the paged placement: pinned host copies streamed around each update.

States over the device budget live in pinned host memory. Before a
parameter's update its state is copied to the device on a side stream; the
next parameter's state is prefetched while this one updates (the order is the
previous step's, ``PagedPlacement``'s); after the update it is written back
asynchronously on a second side stream. At most ``MAX_IN_FLIGHT`` write-backs
are pending, so device memory holds a few parameters' states, not all of them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .traffic import Traffic

#: pending device->host write-backs before the host waits (bounds device memory in use)
MAX_IN_FLIGHT = 3


def pinned(state: dict[str, Tensor], keys: Sequence[str], fresh: bool) -> dict[str, Tensor]:
    """Pinned host tensors for ``state[keys]``: zeros (``fresh``: ``state`` is on the meta device) or copies."""
    return {k: torch.zeros(state[k].shape, dtype=state[k].dtype, pin_memory=True) if fresh
            else torch.empty(state[k].shape, dtype=state[k].dtype, pin_memory=True).copy_(state[k])
            for k in keys}


class CudaStreams:
    """The side streams and pending write-backs of one paged optimizer's CUDA states.

    An entry (``paged._Paged``) carries ``state`` (home tensors, pinned), ``keys``, ``device``,
    ``nbytes`` and the fields this class keeps: ``pending`` (device copies), ``ready`` (after the
    host->device copy) and ``written`` (after the last write-back).
    """

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic
        self._streams: dict[torch.device, tuple[Any, Any]] = {}
        self._in_flight: deque[Any] = deque()

    def _side_streams(self, device: torch.device) -> tuple[Any, Any]:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def to_device(self, entry: Any) -> None:
        """Start copying ``entry``'s state to its device (a prefetch, or the fetch itself)."""
        while len(self._in_flight) >= MAX_IN_FLIGHT:  # bound the device copies alive at once
            event = self._in_flight.popleft()
            if not event.query():
                t0 = time.perf_counter()
                event.synchronize()
                self.traffic.stall_s += time.perf_counter() - t0
        h2d, _ = self._side_streams(entry.device)
        if entry.written is not None:  # the host copy must hold the last write-back
            h2d.wait_event(entry.written)
        with torch.cuda.stream(h2d):
            entry.pending = {k: entry.state[k].to(entry.device, non_blocking=True) for k in entry.keys}
        entry.ready = torch.cuda.Event()
        entry.ready.record(h2d)
        self.traffic.moved_bytes += entry.nbytes

    def fetch(self, entry: Any) -> dict[str, Tensor]:
        """``entry``'s state with its device copies, which the compute stream may use from now on."""
        if entry.pending is None:
            self.to_device(entry)
        torch.cuda.current_stream(entry.device).wait_event(entry.ready)
        return {**entry.state, **entry.pending}

    def write_back(self, entry: Any) -> None:
        """After ``entry``'s update: copy the device state home asynchronously."""
        if entry.pending is None:
            return
        compute = torch.cuda.current_stream(entry.device)
        _, d2h = self._side_streams(entry.device)
        done = torch.cuda.Event()
        done.record(compute)
        d2h.wait_event(done)
        with torch.cuda.stream(d2h):
            for k in entry.keys:
                working = entry.pending[k]
                entry.state[k].copy_(working, non_blocking=True)
                working.record_stream(compute)
                working.record_stream(d2h)
        entry.written = torch.cuda.Event()
        entry.written.record(d2h)
        entry.pending = entry.ready = None
        self._in_flight.append(entry.written)
        self.traffic.moved_bytes += entry.nbytes

    def synchronize(self) -> None:
        """Wait for every pending write-back (host copies are then current)."""
        while self._in_flight:
            self._in_flight.popleft().synchronize()
