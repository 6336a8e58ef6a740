"""tfmem: memory recipes for fine-tuning Hugging Face Transformers models on small GPUs.

    from tfmem import Recipe
    Recipe.load("low-memory").apply(trainer)      # a constructed transformers.Trainer
    tfmem.estimate_memory("bert-base-uncased", "low-memory", batch_size=32, seq_len=512, device="cuda")
"""

from tfmem.adapters.accelerate import accumulation_windows, backward_step, exact_loss
from tfmem.errors import RecipeError, UnsupportedModelError
from tfmem.estimate import estimate_memory, plan
from tfmem.recipe import Recipe

__all__ = [
    "Recipe",
    "RecipeError",
    "UnsupportedModelError",
    "accumulation_windows",
    "backward_step",
    "estimate_memory",
    "exact_loss",
    "plan",
]
__version__ = "0.1.0"
