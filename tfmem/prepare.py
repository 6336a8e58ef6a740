"""Apply a recipe's model-side techniques (freezing, then checkpointing) to a model.

Framework-neutral: both adapters call it. Order matters: freezing first, so checkpointing knows which
layers are frozen and leaves them alone (a frozen prefix keeps nothing for backward; recomputing it
would be pure waste).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import nn

from tfmem.errors import RecipeError
from tfmem.techniques.checkpointing import apply_checkpointing, checkpointing_problems
from tfmem.techniques.freezing import apply_freezing, freeze_problems

if TYPE_CHECKING:
    from tfmem.recipe import Recipe

logger = logging.getLogger(__name__)


def model_problems(model: nn.Module, recipe: Recipe) -> list[str]:
    """Everything that stops `recipe` from applying to `model`, found without changing the model."""
    problems: list[str] = []
    if recipe.freeze.enabled:
        problems += freeze_problems(model, recipe.freeze, recipe.modules)
    if recipe.checkpointing.enabled:
        problems += checkpointing_problems(model, recipe.checkpointing, recipe.modules)
    # Both techniques read the same structure; an unreadable model would be explained twice.
    return list(dict.fromkeys(problems))


def prepare_model(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Freeze and checkpoint `model` in place as `recipe` says; return the same model.

    All checks run before the model changes, so an error leaves it untouched.

    Raises:
        RecipeError: the recipe does not fit this model (more layers frozen than it has, an
            architecture tfmem cannot read without `modules:` paths, ...).
    """
    if problems := model_problems(model, recipe):
        raise RecipeError(problems, heading=f"Recipe {recipe.name!r} does not fit {type(model).__name__}")
    frozen_layers = 0
    if recipe.freeze.enabled:
        result = apply_freezing(model, recipe.freeze, recipe.modules)
        frozen_layers = result.frozen_layers
        logger.info("tfmem: froze %d parameters (%s)", len(result.frozen_parameter_names), recipe.freeze)
    if recipe.checkpointing.enabled:
        checkpointed = apply_checkpointing(model, recipe.checkpointing, recipe.modules, frozen_layers=frozen_layers)
        logger.info("tfmem: checkpointing %d layers", len(checkpointed))
    return model
