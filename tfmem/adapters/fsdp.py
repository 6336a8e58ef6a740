"""A recipe under PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`), through accelerate or the Trainer.

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)               # or recipe_fsdp_plugin(recipe)
    accelerator = Accelerator(**recipe.accelerator_kwargs(fsdp_plugin=plugin))
    model = recipe.prepare_model(model)                                  # freeze, checkpoint: before sharding
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    # or: TrainingArguments(..., fsdp=True, fsdp_config={"version": 2}), then recipe.apply(trainer)

What each technique becomes under sharding, and why:

- **Accumulation** stays exact: accelerate turns gradient sync off between micro-batches
  (`set_requires_gradient_sync(False)`), FSDP2 keeps unsharded gradients until the window's last
  backward, and its reduce-scatter averages over ranks as DDP does; `exact_loss` already undoes that
  average (it scales by the number of processes and divides by the window's item count over all of them).
- **Checkpointing is applied once, by tfmem.** accelerate's `activation_checkpointing` wraps every
  transformer layer in `CheckpointWrapper`; tfmem's wrapper is also non-reentrant but skips the frozen
  prefix (which keeps nothing for backward, so recomputing it would be waste) and keeps parameter names
  and `state_dict` keys unchanged (`CheckpointWrapper` inserts `_checkpoint_wrapped_module.`). Both on
  one layer would nest two checkpoints, and the inner layer would run three times per step. So when the
  recipe checkpoints, the plugin's `activation_checkpointing` is turned off (logged); when the recipe does
  not, the plugin's own setting is left alone.
- **Frozen parameters** stay out of the optimizer (tfmem freezes before `accelerator.prepare`, and the
  optimizer is built over `requires_grad` parameters). FSDP2 shards per parameter, so a unit may mix
  frozen and trainable parameters: frozen ones are all-gathered for compute and get no gradient, no
  reduce-scatter, no optimizer state. (accelerate also gives the input embeddings a unit of their own.)
  FSDP1 flattens a unit's parameters into one `FlatParameter`, which cannot mix them without
  `use_orig_params`; it is refused here.
- **bf16 goes through FSDP's `MixedPrecisionPolicy`, not autocast.** With `param_dtype=bf16` each unit
  is all-gathered in bf16 from the fp32 shards: the gathered unit and the all-gather traffic are half
  their fp32 size, and the unit's bf16 weights are freed when it reshards. Autocast would all-gather
  fp32 (twice the bytes) and then cast each weight on use, and its cast cache keeps the bf16 copy of
  every weight used until the autocast region (the whole forward) ends: 2 bytes per parameter of the
  whole model held through forward, which undoes the point of resharding. Gradients are reduced in
  fp32 (`reduce_dtype`), so summing over ranks and micro-batches loses nothing to bf16.
- **auto_micro_batch is refused**: a micro-batch split and retried on one rank after an out-of-memory
  leaves the other ranks waiting in a collective of a forward that rank abandoned (a hang).

accelerate does not shard on a CPU: with a CPU device it sets up `MULTI_CPU` (DDP) and ignores the
plugin. tfmem says so in the log; its own 2-process CPU tests select FSDP explicitly (see
tests/_fsdp.py).
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import torch

from tfmem.errors import RecipeError

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from tfmem.recipe import Recipe

logger = logging.getLogger(__name__)

# `reshard_after_forward` for each strategy: FULL_SHARD frees a unit's gathered parameters after its
# forward (and gathers again in backward); SHARD_GRAD_OP keeps them until backward is done.
STRATEGIES = {"fsdp": True, "fsdp-grad-op": False}


def mixed_precision_policy(recipe: Recipe) -> Any:
    """The `MixedPrecisionPolicy` tfmem uses for `recipe` under FSDP2, or None (full precision).

    bf16 parameters for compute, fp32 gradient reduction (see the module docstring for why not autocast).
    fp16 is refused earlier (see `plugin_problems`).
    """
    if recipe.mixed_precision != "bf16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def recipe_fsdp_plugin(recipe: Recipe, strategy: str = "fsdp", **kwargs: Any) -> Any:
    """An accelerate `FullyShardedDataParallelPlugin` (FSDP2) that carries `recipe`.

    Args:
        recipe: the recipe.
        strategy: "fsdp" (reshard after forward: FULL_SHARD) or "fsdp-grad-op" (keep the gathered
            parameters until backward: SHARD_GRAD_OP).
        kwargs: more plugin arguments (`auto_wrap_policy`, `cpu_offload`, ...).

    Raises:
        RecipeError: an unknown strategy, or the recipe cannot apply under FSDP (see `plugin_problems`).
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    if strategy not in STRATEGIES:
        raise RecipeError(f"`strategy` is {strategy!r}; use one of {', '.join(STRATEGIES)}.")
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=STRATEGIES[strategy], **kwargs)
    return plugin_for_recipe(recipe, plugin)


