"""A real CPU training step under a recipe, shared by the estimator and planner tests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from tfmem.techniques.precision import autocast_dtype


def batch_for(recipe, batch_size: int, seq_len: int, vocab: int = 500) -> dict[str, torch.Tensor]:
    """One micro-batch of the recipe's size (the effective batch divided by its accumulation steps)."""
    micro = batch_size // recipe.gradient_accumulation_steps
    return {"input_ids": torch.randint(0, vocab, (micro, seq_len)),
            "attention_mask": torch.ones(micro, seq_len, dtype=torch.long),
            "labels": torch.zeros(micro, dtype=torch.long)}


def run_steps(model, opt, inputs: dict[str, Any], recipe, steps: int = 2,
              step_context: Callable[[], Any] = contextlib.nullcontext) -> None:
    """`steps` optimizer steps, each over the recipe's micro-batches, under its autocast."""
    cast = autocast_dtype(recipe.mixed_precision)
    for _ in range(steps):
        with step_context():
            for _ in range(recipe.gradient_accumulation_steps):
                with torch.autocast("cpu", dtype=cast or torch.bfloat16, enabled=cast is not None):
                    loss = model(**inputs).loss
                loss.backward()
                del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
