"""tfmem: memory recipes for fine-tuning Hugging Face Transformers models on small GPUs.

    from tfmem import Recipe
    Recipe.load("low-memory").apply(trainer)      # a constructed transformers.Trainer
    tfmem.estimate_memory("bert-base-uncased", "low-memory", batch_size=32, seq_len=512, device="cuda")

The names below are imported on first use (PEP 562 module `__getattr__`): most of them import torch
and transformers, which takes seconds, and `import tfmem` should not cost that to a command that
never needs them (`tfmem --help`, `tfmem --version`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Recipe": "tfmem.recipe",
    "RecipeError": "tfmem.errors",
    "UnsupportedModelError": "tfmem.errors",
    "ModelConfigError": "tfmem.errors",
    "accumulation_windows": "tfmem.adapters.accelerate",
    "backward_step": "tfmem.adapters.accelerate",
    "exact_loss": "tfmem.adapters.accelerate",
    "estimate_memory": "tfmem.estimate.estimator",
    "plan": "tfmem.estimate.plan",  # (not the package: its `plan` attribute can be the submodule)
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time `__getattr__` imports on demand
    from tfmem.adapters.accelerate import accumulation_windows, backward_step, exact_loss  # noqa: F401 (exported through __all__)
    from tfmem.errors import ModelConfigError, RecipeError, UnsupportedModelError  # noqa: F401 (exported through __all__)
    from tfmem.estimate import estimate_memory, plan  # noqa: F401 (exported through __all__)
    from tfmem.recipe import Recipe  # noqa: F401 (exported through __all__)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tfmem' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups find it directly
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
