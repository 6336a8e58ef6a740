"""Errors tfmem raises. Each message names the field, the value and the fix."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe, or a recipe applied to a particular model or device, is invalid.

    Carries every problem found, not just the first, so a user fixes a file in one pass.

    Attributes:
        problems: one human-readable line per problem, each naming the field, the value and the fix.
    """

    def __init__(self, problems: list[str] | str, *, source: str | None = None, heading: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        # `heading` is for recipes that are valid on their own but do not fit a trainer, model or device.
        heading = heading or (f"Invalid recipe in {source}" if source else "Invalid recipe")
        if len(self.problems) == 1:
            message = f"{heading}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{heading} ({len(self.problems)} problems):\n{lines}"
        super().__init__(message)


class UnsupportedModelError(ValueError):
    """tfmem cannot read the structure of a model (where its embeddings and encoder layers are)."""


class ModelConfigError(ValueError):
    """A model directory's `config.json` cannot be read: not JSON, no `model_type`, an unknown architecture.

    The message names the file, what is wrong with it and how to fix it.
    """


# Messages of out-of-memory errors that PyTorch raises as a plain RuntimeError rather than
# torch.OutOfMemoryError. The CPU allocator does this ("DefaultCPUAllocator: can't allocate memory",
# or a C++ std::bad_alloc surfacing as a RuntimeError); accelerate's `should_reduce_batch_size` keeps a
# similar list for the same reason.
_OOM_MESSAGES = (
    "CUDA out of memory",
    "DefaultCPUAllocator: can't allocate memory",
    "std::bad_alloc",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED",  # what cuDNN says when its workspace cannot be allocated
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` means the device (GPU or CPU) ran out of memory.

    True for `torch.OutOfMemoryError` (CUDA, and tfmem's simulated `CpuOutOfMemoryError`), Python's
    `MemoryError`, and the plain `RuntimeError`s that the CPU allocator raises.

    >>> import torch
    >>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    True
    >>> is_out_of_memory(RuntimeError("shape mismatch"))
    False
    """
    import torch  # here, so that importing tfmem.errors stays cheap for the CLI's --help

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _OOM_MESSAGES)
