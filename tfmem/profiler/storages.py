"""Tensor storages: their identity and bytes, and the out-of-memory error a byte limit raises.

Split out of `live_bytes.py` so the accounting there reads on its own; both names are re-exported there.
"""

from __future__ import annotations

import torch


class CpuOutOfMemoryError(torch.OutOfMemoryError):
    """Live tensor bytes went above the `limit_bytes` a `LiveBytes` tracker was given.

    A subclass of `torch.OutOfMemoryError`, so code that survives a CUDA out-of-memory survives this.

    Attributes:
        requested_bytes: bytes of the operator output that crossed the limit.
        live_bytes: live tensor bytes including that output.
        limit_bytes: the limit.
    """

    def __init__(self, requested_bytes: int, live_bytes: int, limit_bytes: int) -> None:
        self.requested_bytes = requested_bytes
        self.live_bytes = live_bytes
        self.limit_bytes = limit_bytes
        super().__init__(
            f"tfmem: tried to allocate {_mib(requested_bytes)} with {_mib(live_bytes - requested_bytes)} of tensors "
            f"live, above the limit of {_mib(limit_bytes)} (max_memory); raise the limit or use a lower-memory recipe."
        )

    def __reduce__(self):  # picklable across processes
        return (type(self), (self.requested_bytes, self.live_bytes, self.limit_bytes))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def storage_key(tensor: torch.Tensor) -> int | None:
    """The identity of `tensor`'s storage (views share it), or None for tensors without one (sparse, nested).

    Example:
        >>> t = torch.zeros(4)
        >>> storage_key(t) == storage_key(t[1:])
        True
    """
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def storage_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages behind `tensors`: an independent count to check `LiveBytes` against.

    Example:
        >>> t = torch.zeros(4)  # float32: 16 bytes
        >>> storage_bytes(t, t[1:], t.view(2, 2))
        16
    """
    seen: dict[int, int] = {}
    for t in tensors:
        key = storage_key(t)
        if key is not None:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())
