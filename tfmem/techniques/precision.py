"""Mixed precision: run matrix work in 16-bit, keep fp32 master weights.

fp16 has a narrow exponent range, so its gradients are multiplied by a loss scale that a GradScaler
lowers whenever a step produces inf/NaN gradients; such a step is skipped, and the learning-rate
schedule must not advance for it (both Trainer and accelerate's `AcceleratedScheduler` check
`optimizer_step_was_skipped`). bf16 has fp32's range and needs no scaling.

The silent failures closed here are about hardware:
- `torch.cuda.is_bf16_supported()` answers True on GPUs below compute capability 8.0 (Volta, Turing),
  where bf16 is *emulated*: it runs, slower than fp32, and saves little. We read the capability instead.
- fp16 autocast on CPU runs, but about 30x slower than fp32 on our 2-core machines; bf16 is the CPU
  choice (about 2x faster than fp32 there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tfmem.errors import RecipeError
from tfmem.techniques._fields import quote, type_problem

MODES = ("no", "fp16", "bf16")

# Ampere (8.0) is the first architecture with bf16 tensor cores.
BF16_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class PrecisionConfig:
    """Which mixed precision to train in.

    Args:
        mode: "no" (fp32), "fp16" (loss-scaled), or "bf16".
    """

    mode: str = "no"

    def problems(self) -> list[str]:
        problem = type_problem("mixed_precision", self.mode, str, "mixed_precision: bf16")
        if problem:
            # YAML 1.1 (PyYAML) reads unquoted no/off/false as False and yes/on/true as True; say so
            # rather than "got False", and do not assume the user typed `no`.
            if self.mode is False:
                return ['`mixed_precision` is False (YAML reads a bare `off` or `false`, and a bare `no` as a boolean); '
                        'write `mixed_precision: "no"` (quoted) for fp32, or bf16 / fp16.']
            if self.mode is True:
                return ['`mixed_precision` is True (YAML reads a bare `yes`, `on` or `true` as a boolean); '
                        'write `mixed_precision: bf16` or `fp16`, or `"no"` (quoted) for fp32.']
            return [problem]
        if self.mode not in MODES:
            return [f"`mixed_precision` must be one of {', '.join(MODES)}; got {quote(self.mode)}."]
        return []

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise RecipeError(problems)


def precision_problems(mode: str, device: torch.device | str) -> list[str]:
    """Problems with training in `mode` on `device`; empty when the hardware does it natively.

    Args:
        mode: "no", "fp16" or "bf16".
        device: the device training will run on (its index matters on a machine with mixed GPUs).

    Example:
        >>> precision_problems("fp16", "cpu")[0].startswith("`mixed_precision` is fp16")
        True
    """
    device = torch.device(device)
    if mode == "no":
        return []
    if device.type == "cpu":
        if mode == "fp16":
            return [
                "`mixed_precision` is fp16 but training runs on the CPU, where fp16 autocast is about 30x slower "
                "than fp32; use `mixed_precision: bf16` (native on CPU) or \"no\"."
            ]
        return []
    if device.type == "cuda" and mode == "bf16":
        capability = cuda_capability(device)
        if capability < BF16_MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            return [
                f"`mixed_precision` is bf16 but {name} has compute capability {capability[0]}.{capability[1]}; "
                "bf16 needs 8.0 (Ampere) or newer and is only emulated below it, slower than fp32 "
                "(torch.cuda.is_bf16_supported() still says True there). Use `mixed_precision: fp16`."
            ]
    return []


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device. Split out so tests can stand in an older GPU."""
    return torch.cuda.get_device_capability(device)


def check_precision(mode: str, device: torch.device | str) -> None:
    """Raise `RecipeError` when `mode` is wrong for `device` (see `precision_problems`)."""
    if problems := precision_problems(mode, device):
        raise RecipeError(problems)


def autocast_dtype(mode: str) -> torch.dtype | None:
    """The dtype autocast runs matrix work in, or None for fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode)
