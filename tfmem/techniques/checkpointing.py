"""Gradient checkpointing. (Stub: being implemented.)"""

from __future__ import annotations

from dataclasses import dataclass

from tfmem.errors import RecipeError
from tfmem.techniques._fields import type_problem


@dataclass(frozen=True)
class CheckpointingConfig:
    """Whether to recompute encoder-layer activations in backward instead of storing them.

    Args:
        enabled: checkpoint every trainable encoder layer (non-reentrant).
    """

    enabled: bool = False

    def problems(self) -> list[str]:
        problem = type_problem("gradient_checkpointing", self.enabled, bool, "gradient_checkpointing: true")
        return [problem] if problem else []

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise RecipeError(problems)
