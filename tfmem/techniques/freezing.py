"""Layer freezing. (Stub: being implemented.)"""

from __future__ import annotations

from dataclasses import dataclass

from tfmem.errors import RecipeError
from tfmem.techniques._fields import type_problem


@dataclass(frozen=True)
class FreezeConfig:
    """Which part of the model to freeze.

    Args:
        embeddings: freeze the embedding block (word, position, type embeddings and their LayerNorm).
        layers: freeze the first N encoder layers (0 freezes none).
    """

    embeddings: bool = False
    layers: int = 0

    def problems(self) -> list[str]:
        out = []
        if problem := type_problem("freeze.embeddings", self.embeddings, bool, "freeze: {embeddings: true}"):
            out.append(problem)
        if problem := type_problem("freeze.layers", self.layers, int, "freeze: {layers: 6}"):
            out.append(problem)
        elif self.layers < 0:
            out.append(f"`freeze.layers` must be 0 or more (the number of leading encoder layers to freeze), got {self.layers}.")
        return out

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise RecipeError(problems)

    @property
    def enabled(self) -> bool:
        return bool(self.embeddings) or self.layers > 0
