"""Automatic micro-batch: on out-of-memory, split the micro-batch in two and retry it.

When a micro-batch runs out of memory, it is split in halves which run one after the other, and
every later micro-batch is split as finely too: the micro-batch halves and the number of
micro-batches per optimizer step doubles, so the effective batch stays the same. It requires the
loss to be normalised over the whole accumulated batch (tfmem's exact loss): then the gradients of the
halves add up to the gradient of the micro-batch, exactly what the smaller micro-batch would have
given from the start.

The subtle part is an out-of-memory error in the *middle of backward*: parameters whose gradient was
already accumulated hold this micro-batch's contribution, and retrying would add it twice. A
post-accumulate hook records which parameters were reached; their gradients are copied to the CPU
after the failure (they are then final for this micro-batch) and put back after the retry.

Not covered: out-of-memory in the optimizer step (AdamW allocating its state on the first step);
that needs a smaller configuration, which `tfmem plan` finds before training.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tfmem.errors import RecipeError, is_out_of_memory
from tfmem.techniques._fields import type_problem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoMicroBatchConfig:
    """Whether to halve the micro-batch on out-of-memory instead of failing.

    Args:
        enabled: split a micro-batch that runs out of memory, and all later ones, in halves.
    """

    enabled: bool = False

    def problems(self) -> list[str]:
        problem = type_problem("auto_micro_batch", self.enabled, bool, "auto_micro_batch: true")
        return [problem] if problem else []

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise RecipeError(problems)


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """The number of rows in a dict batch (the first dimension of its tensors)."""
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("cannot split a batch without tensors; auto_micro_batch needs dict batches of tensors.")


def split_batch(batch: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    """Split a dict batch into `parts` row-chunks (the last ones one row shorter when it does not divide).

    Example:
        >>> [c["x"].tolist() for c in split_batch({"x": torch.arange(5)}, 2)]
        [[0, 1, 2], [3, 4]]
    """
    rows = batch_size_of(batch)
    parts = min(parts, rows)
    chunks: list[dict[str, Any]] = [{} for _ in range(parts)]
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows:
            for chunk, piece in zip(chunks, torch.tensor_split(value, parts)):
                chunk[key] = piece
        else:
            for chunk in chunks:
                chunk[key] = value
    return chunks


class MicroBatchSplitter:
    """Runs micro-batches through a step function, halving them on out-of-memory.

    Args:
        model: the model whose parameters receive gradients.

    Attributes:
        parts: how many pieces each incoming micro-batch is split into (1 until the first OOM).
        events: one dict per out-of-memory event (rows that failed, new parts).
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.parts = 1
        self.events: list[dict[str, int]] = []

    def run(self, batch: Mapping[str, Any], step: Callable[[dict[str, Any]], torch.Tensor]) -> torch.Tensor:
        """Run `step` (forward + backward, returning the detached loss) over `batch`, splitting on OOM.

        Returns:
            The sum of the losses `step` returned for the pieces.

        Raises:
            torch.OutOfMemoryError: a single row does not fit (whichever out-of-memory error the device
                raised, see `tfmem.errors.is_out_of_memory`, is its cause).
        """
        total: torch.Tensor | None = None
        rows = batch_size_of(batch)
        for chunk in split_batch(batch, self.parts) if self.parts > 1 else [dict(batch)]:
            loss = self._run_piece(chunk, rows, step)
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def _run_piece(
        self, chunk: dict[str, Any], original_rows: int, step: Callable[[dict[str, Any]], torch.Tensor]
    ) -> torch.Tensor:
        reached: set[int] = set()
        handles = [
            p.register_post_accumulate_grad_hook(lambda p, i=i: reached.add(i)) for i, p in enumerate(self.params)
        ]
        failed = False
        try:
            loss = step(chunk)
            return loss.detach() if torch.is_tensor(loss) else torch.as_tensor(loss)
        except Exception as error:
            # Not only torch.OutOfMemoryError: the CPU allocator reports running out as a plain RuntimeError
            # ("DefaultCPUAllocator: can't allocate memory", std::bad_alloc), and Python as MemoryError.
            if not is_out_of_memory(error):
                raise
            rows = batch_size_of(chunk)
            if rows <= 1:
                raise torch.OutOfMemoryError(
                    f"out of memory with a micro-batch of a single row ({error}); auto_micro_batch cannot split "
                    "further: use gradient checkpointing, bf16/fp16, or a shorter sequence length."
                ) from error
            failed = True
        finally:
            for handle in handles:
                handle.remove()
        # Retry outside the `except` block: its traceback holds the failed attempt's activations.
        assert failed
        # These gradients already hold this piece's full contribution: keep them, off the device.
        finished = {i: self.params[i].grad.detach().to("cpu", copy=True) for i in reached if self.params[i].grad is not None}
        release_memory()
        rows = batch_size_of(chunk)
        half = math.ceil(rows / 2)
        self.parts = max(self.parts, math.ceil(original_rows / half))
        self.events.append({"rows": rows, "parts": self.parts})
        logger.warning(
            "tfmem: out of memory on a micro-batch of %d rows; retrying it as 2 x %d and splitting every "
            "micro-batch of %d rows into %d from now on (more micro-batches per step, same effective batch)",
            rows, half, original_rows, self.parts,
        )
        total: torch.Tensor | None = None
        for piece in split_batch(chunk, 2):
            loss = self._run_piece(piece, original_rows, step)
            total = loss if total is None else total + loss
        for i, grad in finished.items():
            self.params[i].grad.copy_(grad)
        assert total is not None
        return total


def release_memory() -> None:
    """Free what the failed attempt held: Python references first, then the CUDA cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