def recipe_problems(recipe: Recipe) -> list[str]:
    """What in `recipe` cannot apply under FSDP at all, whatever the plugin."""
    problems = []
    if recipe.auto_micro_batch:
        problems.append(
            "`auto_micro_batch` is true but the model is sharded with FSDP: a micro-batch split and retried on one "
            "rank after out-of-memory leaves the other ranks waiting in a collective. Set `auto_micro_batch: false` "
            "and choose the micro-batch with `tfmem plan --gpus N`."
        )
    if recipe.mixed_precision == "fp16":
        problems.append(
            "`mixed_precision` is 'fp16' under FSDP: sharded fp16 needs a gradient scaler over sharded gradients, "
            "which tfmem does not set up. Use `mixed_precision: bf16` (Ampere or newer) or `no`."
        )
    if recipe.optimizer.name != "adamw":
        # Checked with transformers 5.24's Adafactor and bitsandbytes 0.50's 8-bit AdamW: each builds part of
        # its state as a plain tensor next to FSDP2's DTensor gradients and fails at the first step.
        problems.append(
            f"`optimizer` is {recipe.optimizer.name!r} but the model is sharded with FSDP: its update mixes plain "
            "tensors with FSDP2's sharded (DTensor) parameters and fails at the first optimizer step. Use "
            "`optimizer: adamw` under FSDP, or DDP (`--strategy ddp`), where each GPU steps the whole model."
        )
    return problems


def plugin_problems(recipe: Recipe, plugin: Any) -> list[str]:
    """Every reason `recipe` cannot apply under accelerate's FSDP `plugin`, one line each."""
    problems = []
    version = getattr(plugin, "fsdp_version", 1)
    if version != 2:
        problems.append(
            f"`fsdp_version` is {version} in the FSDP plugin; tfmem's recipes need FSDP2, whose per-parameter "
            "sharding keeps frozen and trainable parameters apart inside one unit (FSDP1 flattens them together). "
            "Pass `FullyShardedDataParallelPlugin(fsdp_version=2, ...)` (or `fsdp_config={'version': 2}`)."
        )
    problems += recipe_problems(recipe)
    policy = getattr(plugin, "mixed_precision_policy", None)
    param_dtype = getattr(policy, "param_dtype", None)
    wanted = torch.bfloat16 if recipe.mixed_precision == "bf16" else None
    if policy is not None and param_dtype not in (None, torch.float32, wanted):
        problems.append(
            f"`mixed_precision_policy.param_dtype` is {param_dtype} in the FSDP plugin but the recipe's "
            f"`mixed_precision` is {recipe.mixed_precision!r}; leave the policy unset and let the recipe decide."
        )
    return problems


def plugin_for_recipe(recipe: Recipe, plugin: Any) -> Any:
    """A copy of `plugin` with the recipe's checkpointing and precision choices (the original is unchanged).

    Raises:
        RecipeError: see `plugin_problems`.
    """
    if problems := plugin_problems(recipe, plugin):
        raise RecipeError(problems, heading=f"Recipe {recipe.name!r} cannot apply under this FSDP plugin")
    plugin = copy.copy(plugin)
    if recipe.gradient_checkpointing and plugin.activation_checkpointing:
        # One checkpoint per layer: tfmem's (see the module docstring).
        logger.info("tfmem: FSDP's activation_checkpointing turned off; the recipe checkpoints the layers itself")
        plugin.activation_checkpointing = False
    if (policy := mixed_precision_policy(recipe)) is not None:
        plugin.mixed_precision_policy = policy
    return plugin


def plugin_from_launch() -> Any:
    """The FSDP plugin `accelerate launch --use_fsdp ...` configured (through the environment), or None.

    Without it tfmem would not see the sharding and accelerate would build the plugin itself, with its
    own checkpointing and autocast on top; reading it here lets the recipe's choices apply.
    """
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin()


