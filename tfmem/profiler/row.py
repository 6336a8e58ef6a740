"""One row of a profile: train a few steps of a fresh model under one recipe in this process, and measure them.

`profile_recipe` is what each row's process runs (tfmem/profiler/isolation.py), and what an in-process
sweep (`SweepSpec(isolate=False)`) runs one recipe after another:

1. a fresh model (same seed, so every recipe starts from the same weights), `recipe.prepare_model`,
   an `Accelerator` built from `recipe.accelerator_kwargs(device)`, and the optimizer a `Trainer` user
   gets by default (`trainer_defaults()`: transformers 5 builds AdamW with `fused=True`), `accelerator.prepare`;
2. the loop the accelerate adapter documents (`accumulation_windows`, `accelerator.accumulate`,
   `backward_step` with the recipe's auto_micro_batch splitter), with the Trainer's default gradient
   clipping and gradients set to None after each optimizer step (as `model.zero_grad()` in the Trainer),
   wrapped in a `Profiler`: a memory window, then untimed warm-up, then timed steps;
3. one result row (the sweep writes it to disk at once: see `RowWriter`).

Failures are results: an out-of-memory (CUDA, the CPU allocator, or the CPU `max_memory_bytes` limit)
gives an `oom` row with the bytes asked for, anything else an `error` row with its message.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tfmem.data import padding_fraction
from tfmem.errors import is_out_of_memory
from tfmem.profiler.batches import Sample, micro_batches
from tfmem.profiler.session import Profiler
from tfmem.recipe import Recipe
from tfmem.techniques.accumulation import micro_batch_size
from tfmem.techniques.grouping import group_batches
from tfmem.techniques.optimizer import optimizer_problems
from tfmem.techniques.precision import precision_problems
from tfmem.techniques.tf32 import tf32_problems
from tfmem.zoo import build_model

if TYPE_CHECKING:  # the sweep imports this module: its spec is a type here only
    from tfmem.profiler.sweep import SweepSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerDefaults:
    """What a `transformers.Trainer` user gets without choosing: the optimizer and the gradient handling.

    Read from the installed `TrainingArguments` defaults, so the profile follows transformers when they
    change (transformers 5 with torch >= 2.8: `optim="adamw_torch_fused"`, on every device).
    """

    optim: str
    learning_rate: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    max_grad_norm: float

    @property
    def fused(self) -> bool:
        return self.optim == "adamw_torch_fused"

    def optimizer(self, parameters) -> torch.optim.Optimizer:
        """The optimizer Trainer's `create_optimizer` builds for these defaults (one parameter group: the
        decay / no-decay split changes no memory)."""
        kwargs: dict[str, Any] = dict(lr=self.learning_rate, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)
        if self.fused:
            kwargs["fused"] = True
        return torch.optim.AdamW(parameters, **kwargs)

    def describe(self) -> str:
        kind = "fused AdamW" if self.fused else "AdamW"
        clip = f"gradients clipped at norm {self.max_grad_norm:g}" if self.max_grad_norm > 0 else "no gradient clipping"
        return f"{kind} (Trainer's default optim={self.optim!r}), {clip}, gradients set to None after each step"


def trainer_defaults() -> TrainerDefaults:
    """The installed transformers' `TrainingArguments` defaults for the optimizer (no Trainer is built).

    Example:
        >>> trainer_defaults().optim in ("adamw_torch_fused", "adamw_torch")
        True
    """
    from transformers.training_args import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    optim = str(getattr(fields["optim"].default, "value", fields["optim"].default))
    if optim not in ("adamw_torch_fused", "adamw_torch"):  # a transformers that changed its default
        logger.warning("Trainer's default optimizer is %r; the profile trains with torch's AdamW instead.", optim)
    return TrainerDefaults(
        optim=optim,
        learning_rate=fields["learning_rate"].default,
        betas=(fields["adam_beta1"].default, fields["adam_beta2"].default),
        eps=fields["adam_epsilon"].default,
        weight_decay=fields["weight_decay"].default,
        max_grad_norm=fields["max_grad_norm"].default,
    )



def _row_base(recipe: Recipe, spec: SweepSpec) -> dict[str, Any]:
    return {
        "recipe": recipe.name,
        "status": "error",
        "message": "",
        "techniques": recipe.summary(),
        "device": str(spec.torch_device),
        "batch_size": spec.batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
        "seq_len": spec.seq_len,
    }


def _not_runnable(recipe: Recipe, spec: SweepSpec) -> str | None:
    """Why `recipe` cannot run on this device at all (known without starting anything), or None."""
    problems = precision_problems(recipe.mixed_precision, spec.torch_device)
    problems += tf32_problems(recipe.tf32.enabled, spec.torch_device)
    if problems := problems + optimizer_problems(recipe.optimizer, spec.torch_device):
        return " ".join(problems)
    try:
        micro_batch_size(spec.batch_size, recipe.gradient_accumulation_steps)
    except ValueError as e:
        return str(e)
    return None


def profile_recipe(
    recipe: Recipe,
    spec: SweepSpec,
    samples: list[Sample],
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train `spec.total_steps()` optimizer steps of a fresh model under `recipe` in this process and measure them.

    Never raises for a failing recipe: returns a row with `status` "ok", "oom" or "error". Everything the
    row built is released before it returns, reference cycles included (see tfmem/profiler/isolation.py).
    """
    device = spec.torch_device
    row = _row_base(recipe, spec)
    if reason := _not_runnable(recipe, spec):
        row["message"] = f"not run: {reason}"
        return row
    micro = micro_batch_size(spec.batch_size, recipe.gradient_accumulation_steps)
    row["micro_batch_size"] = micro
    state: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    notes: list[str] = []
    try:
        # Only figures come back: the profiler holds the model, which must be gone before the next recipe.
        with quiet_transformers():
            figures, refused = _measure(recipe, spec, samples, micro, state, on_step)
        row["status"] = "ok"
        if note := _split_note(state.get("splitter"), micro):
            if refused:
                note += "; every memory step split, so the peak counts the refused allocation (raise --memory-steps)"
            notes.append(note)
    except Exception as e:  # a recipe that fails is a row, not the end of the sweep
        if is_out_of_memory(e):
            row.update(_oom_fields(e))
            if note := _split_note(state.get("splitter"), micro):
                row["message"] = f"{note}; then {row['message']}"
            logger.info("recipe %s ran out of memory: %s", recipe.name, row["message"])
        else:
            row["message"] = f"{type(e).__name__}: {_first_line(str(e))}"
            logger.info("recipe %s failed", recipe.name, exc_info=True)
    finally:
        if "padding" in state:
            row["padding_fraction"] = padding_fraction(state["padding"])
        model_ref = state.get("model_ref")
        if state.get("frozen_note"):
            notes.append(state["frozen_note"])
        state.clear()  # (the exception, and with it the frames holding tensors, is gone by now)
        # A collection, not just dropping references: accelerate's mixed precision leaves the model (and,
        # with a GradScaler, the optimizer) in reference cycles that refcounting never frees.
        _release(device)
        if model_ref is not None and model_ref() is not None:
            logger.warning("recipe %s: its model is still referenced after the row; later rows in this "
                           "process may count it", recipe.name)
    if row["status"] == "ok" and notes:
        row["message"] = "; ".join(notes)
    elif notes and row["status"] != "ok":
        row["message"] = "; ".join([row["message"], *notes[1:]]) if row["message"] else "; ".join(notes)
    if spec.max_memory_bytes is not None:
        row["limit_bytes"] = spec.max_memory_bytes
    row.update(figures)
    return row


