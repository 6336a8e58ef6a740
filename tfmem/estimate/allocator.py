"""The CUDA caching allocator's arithmetic: what a request of n bytes costs on the device.

PyTorch does not hand each tensor exactly its bytes (c10/cuda/CUDACachingAllocator.cpp, default
settings, no `PYTORCH_CUDA_ALLOC_CONF`):

- Every request is rounded up to a multiple of 512 bytes (`kMinBlockSize`); a 4-byte scalar costs 512.
  `torch.cuda.max_memory_allocated` counts these rounded sizes. This is `round_allocation`.
- Requests of at most 1 MiB (`kSmallSize`) come from a small pool of 2 MiB segments (`kSmallBuffer`);
  larger ones from a large pool: a new segment is 20 MiB (`kLargeBuffer`) for requests under 10 MiB
  (`kMinLargeAlloc`), else the request rounded up to 2 MiB (`kRoundLarge`).
- A free cached block is reused best-fit (smallest that fits, within its pool) and split when the
  remainder is worth keeping: at least 512 bytes in the small pool, more than 1 MiB in the large pool
  (otherwise the whole block is handed out and counted as allocated).
- Freed blocks stay cached (reserved) and merge with free neighbours of the same segment; segments are
  returned to the driver only on `empty_cache()` or when an allocation would otherwise fail.

`simulate` replays a sequence of allocations and frees through those rules and returns the peak
allocated and the peak reserved bytes (what `torch.cuda.max_memory_reserved` would say), ignoring streams,
graph pools and the release-and-retry on out-of-memory.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

MIN_BLOCK_BYTES = 512
SMALL_REQUEST_BYTES = 1 << 20       # kSmallSize: requests up to this use the small pool
SMALL_SEGMENT_BYTES = 2 << 20       # kSmallBuffer
LARGE_SEGMENT_BYTES = 20 << 20      # kLargeBuffer
MIN_LARGE_ALLOC_BYTES = 10 << 20    # kMinLargeAlloc
ROUND_LARGE_BYTES = 2 << 20         # kRoundLarge


def round_allocation(nbytes: int) -> int:
    """The bytes the CUDA caching allocator accounts for a request of `nbytes`.

    Example:
        >>> round_allocation(4), round_allocation(512), round_allocation(513), round_allocation(0)
        (512, 512, 1024, 0)
    """
    if nbytes <= 0:
        return 0  # empty tensors get no block
    return -(-nbytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES


def segment_bytes(rounded: int) -> int:
    """Size of the new segment cudaMalloc'd when no cached block fits a (rounded) request."""
    if rounded <= SMALL_REQUEST_BYTES:
        return SMALL_SEGMENT_BYTES
    if rounded < MIN_LARGE_ALLOC_BYTES:
        return LARGE_SEGMENT_BYTES
    return -(-rounded // ROUND_LARGE_BYTES) * ROUND_LARGE_BYTES


@dataclass
class _Block:
    segment: int
    offset: int
    size: int
    free: bool = True


@dataclass(frozen=True)
class AllocatorPeaks:
    """What `simulate` found. Attributes: peak_allocated_bytes, peak_reserved_bytes."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int


class _Pool:
    """Free blocks of one pool, sorted by (size, segment, offset) for best-fit lookup."""

    def __init__(self) -> None:
        self.by_size: list[tuple[int, int, int]] = []

    def add(self, b: _Block) -> None:
        bisect.insort(self.by_size, (b.size, b.segment, b.offset))

    def remove(self, b: _Block) -> None:
        del self.by_size[bisect.bisect_left(self.by_size, (b.size, b.segment, b.offset))]

    def best_fit(self, size: int) -> tuple[int, int, int] | None:
        i = bisect.bisect_left(self.by_size, (size, -1, -1))
        return self.by_size[i] if i < len(self.by_size) else None


def simulate(events: Iterable[tuple[int, int]]) -> AllocatorPeaks:
    """Replay allocations and frees through the caching allocator's rules.

    Args:
        events: (key, nbytes) pairs in program order; nbytes > 0 allocates a block for `key` (a request
            of that many bytes), nbytes == 0 frees the block of `key`. Keys already live when the
            sequence starts (parameters, say) must appear as allocations first.

    Returns:
        the peak allocated bytes (block sizes, as the allocator counts them) and the peak reserved bytes.

    Example:
        >>> simulate([(1, 4), (2, 3 << 20), (1, 0)])
        AllocatorPeaks(peak_allocated_bytes=3146240, peak_reserved_bytes=23068672)
    """
    pools = {True: _Pool(), False: _Pool()}  # keyed by "small pool?"
    free_at: dict[tuple[int, int], _Block] = {}    # (segment, offset) -> free block starting there
    free_end: dict[tuple[int, int], _Block] = {}   # (segment, end offset) -> free block ending there
    segment_small: list[bool] = []
    owner: dict[int, _Block] = {}
    allocated = reserved = peak_allocated = peak_reserved = 0

    def add_free(b: _Block) -> None:
        b.free = True
        pools[segment_small[b.segment]].add(b)
        free_at[(b.segment, b.offset)] = b
        free_end[(b.segment, b.offset + b.size)] = b

    def remove_free(b: _Block) -> None:
        b.free = False
        pools[segment_small[b.segment]].remove(b)
        del free_at[(b.segment, b.offset)]
        del free_end[(b.segment, b.offset + b.size)]

    for key, nbytes in events:
        if nbytes > 0:
            if key in owner:
                continue
            size = round_allocation(nbytes)
            small = size <= SMALL_REQUEST_BYTES
            hit = pools[small].best_fit(size)
            if hit is None:
                seg_size = segment_bytes(size)
                segment_small.append(small)
                reserved += seg_size
                peak_reserved = max(peak_reserved, reserved)
                block = _Block(len(segment_small) - 1, 0, seg_size, free=False)
            else:
                block = free_at[(hit[1], hit[2])]
                remove_free(block)
            remaining = block.size - size
            if (remaining >= MIN_BLOCK_BYTES) if small else (remaining > SMALL_REQUEST_BYTES):
                add_free(_Block(block.segment, block.offset + size, remaining))
                block.size = size
            owner[key] = block
            allocated += block.size
            peak_allocated = max(peak_allocated, allocated)
        else:
            block = owner.pop(key, None)
            if block is None:
                continue
            allocated -= block.size
            after = free_at.get((block.segment, block.offset + block.size))
            if after is not None:
                remove_free(after)
                block.size += after.size
            before = free_end.get((block.segment, block.offset))
            if before is not None:
                remove_free(before)
                before.size += block.size
                block = before
            add_free(block)
    return AllocatorPeaks(peak_allocated, peak_reserved)
