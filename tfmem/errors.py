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