def _oom_fields(error: BaseException) -> dict[str, Any]:
    """An out-of-memory error as row fields: status, the bytes asked for, live bytes, the first line."""
    text = str(error)
    return {
        "status": "oom",
        "requested_bytes": getattr(error, "requested_bytes", None) or _requested_from_message(text),
        "oom_live_bytes": getattr(error, "live_bytes", None),
        "message": _first_line(text) or type(error).__name__,
    }


def _measure(recipe, spec, samples, micro, state, on_step) -> tuple[dict[str, Any], bool]:
    profiler = _train(recipe, spec, samples, micro, state, on_step)
    figures = profiler.metrics(prefix="")
    figures["peak_phase"] = profiler.peak_phase
    return figures, profiler.peak_includes_refused


def _train(recipe: Recipe, spec: SweepSpec, samples: list[Sample], micro: int, state: dict[str, Any], on_step) -> Profiler:
    # Imported here: accelerate is only needed when something is trained.
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from tfmem.adapters.accelerate import accumulation_windows, backward_step

    device = spec.torch_device
    # accelerate holds one state per process and refuses an Accelerator whose mixed precision differs
    # from the previous one; each recipe is a fresh start.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(spec.seed)
    model, _ = build_model(spec.model, num_labels=spec.num_labels, **spec.config_overrides)
    state["model"] = model
    state["model_ref"] = weakref.ref(model)
    model = recipe.prepare_model(model)
    state["frozen_note"] = _frozen_note(recipe, model)
    accelerator = Accelerator(**recipe.accelerator_kwargs(device=device))
    defaults = trainer_defaults()
    if recipe.optimizer.name == "adamw":
        optimizer = defaults.optimizer([p for p in model.parameters() if p.requires_grad])
    else:  # adamw-8bit / adafactor: the class and arguments the Trainer builds for the recipe's `optim`
        optimizer = recipe.create_optimizer(model, lr=defaults.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    state.update(model=model, optimizer=optimizer, accelerator=accelerator)
    model.train()
    profiler = Profiler(
        model,
        optimizer,
        device=accelerator.device,
        memory_steps=spec.memory_steps,
        warmup_steps=spec.warmup_steps,
        limit_bytes=spec.max_memory_bytes if accelerator.device.type == "cpu" else None,
        mixed_precision=recipe.mixed_precision,
    )
    state["profiler"] = profiler
    # auto_micro_batch: a micro-batch that runs out of memory is halved and retried (None when off).
    splitter = recipe.micro_batch_splitter(model)
    state["splitter"] = splitter
    pad_to = None if spec.dataset else spec.seq_len
    pad_id = getattr(accelerator.unwrap_model(model).config, "pad_token_id", None) or 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    if recipe.group_by_length:  # each step's window of micro-batches from samples of similar length
        order = group_batches([len(s.input_ids) for s in samples], micro, recipe.gradient_accumulation_steps, seed=spec.seed)
        samples = [samples[i] for batch in order for i in batch]
    state["padding"] = padded = []  # every micro-batch's attention mask, for the row's padding fraction
    for step, step_samples in enumerate(_steps(samples, spec)):
        planned = micro_batches(step_samples, micro, pad_to, pad_id)
        padded += [{"attention_mask": b["attention_mask"]} for b in planned]
        batches = [{k: v.to(accelerator.device) for k, v in b.items()} for b in planned]
        with profiler.step(), recipe.tf32_matmul():  # tf32: on for the step, restored after
            for window in accumulation_windows(batches, accelerator, model):
                profiler.count(window.batch)
                with accelerator.accumulate(model):
                    backward_step(model, window, accelerator, splitter)
                    # As the Trainer: clip (which unscales fp16 gradients first), step, free the gradients.
                    if accelerator.sync_gradients and defaults.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, defaults.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step)
    profiler.close()
    return profiler


