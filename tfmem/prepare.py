"""Apply a recipe's model-side techniques (freezing, then checkpointing) to a model.

Framework-neutral: both adapters call it. Order matters: freezing first, so checkpointing knows which
layers are frozen and leaves them alone (a frozen prefix keeps nothing for backward; recomputing it
would be pure waste).

Three entry points, by who is asking:

- `prepare(model, recipe)` changes the model and returns a `Prepared` record; it says nothing. Tools
  that apply many recipes (the estimator, the profiler) use it and show the record their own way
  (`prepared.freeze.note` in a profile row).
- `prepare_model(model, recipe)` is what a user calls (`recipe.prepare_model(model)`): the same, plus one
  line saying what changed (see `tfmem.log`) and a warning when every layer ends up frozen.
- `model_problems(model, recipe)` only checks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from tfmem.errors import RecipeError
from tfmem.log import announce
from tfmem.techniques.checkpointing import apply_checkpointing, checkpointing_problems
from tfmem.techniques.freezing import FreezeSummary, apply_freezing, freeze_problems, freeze_summary

if TYPE_CHECKING:
    from tfmem.recipe import Recipe

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """What `prepare` did to a model.

    Attributes:
        recipe_name: the recipe applied.
        model_name: the model's class name.
        freeze: what is frozen and what still trains (`freeze.note` is non-empty when every layer is frozen).
        checkpointed: module paths of the layers now checkpointed.
    """

    recipe_name: str
    model_name: str
    freeze: FreezeSummary
    checkpointed: tuple[str, ...]

    def parts(self) -> list[str]:
        """The model-side changes, for people: ["checkpointing 4 layers (2-5)", "frozen: embeddings + layers 0-1"]."""
        parts = []
        if self.checkpointed:
            indices = [int(p.rsplit(".", 1)[-1]) for p in self.checkpointed if p.rsplit(".", 1)[-1].isdigit()]
            span = f" ({indices[0]}-{indices[-1]})" if len(indices) == len(self.checkpointed) and len(indices) > 1 else ""
            parts.append(f"checkpointing {len(self.checkpointed)} layer{'s' if len(self.checkpointed) != 1 else ''}{span}")
        else:
            parts.append("no checkpointing")
        parts.append(f"frozen: {self.freeze.frozen}")
        return parts

    def __str__(self) -> str:
        return f"tfmem: prepared {self.model_name} for {self.recipe_name} — {', '.join(self.parts())}"


def model_problems(model: nn.Module, recipe: Recipe) -> list[str]:
    """Everything that stops `recipe` from applying to `model`, found without changing the model."""
    problems: list[str] = []
    if recipe.freeze.enabled:
        problems += freeze_problems(model, recipe.freeze, recipe.modules)
    if recipe.checkpointing.enabled:
        problems += checkpointing_problems(model, recipe.checkpointing, recipe.modules)
    # Both techniques read the same structure; an unreadable model would be explained twice.
    return list(dict.fromkeys(problems))


def prepare(model: nn.Module, recipe: Recipe) -> Prepared:
    """Freeze and checkpoint `model` in place as `recipe` says, quietly; return what was done.

    All checks run before the model changes, so an error leaves it untouched.

    Raises:
        RecipeError: the recipe does not fit this model (more layers frozen than it has, an
            architecture tfmem cannot read without `modules:` paths, ...).
    """
    if problems := model_problems(model, recipe):
        raise RecipeError(problems, heading=f"Recipe {recipe.name!r} does not fit {type(model).__name__}")
    summary = freeze_summary(model, recipe.freeze, recipe.modules)
    frozen_layers = 0
    if recipe.freeze.enabled:
        frozen_layers = apply_freezing(model, recipe.freeze, recipe.modules).frozen_layers
    checkpointed: tuple[str, ...] = ()
    if recipe.checkpointing.enabled:
        checkpointed = tuple(apply_checkpointing(model, recipe.checkpointing, recipe.modules, frozen_layers=frozen_layers))
    return Prepared(recipe.name, type(model).__name__, summary, checkpointed)


def warn_if_everything_frozen(prepared: Prepared) -> None:
    """Log a warning naming the recipe when it froze every layer of the model (legal, rarely meant)."""
    if prepared.freeze.note:
        logger.warning(
            "tfmem: recipe %r, applied to %s, %s. It was probably written for a deeper model; to fine-tune "
            "the encoder, freeze fewer layers: recipe.replace(freeze={'layers': %d}).",
            prepared.recipe_name,
            prepared.model_name,
            prepared.freeze.note,
            (prepared.freeze.layer_count or 0) // 2,
        )


def prepare_model(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Freeze and checkpoint `model` in place as `recipe` says; say so in one line; return the same model.

    Raises:
        RecipeError: as `prepare`; the model is untouched then.
    """
    prepared = prepare(model, recipe)
    warn_if_everything_frozen(prepared)
    announce(str(prepared))
    return model
