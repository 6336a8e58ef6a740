"""The profiler's live-bytes accounting, as the target device's allocator would see it.

`tfmem.profiler.LiveBytes` counts each storage at its exact `nbytes()`. On a CUDA target every request
costs its size rounded to 512 bytes, and the reserved figure needs the order of allocations and frees.
`DeviceLiveBytes` is that tracker with two additions, made by extending its two bookkeeping points
(`_add_tensor` counts a storage, `_on_free` forgets one); everything else (what is seen, the peak's split
into parameters / gradients / optimizer state / activations) is the profiler's.

(Adapter, not a fork: LiveBytes has no hook for a per-storage size. If it grows one, say
`size_of(nbytes) -> int`, this file shrinks to that function.)
"""

from __future__ import annotations

import torch

from tfmem.estimate.allocator import round_allocation
from tfmem.profiler.live_bytes import LiveBytes, storage_key


class DeviceLiveBytes(LiveBytes):
    """A `LiveBytes` that rounds sizes like the CUDA caching allocator and records allocation events.

    Args:
        round_sizes: count `round_allocation(nbytes)` instead of `nbytes` (CUDA targets).
        record_events: keep (storage key, requested bytes) allocations and (key, 0) frees in order, for
            `allocator.simulate`.

    Relies on two details of LiveBytes: `_add_tensor(t, ...)` counts a storage at `nbytes()` in
    `_live[key][0]` and `current_bytes`, and `_on_free(key)` forgets it. The rounding is applied on top,
    after LiveBytes has done its own bookkeeping (roles, peak), so nothing of it is duplicated here.
    """

    def __init__(self, *, round_sizes: bool, record_events: bool = False) -> None:
        super().__init__(track_inputs=False)
        self.round_sizes = round_sizes
        self.events: list[tuple[int, int]] | None = [] if record_events else None
        self._exact: dict[int, int] = {}  # storage key -> requested (unrounded) bytes

    def _add_tensor(self, t: torch.Tensor, *args, **kwargs) -> int:
        key = storage_key(t)
        if key is None or self._closed:
            return super()._add_tensor(t, *args, **kwargs)
        with self._lock:
            try:
                requested = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError, TypeError):
                return 0
            previous = self._exact.get(key)
            role = args[0] if args else kwargs.get("role")
            if previous == requested and role is None:
                return 0  # known storage, same size, nothing to (re)classify
            delta = super()._add_tensor(t, *args, **kwargs)
            entry = self._live.get(key)
            if entry is None:
                return delta
            self._exact[key] = requested
            if self.events is not None and previous != requested:
                if previous is not None:  # a resize: the allocator frees and allocates anew
                    self.events.append((key, 0))
                if requested:
                    self.events.append((key, requested))
            if self.round_sizes:
                extra = round_allocation(requested) - requested
                entry[0] = requested + extra
                self.current_bytes += extra
                delta += extra
            return delta

    def _on_free(self, key: int) -> None:
        with self._lock:
            if self._exact.pop(key, None) is not None and self.events is not None:
                self.events.append((key, 0))
        super()._on_free(key)
