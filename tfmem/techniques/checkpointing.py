"""Gradient checkpointing: recompute each layer's activations in backward instead of keeping them.

Always non-reentrant (`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`), whatever the
installed transformers defaults to. The reason is a silent failure: reentrant checkpointing only sends
gradients into a checkpointed layer when one of its *inputs* requires grad. Freeze the embeddings and the
hidden states entering the first layer do not, so every checkpointed layer trains with no gradient at all,
and nothing complains but a warning. transformers papers over it with `enable_input_require_grads()`,
which makes the embedding output require grad, and that in turn makes a frozen prefix keep activations
for a backward it does not need. Non-reentrant checkpointing needs neither.

Layers are checkpointed two ways, both keeping parameter names and `state_dict` keys unchanged:

- `transformers.modeling_layers.GradientCheckpointingLayer` subclasses (BERT, RoBERTa, GPT-2, ...):
  transformers' own per-layer switch, `layer.gradient_checkpointing = True` with our checkpoint function.
  It also drops KV caches inside checkpointed decoder layers.
- Any other layer (MPNet, ALBERT, custom models): an instance-level `forward` that checkpoints the class's
  forward. It is a `functools.partial` holding the layer, not a closure, so `copy.deepcopy(model)` gives
  the copy a wrapper around the *copy* (a closure would keep running, and training, the original).

Both checkpoint only when the layer is in training mode and grad is enabled: evaluation and generation
run the layer as is. Forward hooks of a layer stay outside the checkpoint, so they run once.

Layers in the frozen prefix are left alone: when the embeddings and the first N layers are frozen, those
layers keep nothing for backward, and recomputing them would be pure waste. A frozen layer behind
*trainable* embeddings is checkpointed, since it must keep activations to pass gradients back.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tfmem.errors import RecipeError, UnsupportedModelError
from tfmem.techniques._fields import type_problem
from tfmem.techniques.architecture import Backbone, ModulePaths, find_backbone

logger = logging.getLogger(__name__)

# Module-level, so it is the same object everywhere and deep-copies and pickles as a plain function.
NON_REENTRANT_CHECKPOINT = functools.partial(checkpoint, use_reentrant=False)


@dataclass(frozen=True)
class CheckpointingConfig:
    """Whether to recompute encoder-layer activations in backward instead of storing them.

    Args:
        enabled: checkpoint every trainable encoder layer (non-reentrant).
    """

    enabled: bool = False

    def problems(self) -> list[str]:
        problem = type_problem("gradient_checkpointing", self.enabled, bool, "gradient_checkpointing: true")
        return [problem] if problem else []

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise RecipeError(problems)


def checkpointing_problems(model: nn.Module, config: CheckpointingConfig, paths: ModulePaths | None) -> list[str]:
    """Everything that stops `config` from applying to `model`, one line each; the model is not changed."""
    if not config.enabled:
        return []
    try:
        find_backbone(model, paths)
    except UnsupportedModelError as error:
        text = str(error)
        return [f"`gradient_checkpointing` needs the model's layers, but {text[:1].lower()}{text[1:]}"]
    return []


def apply_checkpointing(
    model: nn.Module,
    config: CheckpointingConfig,
    paths: ModulePaths | None = None,
    *,
    frozen_layers: int = 0,
) -> tuple[str, ...]:
    """Checkpoint every layer of `model` outside the frozen prefix, non-reentrantly, in place.

    Applying it again (with the same or another `frozen_layers`) leaves each layer checkpointed once or
    not at all. Turns `model.config.use_cache` off, since a checkpointed decoder layer cannot keep a KV
    cache (the recompute would write it twice).

    Args:
        model: the model to change.
        config: `enabled=False` changes nothing and returns ().
        paths: the recipe's `modules:` paths, for models tfmem cannot read by itself.
        frozen_layers: how many leading layers `apply_freezing` froze. They are skipped only while they
            and the embedding block really have no trainable parameter (otherwise they keep activations
            to pass gradients upstream, and checkpointing them saves memory).

    Returns:
        The module paths of the layers now checkpointed, e.g. ("bert.encoder.layer.1", ...).

    Raises:
        RecipeError: the model's layers cannot be found (the message says how to name them).
        ValueError: `frozen_layers` is negative or more than the model has.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
        >>> apply_checkpointing(model, CheckpointingConfig(enabled=True))
        ('bert.encoder.layer.0', 'bert.encoder.layer.1')
    """
    if not config.enabled:
        return ()
    if problems := checkpointing_problems(model, config, paths):
        raise RecipeError(problems, source=type(model).__name__)
    backbone = find_backbone(model, paths)
    valid = isinstance(frozen_layers, int) and not isinstance(frozen_layers, bool)
    if not valid or not 0 <= frozen_layers <= len(backbone.layers):
        raise ValueError(
            f"`frozen_layers` is {frozen_layers!r} but {type(model).__name__} has {len(backbone.layers)} layers; "
            f"pass `FreezeResult.frozen_layers` (0 to {len(backbone.layers)})."
        )

    skip = frozen_prefix(backbone, frozen_layers)
    if skip < frozen_layers:
        logger.info(
            "tfmem: checkpointing the %d frozen layers after position %d too: trainable parameters upstream "
            "(the embeddings?) make them keep activations for backward",
            frozen_layers - skip,
            skip,
        )
    checkpointed = []
    for index, layer in enumerate(backbone.layers):
        if index < skip:
            _uncheckpoint(layer)
        else:
            _checkpoint(layer)
            checkpointed.append(backbone.layer_path(index))

    model_config = getattr(model, "config", None)
    if getattr(model_config, "use_cache", False):
        model_config.use_cache = False
        logger.info("tfmem: set %s.config.use_cache = False (a KV cache cannot be checkpointed)", type(model).__name__)
    return tuple(checkpointed)


def is_checkpointed(layer: nn.Module) -> bool:
    """Whether `layer` runs under checkpointing in training (by tfmem, or by transformers' own switch)."""
    if _is_ours(layer.__dict__.get("forward")):
        return True
    return _is_transformers_layer(layer) and bool(getattr(layer, "gradient_checkpointing", False))


def frozen_prefix(backbone: Backbone, frozen_layers: int) -> int:
    """How many of the first `frozen_layers` layers keep nothing for backward and need no checkpoint.

    A layer keeps nothing only when no parameter in it or anywhere upstream of it (the embedding block,
    earlier layers) requires grad. Without a known embedding block that cannot be shown, so it is 0.
    """
    embeddings = backbone.embedding_modules()
    if not embeddings or any(p.requires_grad for m in embeddings.values() for p in m.parameters()):
        return 0
    for index, layer in enumerate(backbone.layers[:frozen_layers]):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return frozen_layers


def _is_transformers_layer(layer: nn.Module) -> bool:
    # `transformers.modeling_layers.GradientCheckpointingLayer` (transformers >= 4.52; older versions: every
    # layer takes the generic path), looked up rather than imported: a layer of that class has imported its
    # module already, and importing it here would cost every user of this module transformers' modeling
    # code (1-2 s), which `tfmem plan` answered from its cache and `tfmem recipes` never need.
    layer_class = getattr(sys.modules.get("transformers.modeling_layers"), "GradientCheckpointingLayer", None)
    return layer_class is not None and isinstance(layer, layer_class)


def __getattr__(name: str) -> Any:
    """`GradientCheckpointingLayer` (None before transformers 4.52), imported when first asked for: see
    `_is_transformers_layer` for why not at import."""
    if name == "GradientCheckpointingLayer":
        try:
            from transformers.modeling_layers import GradientCheckpointingLayer
        except ImportError:
            return None
        return GradientCheckpointingLayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_ours(forward: Any) -> bool:
    return isinstance(forward, functools.partial) and forward.func is _checkpointed_forward


def _checkpoint(layer: nn.Module) -> None:
    if _is_transformers_layer(layer):
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = NON_REENTRANT_CHECKPOINT
        return
    if _is_ours(layer.__dict__.get("forward")):
        return  # already checkpointed: wrapping twice would recompute twice
    # Keep a forward someone else set on the instance (accelerate's hooks do), and call it inside.
    layer.forward = functools.partial(_checkpointed_forward, layer, layer.__dict__.get("forward"))
    # transformers reads this flag (`is_activation_checkpointing`, DDP settings); the layer itself ignores it.
    layer.gradient_checkpointing = True


def _uncheckpoint(layer: nn.Module) -> None:
    if _is_transformers_layer(layer):
        layer.gradient_checkpointing = False
        return
    forward = layer.__dict__.get("forward")
    if _is_ours(forward):
        inner = forward.args[1]
        if inner is None:
            del layer.forward
        else:
            layer.forward = inner
        layer.gradient_checkpointing = False


def _checkpointed_forward(layer: nn.Module, inner: Any, *args: Any, **kwargs: Any) -> Any:
    """The forward of a generically checkpointed layer: the layer's own forward, under checkpoint in training."""
    forward = inner if inner is not None else type(layer).forward.__get__(layer)
    if layer.training and torch.is_grad_enabled():
        return NON_REENTRANT_CHECKPOINT(forward, *args, **kwargs)
    return forward(*args, **kwargs)
