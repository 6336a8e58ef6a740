"""tfmem: memory recipes for fine-tuning Hugging Face Transformers models on small GPUs.

    from tfmem import Recipe
    Recipe.load("low-memory").apply(trainer)      # a constructed transformers.Trainer
"""

from tfmem.adapters.accelerate import accumulation_windows, backward_step, exact_loss
from tfmem.errors import RecipeError, UnsupportedModelError
from tfmem.recipe import Recipe

__all__ = [
    "Recipe",
    "RecipeError",
    "UnsupportedModelError",
    "accumulation_windows",
    "backward_step",
    "exact_loss",
]
__version__ = "0.1.0"
