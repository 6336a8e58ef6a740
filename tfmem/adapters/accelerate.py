"""The accelerate adapter: a recipe in a plain `accelerate` training loop.

    accelerator = Accelerator(**recipe.accelerator_kwargs())  # also checks tf32 / the optimizer on the device
    model = recipe.prepare_model(model)                     # freeze, checkpoint
    optimizer = recipe.create_optimizer(model, lr=2e-5)   # adamw | adamw-8bit | adafactor
    loader = DataLoader(dataset, batch_sampler=recipe.batch_sampler(dataset, micro_batch), ...)  # group_by_length
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    with recipe.tf32_matmul():      # tf32: true; the previous setting is restored afterwards
        for window in tfmem.accumulation_windows(loader, accelerator, model):
            with accelerator.accumulate(model):
                outputs = model(**window.batch)
                accelerator.backward(tfmem.exact_loss(model, outputs, window, accelerator))
                optimizer.step()
                scheduler.step()        # accelerate skips it when an fp16 step was skipped
                optimizer.zero_grad()

`accelerator.backward` divides every loss by the accumulation steps, which averages micro-batch
*means*: exact only when every micro-batch holds the same number of items. `exact_loss` instead
returns each micro-batch's summed loss over the item count of its whole window (times the steps,
which accelerate divides back out), so the accumulated gradient is the full-batch gradient also for
token-level losses and for the short window that ends an epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tfmem.errors import RecipeError
from tfmem.techniques.accumulation import AccumulationWindow, count_loss_items, loss_shifts_labels, summed_loss
from tfmem.techniques.micro_batch import MicroBatchSplitter
from tfmem.techniques.optimizer import optimizer_problems
from tfmem.techniques.precision import precision_problems
from tfmem.techniques.tf32 import tf32_problems

if TYPE_CHECKING:
    from accelerate import Accelerator

    from tfmem.recipe import Recipe


def default_device() -> torch.device:
    """The device accelerate will pick on this machine when not told otherwise."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def accelerator_kwargs(
    recipe: Recipe, device: torch.device | str | None = None, fsdp_plugin: Any = None
) -> dict[str, Any]:
    """`Accelerator` keyword arguments for `recipe`, after checking its precision, TF32 and optimizer against the device.

    Args:
        recipe: the recipe.
        device: where training runs; default what accelerate picks (CUDA when present).
        fsdp_plugin: an accelerate `FullyShardedDataParallelPlugin` to shard with; the kwargs then carry a
            copy adjusted for the recipe (see `tfmem.adapters.fsdp`). Under `accelerate launch --use_fsdp`
            the launcher's plugin is read from the environment when none is given.

    Raises:
        RecipeError: the precision is wrong for the device (fp16 on CPU, bf16 below compute capability 8.0),
            TF32 is asked for without TF32 tensor cores, adamw-8bit cannot run there, or the recipe cannot
            apply under the FSDP plugin.
    """
    from tfmem.adapters import fsdp

    device = torch.device(device) if device is not None else default_device()
    problems = precision_problems(recipe.mixed_precision, device)
    problems += tf32_problems(recipe.tf32.enabled, device)
    problems += optimizer_problems(recipe.optimizer, device)
    if fsdp_plugin is None:
        fsdp_plugin = fsdp.plugin_from_launch()  # `accelerate launch --use_fsdp`
    if fsdp_plugin is not None:
        problems += fsdp.plugin_problems(recipe, fsdp_plugin)
    if problems:
        raise RecipeError(problems, heading=f"Recipe {recipe.name!r} does not fit device {device}")
    kwargs: dict[str, Any] = {
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
        "mixed_precision": recipe.mixed_precision,
    }
    if device.type == "cpu" and torch.cuda.is_available():
        kwargs["cpu"] = True
    if fsdp_plugin is not None:
        kwargs = fsdp.accelerator_kwargs(recipe, fsdp_plugin, kwargs, device)
    return kwargs


