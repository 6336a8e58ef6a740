"""The profiler's live-bytes accounting, as the target device's allocator would see it.

`tfmem.profiler.LiveBytes` counts each storage at its exact `nbytes()`. On a CUDA target every request
costs its size rounded to 512 bytes, and the reserved figure needs the order of allocations and frees.
Both come through LiveBytes' public extension points: `size_of=round_allocation`, and an `AllocationLog`
observer whose events `allocator.simulate` replays. Everything else (what is seen, the peak's split into
parameters / gradients / optimizer state / activations) is the profiler's, unchanged.
"""

from __future__ import annotations

from tfmem.estimate.allocator import round_allocation
from tfmem.estimate.device import DeviceProfile
from tfmem.profiler.live_bytes import LiveBytes


class AllocationLog:
    """A `LiveBytes` observer keeping (key, requested bytes) allocations and (key, 0) frees in order.

    That is the sequence `allocator.simulate` takes. Requests are the exact sizes: simulate rounds them.

    Example:
        >>> import torch
        >>> log = AllocationLog()
        >>> with LiveBytes(observer=log):
        ...     a = torch.zeros(3)                   # 12 bytes
        ...     del a
        >>> [n for _, n in log.events]
        [12, 0]
    """

    def __init__(self) -> None:
        self.events: list[tuple[int, int]] = []

    def on_alloc(self, key: int, nbytes: int) -> None:
        if nbytes:  # an empty storage gets no block
            self.events.append((key, nbytes))

    def on_free(self, key: int, nbytes: int) -> None:
        # Runs inside PyTorch's deallocation: integers only. simulate ignores frees of keys with no block.
        self.events.append((key, 0))


def device_live_bytes(device: DeviceProfile, log: AllocationLog | None = None) -> LiveBytes:
    """A `LiveBytes` counting as `device`'s allocator would, telling `log` of each allocation and free.

    Only what `track()` is given and what operators create is counted (`track_inputs=False`): the fake
    step tracks its model, optimizer and batch itself.
    """
    size_of = round_allocation if device.rounds_allocations else None
    return LiveBytes(track_inputs=False, size_of=size_of, observer=log)
