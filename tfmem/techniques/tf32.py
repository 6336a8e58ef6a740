"""TF32: fp32 matrix products on tensor cores, with a 10-bit mantissa for the inputs.

On Ampere and newer GPUs (compute capability 8.0+) it makes fp32 training 2.5-3x faster at no memory
cost (H200, bert-base: 224 -> 90 ms per step; bert-large: 728 -> 242 ms). The products lose input
precision (as bf16 autocast does, less so); accumulation stays fp32. Weights, gradients and optimizer
state are unchanged, so the memory estimate is the same as fp32's.

It is a process-wide PyTorch setting. The Trainer sets it through its own `tf32` argument (and leaves
it set); in an accelerate loop `tf32_matmul()` sets it for the `with` block and restores what was
there before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tfmem.errors import RecipeError
from tfmem.techniques._fields import type_problem

# Ampere (8.0) is the first architecture with TF32 tensor cores.
TF32_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class TF32Config:
    """Whether fp32 matrix products run in TF32.

    Args:
        enabled: run fp32 matmuls and convolutions on TF32 tensor cores (CUDA, capability 8.0+).
    """

    enabled: bool = False

    def problems(self) -> list[str]:
        problem = type_problem("tf32", self.enabled, bool, "tf32: true")
        return [problem] if problem else []

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise RecipeError(problems)


def tf32_problems(enabled: bool, device: torch.device | str) -> list[str]:
    """Problems with TF32 on `device`; empty when it is off, or the device has TF32 tensor cores.

    Example:
        >>> tf32_problems(True, "cpu")[0].startswith("`tf32` is true but training runs on the CPU")
        True
    """
    if not enabled:
        return []
    device = torch.device(device)
    if device.type == "cpu":
        return [
            "`tf32` is true but training runs on the CPU, which has no TF32 (it is a tensor-core format of NVIDIA "
            "GPUs with compute capability 8.0+); set `tf32: false`, or `mixed_precision: bf16` for the CPU's speed-up."
        ]
    if device.type != "cuda":
        return [f"`tf32` is true but training runs on a {device.type} device; TF32 needs an NVIDIA GPU with compute "
                "capability 8.0+. Set `tf32: false`."]
    from tfmem.techniques import precision  # the capability lookup tests stand an older GPU in for

    capability = precision.cuda_capability(device)
    if capability < TF32_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return [
            f"`tf32` is true but {name} has compute capability {capability[0]}.{capability[1]}; TF32 needs 8.0 "
            "(Ampere) or newer. Set `tf32: false`, and use `mixed_precision: fp16` for tensor-core speed there."
        ]
    return []


def check_tf32(enabled: bool, device: torch.device | str) -> None:
    """Raise `RecipeError` when TF32 is asked for on a device without it (see `tf32_problems`)."""
    if problems := tf32_problems(enabled, device):
        raise RecipeError(problems)


@contextmanager
def tf32_matmul(enabled: bool = True) -> Iterator[None]:
    """Within the block, fp32 matmuls (cuBLAS) and convolutions (cuDNN) use TF32 when `enabled`;
    the previous settings come back afterwards, also on an exception.

    torch 2.9+ has per-backend `fp32_precision` settings and refuses to mix them with the older
    `allow_tf32` flags in one process, so the newer ones are used where they exist.

    Example:
        >>> before = torch.backends.cuda.matmul.fp32_precision
        >>> with tf32_matmul():
        ...     torch.backends.cuda.matmul.fp32_precision
        'tf32'
        >>> torch.backends.cuda.matmul.fp32_precision == before
        True
    """
    if not enabled:
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        conv = torch.backends.cudnn.conv
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision = conv.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
    else:  # torch < 2.9
        saved = (matmul.allow_tf32, conv.allow_tf32)
        matmul.allow_tf32 = conv.allow_tf32 = True
        try:
            yield
        finally:
            matmul.allow_tf32, conv.allow_tf32 = saved