def _frozen_note(recipe: Recipe, model) -> str:
    """A note when the recipe froze every encoder layer of this model (only the head then trains)."""
    if recipe.freeze.layers <= 0:
        return ""
    try:
        from tfmem.techniques.architecture import find_backbone

        count = len(find_backbone(model, recipe.modules).layers)
    except Exception:  # noqa: BLE001 - a model the recipe could prepare but we cannot read: no note
        return ""
    if recipe.freeze.layers < count:
        return ""
    return f"froze all {count} layers" + (" and the embeddings" if recipe.freeze.embeddings else "") + ": only the head trains"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-model chatter (the loading bar, the LOAD REPORT of newly initialised
    weights) inside a row: every row loads the model again, and the CLI says it once in its own words."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _steps(samples: list[Sample], spec: SweepSpec) -> list[list[Sample]]:
    """The samples of each optimizer step. With a dataset, the memory window gets the steps holding the
    longest samples: padded length sets the activation size, so that is where a real run peaks. The
    longest step comes last in the window: a step's forward and backward run before its optimizer step,
    so the first step runs without the optimizer's state, which a real run's longest step has (put first,
    its peak missed the state, and 8-bit AdamW or Adafactor showed 1.00x the baseline)."""
    groups = [samples[i : i + spec.batch_size] for i in range(0, len(samples), spec.batch_size)]
    groups = groups[: spec.total_steps()]
    if spec.dataset and spec.memory_steps:
        by_length = sorted(range(len(groups)), key=lambda i: -max(len(s.input_ids) for s in groups[i]))
        first = by_length[: spec.memory_steps][::-1]
        groups = [groups[i] for i in first] + [g for i, g in enumerate(groups) if i not in first]
    return groups


def _split_note(splitter, micro: int) -> str:
    """What auto_micro_batch did, for the row's message ("" when it never split)."""
    if splitter is None or not splitter.events:
        return ""
    parts = splitter.parts
    return f"split each micro-batch of {micro} into {parts} after out-of-memory (same effective batch)"


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


_TRIED = re.compile(r"Tried to allocate ([0-9.]+) (B|KiB|MiB|GiB|TiB)")


def _requested_from_message(message: str) -> int | None:
    """The bytes a CUDA out-of-memory error asked for, read from its message."""
    match = _TRIED.search(message)
    if not match:
        return None
    scale = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[match.group(2)]
    return int(float(match.group(1)) * scale)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
