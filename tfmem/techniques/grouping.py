"""Length-grouped batches: put samples of similar length together so less of each batch is padding.

A batch is padded to its longest sample; with dynamic padding, a batch of short sentences is short.
Random batches of skewed lengths are mostly padding, and padding costs compute (and, for the longest
batch, memory) like real tokens. Grouping orders each epoch so that samples of similar length share a
batch, while keeping what training sees the same in the ways that matter:

- every sample exactly once per epoch, and the same sequence of batch sizes as an ungrouped loader
  (full micro-batches, then one shorter at the end): the effective batch does not change;
- randomness: a fresh random order each epoch; only *neighbourhoods* of similar length are formed.

How (as transformers' `LengthGroupedSampler`, extended to accumulation): shuffle, cut the order into
mega-chunks of `mega_windows` accumulation windows, sort each chunk by length (longest first), and
cut it into windows of `batch_size x accumulation_steps` samples, each split into micro-batches. The
*window*, not the micro-batch, is the unit that is grouped: all micro-batches of one optimizer step
come from one stretch of the sorted chunk, so they are of similar length, and the window's order among
the others is shuffled. The window holding the longest sample goes first, so an out-of-memory shows on
the first step, not hours in. The samples left over after the last full window (fewer than a window)
form the final, short window, as in an ungrouped loader.

The Trainer has its own sampler for this (`train_sampling_strategy="group_by_length"`, or
`group_by_length=True` before transformers 5), which groups micro-batches; the accelerate adapter uses
this one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from tfmem.errors import RecipeError
from tfmem.techniques._fields import type_problem

# transformers' LengthGroupedSampler sorts mega-batches of 50 batches: large enough to find similar
# lengths, small enough to keep the epoch's order random.
MEGA_WINDOWS = 50


@dataclass(frozen=True)
class GroupingConfig:
    """Whether to batch samples of similar length together.

    Args:
        enabled: group by length (padding shrinks; the order of samples within an epoch is less random).
    """

    enabled: bool = False

    def problems(self) -> list[str]:
        problem = type_problem("group_by_length", self.enabled, bool, "group_by_length: true")
        return [problem] if problem else []

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise RecipeError(problems)


def group_batches(
    lengths: Sequence[int],
    batch_size: int,
    accumulation_steps: int = 1,
    *,
    seed: int = 0,
    mega_windows: int = MEGA_WINDOWS,
) -> list[list[int]]:
    """One epoch of micro-batches (lists of sample indices), grouped by length.

    Args:
        lengths: tokens per sample (unpadded).
        batch_size: samples per micro-batch.
        accumulation_steps: micro-batches per optimizer step; a window of them is grouped as one.
        seed: the epoch's random order (use a different one each epoch).
        mega_windows: windows per sorted chunk (larger: less padding, less random).

    Example:
        >>> group_batches([1, 9, 2, 8], batch_size=2, seed=0)
        [[1, 3], [2, 0]]
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"`accumulation_steps` must be a positive integer, got {accumulation_steps!r}.")
    n = len(lengths)
    window = batch_size * accumulation_steps
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).tolist()
    full = n - n % window

    def longest_first(indices: list[int]) -> list[int]:
        return sorted(indices, key=lambda i: -lengths[i])

    windows: list[list[int]] = []
    chunk = window * mega_windows
    for start in range(0, full, chunk):
        ranked = longest_first(order[start:min(start + chunk, full)])
        windows += [ranked[k:k + window] for k in range(0, len(ranked), window)]
    windows = [windows[i] for i in torch.randperm(len(windows), generator=generator).tolist()]
    if windows:
        first = max(range(len(windows)), key=lambda w: lengths[windows[w][0]])
        windows.insert(0, windows.pop(first))
    if full < n:  # the short last window, as an ungrouped loader ends
        windows.append(longest_first(order[full:]))
    return [w[k:k + batch_size] for w in windows for k in range(0, len(w), batch_size)]


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """A `batch_sampler` for a `DataLoader` that yields length-grouped micro-batches (see the module docstring).

    Each iteration is a new epoch with a new order (seeded by `seed` and the epoch number; `set_epoch`
    sets the number, as for `DistributedSampler`).

    Args:
        lengths: tokens per sample, or a dataset (see `lengths_of`).
        batch_size: samples per micro-batch (the DataLoader's batch size).
        accumulation_steps: micro-batches per optimizer step.
        seed: base seed of the epochs' orders.

    Example:
        >>> sampler = LengthGroupedBatchSampler([3, 1, 2, 5, 4], batch_size=2)
        >>> len(sampler), sorted(i for batch in sampler for i in batch)
        (3, [0, 1, 2, 3, 4])
    """

    def __init__(self, lengths: Sequence[int] | Any, batch_size: int, accumulation_steps: int = 1, *, seed: int = 0) -> None:
        self.lengths = lengths_of(lengths)
        self.batch_size = batch_size
        self.accumulation_steps = accumulation_steps
        self.seed = seed
        self.epoch = 0
        group_batches([], batch_size, accumulation_steps)  # validate the sizes now, not at the first batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = group_batches(self.lengths, self.batch_size, self.accumulation_steps, seed=self.seed + self.epoch)
        self.epoch += 1
        return iter(batches)


def lengths_of(data: Sequence[int] | Any, column: str = "input_ids") -> list[int]:
    """Tokens per sample of a list of lengths, or of a dataset (a `length` column when it has one,
    else the length of each row's `input_ids`).

    Raises:
        ValueError: the dataset has neither column.
    """
    names = getattr(data, "column_names", None)
    if names is not None:  # a datasets.Dataset: read one column, not every row
        if "length" in names:
            return [int(x) for x in data["length"]]
        if column in names:
            return [len(x) for x in data[column]]
        raise ValueError(f"cannot group by length: the dataset has no `length` or `{column}` column (it has {names}).")
    items = list(data)
    if items and isinstance(items[0], Mapping):
        if column not in items[0]:
            raise ValueError(f"cannot group by length: the samples have no `{column}` (they have {list(items[0])}).")
        return [len(x[column]) for x in items]
    return [int(x) for x in items]
