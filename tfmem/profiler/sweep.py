"""Run a few training steps of one model under each recipe and measure them: the engine of `tfmem profile`.

For each recipe, in a fresh process of its own (see "Isolation" below):

1. a fresh model (same seed, so every recipe starts from the same weights), `recipe.prepare_model`,
   an `Accelerator` built from `recipe.accelerator_kwargs(device)`, and the optimizer a `Trainer` user
   gets by default (`trainer_defaults()`: transformers 5 builds AdamW with `fused=True`), `accelerator.prepare`;
2. the loop the accelerate adapter documents (`accumulation_windows`, `accelerator.accumulate`,
   `backward_step` with the recipe's auto_micro_batch splitter), with the Trainer's default gradient
   clipping and gradients set to None after each optimizer step (as `model.zero_grad()` in the Trainer),
   wrapped in a `Profiler`: a memory window, then untimed warm-up, then timed steps;
3. one result row, written to disk at once (see `RowWriter`).

Every recipe trains on the same samples with the same effective batch; a recipe that accumulates over
k micro-batches gets micro-batches of batch/k. Failures are results: an out-of-memory (CUDA, the CPU
allocator, or the CPU `max_memory_bytes` limit) gives an `oom` row with the bytes asked for, anything
else an `error` row with its message, and the sweep goes on.

Isolation: one process per recipe. Rows measured one after the other in one process were not
reproducible on a GPU (bert-base 32x512 on an H200: `low-memory` peaked at 3.61 GB after the fp16
row and 2.28 GB after the baseline). The cause: accelerate's mixed precision makes reference cycles
(`model._original_forward` is a bound method of the model; with a GradScaler the optimizer's patched
`step` refers back to the optimizer), so a bf16/fp16 row's model, and an fp16 row's optimizer state,
outlived the row until Python's cyclic collector happened to run, which depended on how many Python
objects the process had made (the CLI's progress display, `--steps`, the order of the recipes). An
in-process sweep can collect them (`profile_recipe` does), but it cannot undo everything else a row
leaves in a process: allocator caches and fragmentation, library workspaces, autocast and compile
caches, malloc arenas in `peak_rss_bytes`, accelerate's process-wide state, a CUDA memory fraction. A
fresh process per recipe leaves nothing to undo, and it also makes out-of-memory recovery (even the
kernel's OOM killer: the row says the process died) and `--max-memory` on CUDA clean. The price is the
start of a process: a `forkserver` that imports torch, transformers and accelerate once (a few seconds,
overlapped with preparing the samples) forks each row's process in milliseconds, and the process
builds its model as an in-process row would. `SweepSpec(isolate=False)` keeps the old in-process loop
for debugging (and for tests that patch this module).

A sweep is one process per row on one device. (Under a multi-process launch, profile each rank's own
loop with `Profiler` or the Trainer callback instead: they report every rank's peak.)
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import re
import signal
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tfmem.data import load_tokenizer, model_dataset_stats, padding_fraction
from tfmem.errors import is_out_of_memory
from tfmem.profiler.batches import DatasetError, Sample, dataset_samples, micro_batches, synthetic_samples
from tfmem.profiler.report import RowWriter, add_ratios, normalise
from tfmem.profiler.session import Profiler
from tfmem.recipe import Recipe
from tfmem.techniques.accumulation import micro_batch_size
from tfmem.techniques.grouping import group_batches
from tfmem.techniques.optimizer import optimizer_problems
from tfmem.techniques.precision import precision_problems
from tfmem.techniques.tf32 import tf32_problems
from tfmem.zoo import DEFAULT_MODEL, build_model, resolve, seq_len_problem

logger = logging.getLogger(__name__)

BASELINE = Recipe.from_dict({"name": "baseline", "description": "no memory techniques: the reference for ratios"})


@dataclass(frozen=True)
class SweepSpec:
    """What to profile, and how.

    Args:
        model: a known architecture name or a local Hugging Face model directory.
        recipes: the recipes to compare (the baseline is added first when `include_baseline`).
        batch_size: the effective batch per optimizer step, the same for every recipe.
        seq_len: tokens per sample at most (synthetic samples use between half and all of it).
        steps: timed optimizer steps per recipe.
        warmup_steps: untimed steps before them.
        memory_steps: steps in the memory window (on CPU run before, and apart from, the timed ones). At
            least 2 to see the usual peak: the first step's forward runs before the optimizer state exists.
        device: "cpu", "cuda", "cuda:1", ...; None picks CUDA when present.
        dataset: a local csv/json/parquet file to draw samples from instead of synthetic ones.
        max_memory_bytes: a memory limit; a recipe above it is an `oom` row (CPU: simulated on live
            tensor bytes; CUDA: the process's share of the GPU).
        seed: for the model's initial weights and the synthetic samples.
        threads: PyTorch CPU threads for each row (None: PyTorch's default).
        isolate: one fresh process per recipe (see the module's "Isolation"); False runs them in this one.
    """

    model: str = DEFAULT_MODEL
    recipes: tuple[Recipe, ...] = ()
    batch_size: int = 16
    seq_len: int = 128
    steps: int = 3
    warmup_steps: int = 1
    memory_steps: int = 2
    device: str | None = None
    dataset: str | None = None
    max_memory_bytes: int | None = None
    seed: int = 0
    include_baseline: bool = True
    num_labels: int = 2
    config_overrides: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    isolate: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive whole number, got {value!r}.")
        for name in ("warmup_steps", "memory_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {value!r}.")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"--threads must be a positive whole number, got {self.threads!r}.")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"--device {self.device!r} is not a device; use cpu, cuda or cuda:N.") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"--device {self.device!r} but no CUDA GPU is visible to PyTorch; use --device cpu.")
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"--device {self.device!r}: tfmem profiles on cpu or cuda devices only.")
        # Known before anything trains, so refused up front rather than reported as a row that did not run.
        for recipe in self.recipes:
            steps = recipe.gradient_accumulation_steps
            if self.batch_size % steps:
                lower = self.batch_size - self.batch_size % steps
                raise ValueError(
                    f"--batch-size {self.batch_size} does not divide by the {steps} accumulation steps of recipe "
                    f"{recipe.name!r} (every recipe trains the same effective batch); use --batch-size "
                    f"{max(lower, steps)} or {lower + steps}, or leave that recipe out."
                )

    def check_model(self, config, model_name: str) -> None:
        """Refuse a model that cannot run at this `seq_len` (positions past its table fail in the first step).

        Raises:
            ValueError: `seq_len` is longer than the model holds; the message names --seq-len and the limit.
        """
        for key, value in self.config_overrides.items():
            setattr(config, key, value)
        if problem := seq_len_problem(config, self.seq_len, model_name, field="--seq-len"):
            raise ValueError(problem)

    @property
    def torch_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def all_recipes(self) -> list[Recipe]:
        recipes = list(self.recipes)
        if self.include_baseline and not any(r.name == BASELINE.name for r in recipes):
            recipes.insert(0, BASELINE)
        return recipes

    def total_steps(self) -> int:
        """Optimizer steps each recipe runs: on CPU the memory window comes before the timed steps."""
        timed = self.warmup_steps + self.steps
        if self.torch_device.type == "cuda":
            return max(timed, self.memory_steps)
        return self.memory_steps + timed


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


Event = Callable[[str, dict[str, Any]], None]


def run_sweep(spec: SweepSpec, output_dir=None, on_event: Event | None = None) -> list[dict[str, Any]]:
    """Profile every recipe of `spec`; write each row to `output_dir` as soon as it is measured.

    Args:
        spec: the sweep.
        output_dir: where `results.json` and `results.csv` go (rewritten atomically after each row).
        on_event: called as `on_event(kind, info)`, kind "start" (info: recipe, index, total, steps),
            "step" (recipe, step) or "row" (the row, with index and total); for progress displays.

    Returns:
        the rows, one per recipe, baseline first, with ratios to the baseline; every row has every
        key of `report.CSV_COLUMNS` (None where it has no value).

    Raises:
        ValueError: the model or dataset cannot be used, or `seq_len` is longer than the model holds
            (before anything runs).
    """
    notify = on_event or (lambda kind, info: None)
    device = spec.torch_device
    config, source = resolve(spec.model)
    spec.check_model(config, source.name)
    recipes = spec.all_recipes()
    samples, data, failure = [], _data_fields(spec, None), _too_large(spec)
    if failure is None:
        if spec.isolate:
            _process_context()  # start the fork server now: it imports torch while the samples are made
        try:
            samples, data = _samples(spec, config, source)
        except DatasetError:
            raise
        except Exception as e:  # an effective batch too large to even hold its token ids
            if not is_out_of_memory(e):
                raise
            failure = _oom_fields(e)
    # The file's own lengths (all rows, before truncation at --seq-len), for the header and results.json.
    dataset = model_dataset_stats(spec.dataset, spec.model, spec.seq_len)[0].to_dict() if spec.dataset else None
    writer = RowWriter(output_dir) if output_dir is not None else None
    defaults = trainer_defaults()
    rows: list[dict[str, Any]] = []
    for index, recipe in enumerate(recipes):
        notify("start", {"recipe": recipe.name, "index": index, "total": len(recipes), "steps": spec.total_steps()})

        def on_step(i: int, name: str = recipe.name) -> None:
            notify("step", {"recipe": name, "step": i})

        if reason := _not_runnable(recipe, spec):
            row = {**_row_base(recipe, spec), "message": f"not run: {reason}"}
        elif failure is not None:
            row = {**_row_base(recipe, spec), **failure}
        elif spec.isolate:
            row = _profile_in_child(recipe, spec, samples, on_step)
        else:
            with _threads(spec.threads):
                row = profile_recipe(recipe, spec, samples, on_step=on_step)
        row.update({"model": source.name, "random_weights": source.random_weights, "optimizer": defaults.optim,
                    "cpu_threads": (spec.threads or torch.get_num_threads()) if device.type == "cpu" else None, **data})
        if dataset is not None:
            row["dataset"] = dataset
        rows.append(normalise(row))
        add_ratios(rows)
        if writer is not None:
            writer.write(rows)
        notify("row", {**rows[-1], "index": index, "total": len(recipes)})
    return rows


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """PyTorch's CPU threads set to `count` (None: unchanged) for an in-process row, restored after."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _too_large(spec: SweepSpec) -> dict[str, Any] | None:
    """`oom` row fields when the samples' token ids alone would take more than half of this machine's
    memory (`--batch-size 100000000`): making them would fail deep in the allocator, or take hours first."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): let the allocator decide
        return None
    count = spec.batch_size * spec.total_steps()
    needed = count * spec.seq_len * torch.tensor([], dtype=torch.long).element_size()
    if needed <= memory // 2:
        return None
    from tfmem.profiler.units import format_bytes

    return {"status": "oom", "requested_bytes": needed,
            "message": f"the token ids of {count:,} samples ({spec.total_steps()} steps of --batch-size "
                       f"{spec.batch_size:,}) alone need {format_bytes(needed)}, more than half of this machine's "
                       f"memory ({format_bytes(memory)}); not run"}


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
    row built is released before it returns, reference cycles included (see the module's "Isolation").
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


# -- one process per recipe ---------------------------------------------------------------------------

# What the fork server imports once, so that each row's process starts with them loaded.
_PRELOAD = ["torch", "transformers", "accelerate", "transformers.training_args", "transformers.models.bert.modeling_bert",
            "tfmem.profiler.sweep", "tfmem.adapters.accelerate"]


def _process_context():
    """A `forkserver` context (spawn where there is none): each row's process is forked from a server
    that imported torch and transformers once and never touched CUDA, so CUDA is initialised fresh in
    every row. Plain `fork` of this process would be faster still, but forking after CUDA or OpenMP
    threads have started is unsafe."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Only effective before the server starts (the first row of the process's first sweep).
    context.set_forkserver_preload(_PRELOAD)
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return context


def _profile_in_child(recipe: Recipe, spec: SweepSpec, samples: list[Sample], on_step: Callable[[int], None]) -> dict[str, Any]:
    """`profile_recipe` in a fresh process; its step events come back through a pipe, then its row."""
    context = _process_context()
    receiver, sender = context.Pipe(duplex=False)
    plain = [(s.input_ids.tolist(), s.label) for s in samples]  # plain data: no tensor sharing to set up
    # The row logs as this process would: the CLI's logging set-up (WARNING, or INFO with -v) is not
    # inherited by a forked-from-the-server process, and without it every row would print apply's summary.
    root = logging.getLogger()
    setup = (root.level, [h.formatter._fmt for h in root.handlers if h.formatter is not None][:1]) if root.handlers else None
    process = context.Process(target=_child_main, args=(sender, recipe, spec, plain, setup),
                              name=f"tfmem-profile-{recipe.name}", daemon=True)
    process.start()
    sender.close()  # the child holds the only writing end: EOF when it dies
    row = None
    try:
        while row is None:
            try:
                kind, info = receiver.recv()
            except EOFError:
                break
            if kind == "step":
                on_step(info)
            else:
                row = info
    finally:
        receiver.close()
        process.join(timeout=60 if row is not None else 5)
        if process.is_alive():  # interrupted, or a child that hangs on its way out
            process.kill()
            process.join()
    if row is None:
        row = _row_base(recipe, spec)
        row["message"] = _death_message(process.exitcode)
    return row


def _death_message(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        why = " (the system's out-of-memory killer sends it)" if -exitcode == signal.SIGKILL else ""
        return f"the recipe's process was killed by {name}{why} before it reported a row"
    return (f"the recipe's process exited with code {exitcode} before it reported a row (a script that runs a "
            "sweep must keep its top-level code under `if __name__ == \"__main__\":`, which multiprocessing re-imports "
            "in each row's process; or use SweepSpec(isolate=False))")


def _child_main(sender, recipe: Recipe, spec: SweepSpec, plain: list[tuple[list[int], int]], setup=None) -> None:
    """The body of a row's process: profile one recipe, send step events and the row, exit."""
    try:
        if setup is not None:
            level, formats = setup
            logging.basicConfig(level=level, **({"format": formats[0]} if formats else {}))
        if spec.threads:
            torch.set_num_threads(spec.threads)
        device = spec.torch_device
        if spec.max_memory_bytes is not None and device.type == "cuda":
            # A real CUDA limit: the caching allocator refuses to grow this process past the fraction.
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(spec.max_memory_bytes / total, 1.0), device)
        samples = [Sample(torch.tensor(ids, dtype=torch.long), label) for ids, label in plain]
        row = profile_recipe(recipe, spec, samples, on_step=lambda i: sender.send(("step", i)))
    except BaseException as e:  # noqa: BLE001 - whatever happens, the parent gets a row
        row = _row_base(recipe, spec)
        row["message"] = f"{type(e).__name__}: {_first_line(str(e))}"
    try:
        sender.send(("row", row))
    finally:
        sender.close()


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
    longest samples: padded length sets the activation size, so that is where a real run peaks."""
    groups = [samples[i : i + spec.batch_size] for i in range(0, len(samples), spec.batch_size)]
    groups = groups[: spec.total_steps()]
    if spec.dataset and spec.memory_steps:
        by_length = sorted(range(len(groups)), key=lambda i: -max(len(s.input_ids) for s in groups[i]))
        first = by_length[: spec.memory_steps]
        groups = [groups[i] for i in first] + [g for i, g in enumerate(groups) if i not in first]
    return groups


def _samples(spec: SweepSpec, config, source) -> tuple[list[Sample], dict[str, Any]]:
    """The samples every recipe trains on, and the row fields that say where they came from."""
    count = spec.batch_size * spec.total_steps()
    if spec.dataset is None:
        vocab = getattr(config, "vocab_size", 30522)
        samples = synthetic_samples(count, spec.seq_len, vocab, spec.num_labels, seed=spec.seed)
        return samples, _data_fields(spec, samples)
    tokenizer = load_tokenizer(spec.model)
    info: dict[str, Any] = {}
    samples = dataset_samples(spec.dataset, tokenizer, count, spec.seq_len, spec.num_labels,
                              batch_size=spec.batch_size, info=info)
    return samples, _data_fields(spec, samples, info.get("rows"))


def _data_fields(spec: SweepSpec, samples: list[Sample] | None, rows: int | None = None) -> dict[str, Any]:
    """Row fields for how sequences were cut and padded (the file itself is in the row's `dataset`).

    With a dataset, `seq_len` is the longest sample after truncation (what the longest micro-batch is
    padded to) and `max_seq_len` the truncation limit; synthetic samples are all padded to `seq_len`.
    """
    if spec.dataset is None:
        return {"max_seq_len": spec.seq_len, "padding": "fixed: every sample padded to seq_len"}
    longest = max((len(s.input_ids) for s in samples), default=None) if samples else None
    return {"seq_len": longest, "max_seq_len": spec.seq_len,
            "padding": "dynamic: each micro-batch padded to its longest sample"}


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