def accelerator_kwargs(recipe: Recipe, plugin: Any, kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """`Accelerator` keyword arguments for `recipe` under FSDP `plugin`, from the plain ones in `kwargs`.

    bf16 moves from accelerate's `mixed_precision` (which would also autocast) into the plugin's policy.
    """
    kwargs = dict(kwargs)
    kwargs["fsdp_plugin"] = plugin_for_recipe(recipe, plugin)
    if recipe.mixed_precision == "bf16":
        kwargs["mixed_precision"] = "no"
    if device.type == "cpu":
        logger.warning(
            "tfmem: accelerate does not shard on a CPU: it runs DDP there and ignores the FSDP plugin "
            "(launch on GPUs to shard)"
        )
    return kwargs


# -- the Trainer's `fsdp` / `fsdp_config` arguments ------------------------------------------------------


def uses_fsdp(args: TrainingArguments) -> bool:
    return bool(getattr(args, "fsdp", None)) and getattr(args, "fsdp_plugin_args", None) is not None


def argument_problems(recipe: Recipe, args: TrainingArguments) -> list[str]:
    """Reasons `recipe` cannot apply under the FSDP that `args` configure (none when FSDP is off)."""
    if not uses_fsdp(args):
        return []
    problems = []
    version = args.fsdp_plugin_args.get("fsdp_version", 1)
    if version != 2:
        problems.append(
            f"`fsdp_config['version']` is {version} in the TrainingArguments; tfmem's recipes need FSDP2 (per-"
            "parameter sharding keeps frozen and trainable parameters apart). Set `fsdp_config={'version': 2}`."
        )
    return problems + recipe_problems(recipe)


def argument_changes(recipe: Recipe, args: TrainingArguments) -> dict[str, Any]:
    """`dataclasses.replace` changes to `args` for FSDP (empty when FSDP is off)."""
    if not uses_fsdp(args):
        return {}
    changes: dict[str, Any] = {}
    config = dict(args.fsdp_config or {})
    if recipe.gradient_checkpointing and str(config.get("activation_checkpointing", "false")).lower() == "true":
        logger.info("tfmem: fsdp_config['activation_checkpointing'] turned off; the recipe checkpoints the layers itself")
        config["activation_checkpointing"] = False
        changes["fsdp_config"] = config
    if recipe.mixed_precision == "bf16":
        changes["bf16"] = False  # the plugin's MixedPrecisionPolicy does it (no autocast): see `finish_arguments`
    return changes


def finish_arguments(recipe: Recipe, args: TrainingArguments) -> None:
    """After `dataclasses.replace` rebuilt `args.fsdp_plugin_args`: put the recipe's bf16 policy in them."""
    if uses_fsdp(args) and (policy := mixed_precision_policy(recipe)) is not None:
        args.fsdp_plugin_args["mixed_precision_policy"] = policy


def wrap_layers(args: TrainingArguments, model: torch.nn.Module) -> None:
    """Shard each of the model's layers as a unit when `args` ask for transformer-based wrapping without naming
    the layer class.

    The Trainer then takes the classes from the model (`_no_split_modules`), which for BERT includes
    `BertEmbeddings`; accelerate also carves the input embeddings into a unit of their own, and
    `fully_shard` on a module whose parameters are already sharded fails. tfmem knows the layers
    (`find_backbone`), so it names their class.
    """
    if not uses_fsdp(args):
        return
    plugin_args = args.fsdp_plugin_args
    if plugin_args.get("transformer_cls_names_to_wrap") or "transformer" not in str(plugin_args.get("auto_wrap_policy", "")).lower():
        return
    from tfmem.errors import UnsupportedModelError
    from tfmem.techniques.architecture import find_backbone

    try:
        layers = find_backbone(model).layers
    except UnsupportedModelError:
        return  # the Trainer's own choice stands
    names = sorted({type(layer).__name__ for layer in layers})
    plugin_args["transformer_cls_names_to_wrap"] = ",".join(names)
    logger.info("tfmem: FSDP units: each %s (and the embeddings, and the rest of the model)", "/".join(names))


# -- checks on a prepared model ------------------------------------------------------------------------


def double_checkpointed_layers(model: torch.nn.Module) -> list[str]:
    """Names of layers under two checkpoints: FSDP's `CheckpointWrapper` around a layer tfmem checkpoints.

    Example:
        >>> double_checkpointed_layers(torch.nn.Linear(1, 1))
        []
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from tfmem.techniques.checkpointing import is_checkpointed

    return [
        name for name, module in model.named_modules()
        if isinstance(module, CheckpointWrapper) and is_checkpointed(module._checkpoint_wrapped_module)
    ]


def checkpointing_problems(model: torch.nn.Module) -> list[str]:
    """A problem line when FSDP's activation checkpointing and the recipe's both wrap some layer."""
    layers = double_checkpointed_layers(model)
    if not layers:
        return []
    return [
        f"{len(layers)} layers (first: {layers[0]}) are checkpointed twice: `activation_checkpointing` is on in the "
        "FSDP plugin and the recipe's `gradient_checkpointing` checkpoints the same layers, so each would run three "
        "times per step. Build the Accelerator from `recipe.accelerator_kwargs(fsdp_plugin=plugin)`, which turns "
        "FSDP's off, or pass `activation_checkpointing=False` in the plugin."
    ]


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` (or a module inside it) is sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


__all__ = [
    "STRATEGIES",
    "accelerator_kwargs",
    "argument_changes",
    "argument_problems",
    "checkpointing_problems",
    "double_checkpointed_layers",
    "finish_arguments",
    "is_sharded",
    "plugin_from_launch",
    "mixed_precision_policy",
    "plugin_for_recipe",
    "plugin_problems",
    "recipe_fsdp_plugin",
    "recipe_problems",
]