def accumulation_windows(dataloader: Iterable[Any], accelerator: Accelerator, model: nn.Module) -> Iterator[AccumulationWindow]:
    """Yield the loader's micro-batches, each with the item count of its accumulation window.

    Looks ahead up to `accelerator.gradient_accumulation_steps` micro-batches (index tensors, small
    beside activations) so the first backward of a window already knows the window's item count.

    Works with `accelerator.accumulate`: a loader prepared by accelerate flags its last batch as the end
    of the data, which makes `accumulate` step at once. While the other micro-batches of that last window
    run, the flag is held back, and it is raised again for the window's last micro-batch, so the
    optimizer steps exactly once per window.
    """
    from tfmem.adapters import fsdp

    if problems := fsdp.checkpointing_problems(model):  # before the first step, not after a slow one
        raise RecipeError(problems, heading="The recipe's checkpointing cannot apply under this FSDP setup")
    steps = accelerator.gradient_accumulation_steps
    shifts = loss_shifts_labels(model)
    total = _length(dataloader)
    iterator = iter(dataloader)
    pulled = 0
    while True:
        window = []
        while len(window) < steps:
            # Stop before asking past the last batch: that ends accelerate's view of the loader
            # (and with it the end-of-data sync) before the window has run.
            # (The flag is stale until the first batch of an epoch is pulled.)
            if (total is not None and pulled >= total) or (pulled and getattr(dataloader, "end_of_dataloader", False)):
                break
            try:
                window.append(next(iterator))
            except StopIteration:
                break
            pulled += 1
        if not window:
            return
        num_items = sum(count_loss_items(b["labels"], shifts_labels=shifts) for b in window)
        at_end = bool(getattr(dataloader, "end_of_dataloader", False))
        for i, batch in enumerate(window):
            if at_end:
                dataloader.end_of_dataloader = i == len(window) - 1  # type: ignore[attr-defined]
            yield AccumulationWindow(batch=batch, num_items=num_items, num_micro_batches=len(window))
        if at_end or (total is not None and pulled >= total):
            # Let the loader finish its own iteration (accelerate resets its state there).
            for _ in iterator:
                pass
            return


def exact_loss(model: nn.Module, outputs: Any, window: AccumulationWindow, accelerator: Accelerator) -> torch.Tensor:
    """The loss to pass to `accelerator.backward` for an exact accumulated gradient.

    Args:
        model: the (prepared) model.
        outputs: what the model returned for `window.batch` (needs `logits`).
        window: from `accumulation_windows`.
        accelerator: the loop's accelerator.

    Returns:
        summed micro-batch loss / items in the window, times the accumulation steps (which
        `accelerator.backward` divides out again), times the number of processes (DDP averages
        gradients across processes, while the item count is taken over all of them).
    """
    logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else outputs[0]
    total = summed_loss(model, logits, window.batch["labels"])
    num_items = window.num_items.to(total.device)
    scale = accelerator.gradient_accumulation_steps
    if accelerator.num_processes > 1:
        num_items = accelerator.gather(num_items.reshape(1)).sum()
        scale *= accelerator.num_processes
    return total * scale / num_items


def _length(dataloader: Iterable[Any]) -> int | None:
    try:
        return len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        return None


def backward_step(
    model: nn.Module,
    window: AccumulationWindow,
    accelerator: Accelerator,
    splitter: MicroBatchSplitter | None = None,
) -> torch.Tensor:
    """Forward and backward of one micro-batch with `exact_loss`; returns the detached loss.

    With a `splitter` (from `recipe.micro_batch_splitter(model)`), a micro-batch that runs out of
    memory is split in halves and retried, and later ones are split as finely (see
    `tfmem.techniques.micro_batch`).
    """

    def step(batch: dict[str, Any]) -> torch.Tensor:
        outputs = model(**batch)
        piece = AccumulationWindow(batch=batch, num_items=window.num_items, num_micro_batches=window.num_micro_batches)
        loss = exact_loss(model, outputs, piece, accelerator)
        accelerator.backward(loss)
        return loss.detach()

    if splitter is None:
        return step(window.batch)
    return splitter.run(window.batch, step)
