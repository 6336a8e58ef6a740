"""Gradient accumulation: run a batch as several micro-batches and add up their gradients.

The recipe keeps the user's batch size as the *effective* batch. With `steps=4` and a batch of 32,
each forward/backward sees 8 samples and the optimizer steps once per 32.

The silent failure this module closes: a model's loss is a mean over the items of *its* micro-batch.
Adding up `mean / steps` over micro-batches gives the full-batch gradient only when every micro-batch
has the same number of items. Token-level losses (masked LM, causal LM) count real tokens, which differ
from one micro-batch to the next, and an epoch may end on a short micro-batch; both bias the gradient
towards small micro-batches. (In transformers 5.x, Trainer also trusts models that merely accept
`**kwargs` to normalise by `num_items_in_batch`; BERT's heads accept it and ignore it, so without a fix
the accumulated gradient is `steps` times too large.) The cure is to sum the per-item losses and divide
by the number of items in the whole accumulated batch: `summed_loss(...) / num_items`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tfmem.errors import RecipeError
from tfmem.techniques._fields import count_problem, type_problem
from tfmem.techniques._modules import unwrap_model

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value Hugging Face losses skip


@dataclass(frozen=True)
class AccumulationConfig:
    """How many micro-batches make one optimizer step.

    Args:
        steps: micro-batches per optimizer step; 1 turns accumulation off. The effective batch is
            divided by it, so it must divide the batch size.
    """

    steps: int = 1

    def problems(self) -> list[str]:
        problem = type_problem("gradient_accumulation_steps", self.steps, int, "gradient_accumulation_steps: 4")
        if problem:
            return [problem]
        if self.steps < 1:
            return [
                f"`gradient_accumulation_steps` must be a positive integer, got {self.steps}; "
                "use 1 for no accumulation."
            ]
        problem = count_problem(
            "gradient_accumulation_steps", self.steps, minimum=1, example="gradient_accumulation_steps: 4",
            meaning="micro-batches per optimizer step",
        )
        return [problem] if problem else []

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise RecipeError(problems)


def micro_batch_size(effective_batch_size: int, steps: int) -> int:
    """Return the micro-batch size that keeps `effective_batch_size` with `steps` accumulation steps.

    Raises:
        RecipeError: when the batch does not divide evenly (the optimizer would otherwise see a
            different effective batch than the user asked for).

    Example:
        >>> micro_batch_size(32, 4)
        8
    """
    if effective_batch_size % steps != 0:
        # Two distinct multiples of `steps` around the batch (at batch 1 and steps 4: 4 or 8, not "4 or 4"),
        # and the largest accumulation that does divide it.
        lower = effective_batch_size - effective_batch_size % steps
        sizes = (lower, lower + steps) if lower > 0 else (steps, 2 * steps)
        divisor = max(d for d in range(1, steps) if effective_batch_size % d == 0)
        raise RecipeError(
            f"`gradient_accumulation_steps` is {steps} but the batch size {effective_batch_size} does not divide "
            f"by it; use a batch size that is a multiple of {steps} (for example {sizes[0]} or {sizes[1]}), "
            f"or `gradient_accumulation_steps: {divisor}`, which divides {effective_batch_size}."
        )
    return effective_batch_size // steps


def loss_shifts_labels(model: nn.Module) -> bool:
    """True when the model's loss predicts token i+1 from position i (causal LM), as Trainer decides it."""
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        return False
    return _loss_kind(model) == "causal_lm"


def count_loss_items(labels: torch.Tensor, *, shifts_labels: bool = False) -> torch.Tensor:
    """Count the items a Hugging Face loss averages over: label entries that are not -100.

    For a causal LM the first position of each row is never a target, so counting starts at the second.

    Example:
        >>> int(count_loss_items(torch.tensor([[5, 6, -100]])))
        2
    """
    if shifts_labels:
        labels = labels[..., 1:]
    return labels.ne(IGNORE_INDEX).sum()


def _loss_kind(model: nn.Module) -> str | None:
    """Which loss family the model's head computes, read from transformers' own `loss_type`."""
    name = type(model).__name__
    loss_type = getattr(model, "loss_type", None) or ""
    if "SequenceClassification" in name or loss_type == "ForSequenceClassification":
        return "sequence_classification"
    if "TokenClassification" in name or loss_type == "ForTokenClassification":
        return "token_classification"
    if "MaskedLM" in name or loss_type == "ForMaskedLM":
        return "masked_lm"
    if "CausalLM" in name or "LMHeadModel" in name or loss_type == "ForCausalLM":
        return "causal_lm"
    return None


def supports_exact_loss(model: nn.Module) -> bool:
    """True when `summed_loss` knows the head of `model` (classification, token classification, LMs)."""
    return _loss_kind(unwrap_model(model)) is not None


def summed_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of one micro-batch as a *sum* over its items, computed in float32 from the logits.

    Matches the model's own loss definition (the same items, the same reductions) except that it sums
    instead of averaging, so dividing by the item count of the whole accumulated batch is exact.

    Args:
        model: the model whose head produced `logits` (its config decides regression vs. classification).
        logits: the head's output for this micro-batch.
        labels: the targets, -100 where an item is ignored.

    Raises:
        ValueError: for a head whose loss tfmem does not know (question answering, say).
    """
    model = unwrap_model(model)
    kind = _loss_kind(model)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    labels = labels.to(logits.device)
    if kind == "sequence_classification":
        config = model.config
        num_labels = config.num_labels
        problem_type = config.problem_type
        if problem_type is None:  # the same inference transformers makes
            if num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        if problem_type == "regression":
            if num_labels == 1:
                return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1), reduction="sum")
            return F.mse_loss(logits, labels.to(logits.dtype), reduction="sum")
        if problem_type == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="sum")
        return F.cross_entropy(
            logits.view(-1, num_labels), labels.view(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    if kind in ("token_classification", "masked_lm"):
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    if kind == "causal_lm":
        shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    raise ValueError(
        f"tfmem does not know how to normalise the loss of {type(model).__name__} exactly under gradient "
        "accumulation. Pass your own `compute_loss_func(outputs, labels, num_items_in_batch)` to the Trainer "
        "that returns sum-of-item-losses / num_items_in_batch, or use gradient_accumulation_steps: 1."
    )


class ExactLoss:
    """A `compute_loss_func` for `transformers.Trainer` that normalises over the whole accumulated batch.

    Trainer counts `num_items_in_batch` over all micro-batches of an optimizer step (fewer at the end of
    an epoch) and, because a `compute_loss_func` is set, skips its own division by the accumulation steps.
    This returns `summed_loss / num_items_in_batch`, so the accumulated gradient is the full-batch one.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None):
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        total = summed_loss(self.model, logits, labels)
        if num_items_in_batch is None:  # evaluation: a plain mean over this batch
            num_items_in_batch = count_loss_items(labels, shifts_labels=loss_shifts_labels(self.model))
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch


@dataclass(frozen=True)
class AccumulationWindow:
    """A micro-batch together with the item count of the optimizer step (window) it belongs to.

    Built by `tfmem.accumulation_windows`; `num_items` is what the whole window's loss is divided by.
    """

    batch: Any
    num_items: torch.Tensor
    num_micro_batches: int
