"""The Trainer adapter: a recipe into `transformers.Trainer`'s own machinery.

- Accumulation: `per_device_train_batch_size` becomes the micro-batch and `gradient_accumulation_steps`
  the recipe's, so the user's batch size stays the effective batch. A `compute_loss_func` normalises the
  loss over the whole accumulated batch (see `tfmem.techniques.accumulation`): transformers 5.x passes
  `num_items_in_batch` to any model whose forward takes `**kwargs` and then skips its own division by
  the accumulation steps, but BERT-family heads accept the argument and ignore it, so without this the
  accumulated gradient comes out `steps` times too large.
- Mixed precision: the Trainer's `fp16`/`bf16` arguments, so its accelerator builds the GradScaler and
  autocast, and skips the scheduler on skipped fp16 steps.
- Optimizer, TF32, length grouping: the Trainer's own `optim` (`adamw_bnb_8bit`, `adafactor`; left at
  its AdamW default for `adamw`), `tf32` and `train_sampling_strategy="group_by_length"` (`group_by_length`
  before transformers 5), so `trainer.create_optimizer()` and its data loader build them. The recipe's
  defaults (adamw, no tf32, no grouping) leave the arguments alone; otherwise arguments left at their
  defaults take the recipe's choice, and any other setting must agree with it.
- Checkpointing and freezing: done by tfmem on the model (`prepare_model`), because transformers'
  own checkpointing wraps frozen layers too and refuses some families (MPNet). The Trainer's
  `activation_checkpointing` argument is therefore left off.

All checks run before anything changes: a recipe either applies whole or raises `RecipeError`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from torch import nn

from tfmem.adapters import fsdp
from tfmem.errors import RecipeError
from tfmem.log import announce
from tfmem.prepare import Prepared, model_problems, prepare, warn_if_everything_frozen
from tfmem.techniques._modules import unwrap_model
from tfmem.techniques.accumulation import ExactLoss, loss_shifts_labels, micro_batch_size, supports_exact_loss
from tfmem.techniques.micro_batch import MicroBatchSplitter
from tfmem.techniques.optimizer import optimizer_problems, trainer_optim, trainer_optim_problems
from tfmem.techniques.precision import precision_problems
from tfmem.techniques.tf32 import tf32_problems

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments

    from tfmem.recipe import Recipe

logger = logging.getLogger(__name__)

_APPLIED = "_tfmem_recipe"  # set on a Trainer / TrainingArguments the recipe was applied to


def _checkpointing_arg(args: TrainingArguments) -> str:
    # transformers 5.x renamed `gradient_checkpointing` to `activation_checkpointing` (old name kept as an alias).
    return "activation_checkpointing" if hasattr(args, "activation_checkpointing") else "gradient_checkpointing"


def arguments_precision(args: TrainingArguments) -> str:
    """The mixed precision TrainingArguments ask for, in recipe terms: "fp16", "bf16" or "no"."""
    return "fp16" if getattr(args, "fp16", False) else "bf16" if getattr(args, "bf16", False) else "no"


def argument_problems(recipe: Recipe, args: TrainingArguments) -> list[str]:
    """Ways `recipe` contradicts settings already made in `args`, or does not fit its device."""
    problems = []
    if getattr(args, _APPLIED, None):
        problems.append(
            f"these TrainingArguments already carry recipe {getattr(args, _APPLIED)!r}; apply a recipe to the original arguments, once."
        )
        return problems
    steps = recipe.gradient_accumulation_steps
    if steps > 1 and args.gradient_accumulation_steps != 1:
        problems.append(
            f"`gradient_accumulation_steps` is {steps} in the recipe and {args.gradient_accumulation_steps} in the "
            "TrainingArguments; the recipe splits your batch itself: leave `gradient_accumulation_steps=1` in the "
            "arguments and set `per_device_train_batch_size` to the effective batch."
        )
    elif steps > 1:
        try:
            micro_batch_size(args.per_device_train_batch_size, steps)
        except RecipeError as e:
            problems.extend(p.replace("the batch size", "`per_device_train_batch_size`") for p in e.problems)
    user_precision = arguments_precision(args)
    # Arguments that ask for no mixed precision leave the choice to the recipe; any other choice must agree.
    if user_precision != "no" and user_precision != recipe.mixed_precision:
        problems.append(
            f"`mixed_precision` is {recipe.mixed_precision!r} in the recipe but the TrainingArguments ask for "
            f"{user_precision!r} ({user_precision}=True); leave fp16 and bf16 off in the arguments and let the "
            "recipe decide, or use a recipe with the precision you want."
        )
    name = _checkpointing_arg(args)
    if getattr(args, name, False) and not recipe.gradient_checkpointing:
        alias = " (or its deprecated alias `gradient_checkpointing`)" if name == "activation_checkpointing" else ""
        problems.append(
            f"`gradient_checkpointing` is false in the recipe but `{name}`{alias} is True in the TrainingArguments; "
            f"set it to False in the arguments or use a recipe with `gradient_checkpointing: true`."
        )
    if needs_exact_loss(recipe, args) and args.label_smoothing_factor:
        problems.append(
            f"`label_smoothing_factor` is {args.label_smoothing_factor} in the TrainingArguments; tfmem's exact loss "
            "normalisation under gradient accumulation does not implement label smoothing. Set it to 0 or use "
            "`gradient_accumulation_steps: 1`."
        )
    problems += trainer_optim_problems(recipe.optimizer, args.optim)
    # `tf32: false` and `group_by_length: false` (the defaults) leave the arguments' own choice alone.
    if recipe.tf32.enabled and getattr(args, "tf32", None) is False:
        problems.append(
            f"`tf32` is {str(recipe.tf32.enabled).lower()} in the recipe but {args.tf32} in the TrainingArguments; "
            "leave `tf32` unset in the arguments and let the recipe decide, or use a recipe with the `tf32` you want."
        )
    grouped = _grouped_by_length(args)
    if recipe.group_by_length and grouped is False:
        problems.append(
            f"`group_by_length` is {str(recipe.group_by_length).lower()} in the recipe but the TrainingArguments "
            f"ask for {_sampling_setting(args)}; leave it at its default and let the recipe decide, or use a recipe "
            "with the `group_by_length` you want."
        )
    problems += precision_problems(recipe.mixed_precision, args.device)
    problems += tf32_problems(recipe.tf32.enabled, args.device)
    problems += optimizer_problems(recipe.optimizer, args.device)
    problems += fsdp.argument_problems(recipe, args)
    return problems


def _grouped_by_length(args: TrainingArguments) -> bool | None:
    """Whether the arguments group by length (True), choose another order (False), or leave it (None)."""
    strategy = getattr(args, "train_sampling_strategy", None)
    if strategy is None:  # transformers < 5
        return True if getattr(args, "group_by_length", False) else None
    return None if strategy == "random" else strategy == "group_by_length"


def _sampling_setting(args: TrainingArguments) -> str:
    strategy = getattr(args, "train_sampling_strategy", None)
    return f"train_sampling_strategy={strategy!r}" if strategy is not None else "group_by_length=True"


def training_arguments(recipe: Recipe, args: TrainingArguments) -> TrainingArguments:
    """A copy of `args` carrying the recipe's accumulation and precision (the original is not changed).

    Raises:
        RecipeError: listing every contradiction between the recipe and `args`.
    """
    if problems := argument_problems(recipe, args):
        raise RecipeError(problems, heading=f"Recipe {recipe.name!r} does not fit these TrainingArguments")
    if recipe.auto_micro_batch:
        # Splitting wraps the Trainer's training step, which does not exist yet on this route.
        logger.warning(
            "tfmem: recipe %r has auto_micro_batch, which needs the Trainer itself: call recipe.apply(trainer) "
            "instead of building the Trainer from recipe.training_arguments(args).", recipe.name
        )
    return _with_recipe(recipe, args)


def _with_recipe(recipe: Recipe, args: TrainingArguments) -> TrainingArguments:
    changes: dict[str, Any] = {
        "fp16": recipe.mixed_precision == "fp16",
        "bf16": recipe.mixed_precision == "bf16",
        # tfmem checkpoints the model itself (frozen layers skipped, non-reentrant, every family).
        _checkpointing_arg(args): False,
    }
    if optim := trainer_optim(recipe.optimizer):
        changes["optim"] = optim
    if recipe.tf32.enabled:
        changes["tf32"] = True
    if recipe.group_by_length:
        if hasattr(args, "train_sampling_strategy"):
            changes["train_sampling_strategy"] = "group_by_length"
        else:  # transformers < 5
            changes["group_by_length"] = True
    if recipe.gradient_accumulation_steps > 1:
        changes["gradient_accumulation_steps"] = recipe.gradient_accumulation_steps
        changes["per_device_train_batch_size"] = micro_batch_size(
            args.per_device_train_batch_size, recipe.gradient_accumulation_steps
        )
    changes.update(fsdp.argument_changes(recipe, args))  # FSDP: one checkpoint per layer; bf16 by policy
    new = dataclasses.replace(args, **changes)
    fsdp.finish_arguments(recipe, new)
    setattr(new, _APPLIED, recipe.name)
    return new


def needs_exact_loss(recipe: Recipe, args: TrainingArguments | None = None) -> bool:
    """Accumulation — the recipe's or the user's own — and splitting micro-batches on out-of-memory all
    need the whole-batch loss. (Accumulation set in the arguments alone hits the same transformers
    behaviour: BERT heads ignore `num_items_in_batch`, so the gradient comes out `steps` times too large.)"""
    user_steps = args.gradient_accumulation_steps if args is not None else 1
    return max(recipe.gradient_accumulation_steps, user_steps) > 1 or recipe.auto_micro_batch


def loss_problems(
    recipe: Recipe, model: nn.Module, compute_loss_func: Any = None, args: TrainingArguments | None = None
) -> list[str]:
    """Whether tfmem can make the accumulated loss exact for `model` (or the user already did)."""
    if not needs_exact_loss(recipe, args) or compute_loss_func is not None or supports_exact_loss(model):
        return []
    steps = max(recipe.gradient_accumulation_steps, args.gradient_accumulation_steps if args is not None else 1)
    return [
        f"`gradient_accumulation_steps` is {steps}"
        f"{' with auto_micro_batch' if recipe.auto_micro_batch else ''} but tfmem cannot normalise the loss of "
        f"{type(model).__name__} exactly over the accumulated batch; pass your own "
        "`compute_loss_func(outputs, labels, num_items_in_batch)` to the Trainer (returning the summed loss divided "
        "by num_items_in_batch), or use `gradient_accumulation_steps: 1`."
    ]


def compute_loss_func(recipe: Recipe, model: nn.Module, args: TrainingArguments | None = None) -> ExactLoss | None:
    """The `compute_loss_func` a Trainer needs for `recipe` with `args`.

    Without `args` it returns the exact loss whenever tfmem knows the model's head: exact with or
    without accumulation, so it is safe when the arguments are not at hand. With `args`, None when
    nothing accumulates (so the Trainer's own label smoothing, say, stays in charge).

    Raises:
        RecipeError: accumulation is on and tfmem does not know the model's loss (see `loss_problems`).
    """
    if args is not None and not needs_exact_loss(recipe, args):
        return None
    if problems := loss_problems(recipe, model, args=args):
        raise RecipeError(problems, heading=f"Recipe {recipe.name!r} does not fit {type(model).__name__}")
    return ExactLoss(model) if supports_exact_loss(model) else None


def trainer_problems(trainer: Trainer) -> list[str]:
    """Reasons the trainer can no longer take a recipe whole."""
    problems = []
    if getattr(trainer, _APPLIED, None):
        problems.append(f"recipe {getattr(trainer, _APPLIED)!r} was already applied to this Trainer; apply one recipe, once.")
    if trainer.optimizer is not None:
        problems.append(
            "the Trainer's optimizer already exists, so it may hold state for parameters the recipe freezes; "
            "call `recipe.apply(trainer)` before `trainer.train()` / `create_optimizer()`, and do not pass `optimizers=`."
        )
    if trainer.state.global_step > 0 or getattr(trainer, "is_in_train", False):
        problems.append("the Trainer has already trained; apply the recipe to a new Trainer before `train()`.")
    return problems


def apply_recipe(recipe: Recipe, trainer: Trainer) -> Trainer:
    """Apply `recipe` to a constructed Trainer that has not started training; return the trainer.

    Collects every problem (trainer state, argument contradictions, device, model structure, loss)
    before changing anything, so an error leaves the trainer exactly as it was.

    Raises:
        RecipeError: listing every problem.
    """
    problems = trainer_problems(trainer)
    if not problems:
        problems += argument_problems(recipe, trainer.args)
        problems += model_problems(trainer.model, recipe)
        problems += loss_problems(recipe, trainer.model, trainer.compute_loss_func, trainer.args)
    if problems:
        raise RecipeError(problems, heading=f"Recipe {recipe.name!r} cannot be applied to this Trainer")

    trainer.args = _with_recipe(recipe, trainer.args)
    fsdp.wrap_layers(trainer.args, unwrap_model(trainer.model))
    # The Trainer read these at construction; the recipe changes them, so they are rebuilt the way
    # `Trainer.__init__` builds them (accelerator: mixed precision and GradScaler; batch size: the loader).
    # Always rebuild the accelerator: building TrainingArguments resets accelerate's process-wide state.
    trainer._train_batch_size = trainer.args.train_batch_size
    trainer.create_accelerator_and_postprocess()
    prepared = prepare(trainer.model, recipe)
    if needs_exact_loss(recipe, trainer.args) and trainer.compute_loss_func is None:
        trainer.compute_loss_func = ExactLoss(trainer.model)
        # Trainer counts `num_items_in_batch` from labels[..., 1:] only when transformers' LOSS_MAPPING names
        # the model's loss causal; GPT-2 (`loss_type=None`) falls through and is counted unshifted, which
        # would divide a shifted sum by the wrong count. Tell it what the loss really does.
        if hasattr(trainer, "_loss_shifts_labels"):
            trainer._loss_shifts_labels = loss_shifts_labels(trainer.model)
    if recipe.auto_micro_batch:
        _split_on_out_of_memory(trainer)
    setattr(trainer, _APPLIED, recipe.name)
    warn_if_everything_frozen(prepared)
    announce(applied_line(recipe, trainer.args, prepared))
    return trainer


_PRECISION_WORDS = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling"}


def applied_line(recipe: Recipe, args: TrainingArguments, prepared: Prepared) -> str:
    """The one line `apply` shows, e.g. "tfmem: applied low-memory to the Trainer — micro-batch 4 x 4
    accumulation = 16, bf16 autocast, checkpointing 6 layers (0-5), frozen: nothing"."""
    micro, steps = args.per_device_train_batch_size, args.gradient_accumulation_steps
    parts = [f"micro-batch {micro} x {steps} accumulation = {micro * steps}", _PRECISION_WORDS[recipe.mixed_precision]]
    parts += prepared.parts()
    if recipe.auto_micro_batch:
        parts.append("micro-batch halved on out-of-memory")
    return f"tfmem: applied {recipe.name} to the Trainer — {', '.join(parts)}"


def _split_on_out_of_memory(trainer: Trainer) -> None:
    """Route each micro-batch through a `MicroBatchSplitter`.

    Trainer has no hook around one micro-batch's forward and backward, so its `training_step` is
    wrapped on this instance (the class is untouched). Each piece still gets the window's
    `num_items_in_batch`, so the pieces' gradients add up exactly.
    """
    splitter = MicroBatchSplitter(trainer.model)
    original = trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        return splitter.run(inputs, lambda piece: original(model, piece, num_items_in_batch))

    trainer.training_step = training_step  # type: ignore[method-assign]
    trainer.tfmem_micro_batch_splitter = splitter  # type: ignore[attr-defined]
