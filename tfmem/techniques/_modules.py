"""Small helpers about model objects, shared by techniques, adapters and the profiler."""

from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP / `torch.compile` wrappers (under `.module` or `._orig_mod`).

    Example:
        >>> class Wrapper(nn.Module):
        ...     def __init__(self, module):
        ...         super().__init__()
        ...         self.module = module
        >>> inner = nn.Linear(1, 1)
        >>> unwrap_model(Wrapper(Wrapper(inner))) is inner
        True
    """
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
