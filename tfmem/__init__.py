"""tfmem: memory recipes for fine-tuning Hugging Face Transformers models on small GPUs."""

from tfmem.errors import RecipeError, UnsupportedModelError
from tfmem.recipe import Recipe

__all__ = ["Recipe", "RecipeError", "UnsupportedModelError"]
__version__ = "0.1.0"

from tfmem.adapters.accelerate import accumulation_windows, exact_loss  # noqa: E402

__all__ += ["accumulation_windows", "exact_loss"]
