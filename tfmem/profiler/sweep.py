"""Run a few training steps of one model under each recipe and measure them: the engine of `tfmem profile`.

For each recipe, in this process and one after the other:

1. a fresh model (same seed, so every recipe starts from the same weights), `recipe.prepare_model`,
   an `Accelerator` built from `recipe.accelerator_kwargs(device)`, AdamW, `accelerator.prepare`;
2. the loop the accelerate adapter documents (`accumulation_windows`, `accelerator.accumulate`,
   `backward_step` with the recipe's auto_micro_batch splitter), wrapped in a `Profiler`: a memory window, then untimed warm-up, then timed steps;
3. one result row, written to disk at once (see `RowWriter`).

Every recipe trains on the same samples with the same effective batch; a recipe that accumulates over
k micro-batches gets micro-batches of batch/k. Failures are results: an out-of-memory (CUDA, or the CPU
`max_memory_bytes` limit) gives an `oom` row with the bytes asked for, anything else an `error` row with
its message, and the sweep goes on after releasing the memory.

Why in-process rather than a subprocess per recipe: importing torch and transformers takes about 5 s on
our 2-core machines, which alone would spend half the default sweep's budget. The costs of sharing a
process are handled here: accelerate's process-wide `AcceleratorState` is reset before each recipe
(it refuses a second Accelerator with another mixed precision otherwise), and CUDA's peak statistics
are reset per window. What a process cannot undo is resident memory that malloc keeps after an earlier
recipe; `peak_rss_bytes` is therefore a per-window high-water mark that may include it (the tensor
figure, `peak_allocated_bytes`, does not).

A sweep is one process on one device. (Under a multi-process launch, profile each rank's own loop with
`Profiler` or the Trainer callback instead: they report every rank's peak.)
"""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tfmem.data import load_tokenizer, model_dataset_stats, padding_fraction
from tfmem.profiler.batches import DatasetError, Sample, dataset_samples, micro_batches, synthetic_samples
from tfmem.profiler.report import RowWriter, add_ratios, normalise
from tfmem.profiler.session import Profiler
from tfmem.recipe import Recipe
from tfmem.techniques.accumulation import micro_batch_size
from tfmem.techniques.precision import precision_problems
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
        max_memory_bytes: CPU only: a simulated capacity; a recipe above it is an `oom` row.
        seed: for the model's initial weights and the synthetic samples.
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

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive whole number, got {value!r}.")
        for name in ("warmup_steps", "memory_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {value!r}.")
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


Event = Callable[[str, dict[str, Any]], None]


def run_sweep(spec: SweepSpec, output_dir=None, on_event: Event | None = None) -> list[dict[str, Any]]:
    """Profile every recipe of `spec`; write each row to `output_dir` as soon as it is measured.

    Args:
        spec: the sweep.
        output_dir: where `results.json` and `results.csv` go (rewritten atomically after each row).
        on_event: called as `on_event(kind, info)`, kind "start" (info: recipe, index, total, steps),
            "step" (recipe, step) or "row" (the row); for progress displays.

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
    samples = _samples(spec, config, source)
    # The file's own lengths (all rows, before truncation at --seq-len), for the header and results.json.
    dataset = model_dataset_stats(spec.dataset, spec.model, spec.seq_len)[0].to_dict() if spec.dataset else None
    recipes = spec.all_recipes()
    writer = RowWriter(output_dir) if output_dir is not None else None
    limited = spec.max_memory_bytes is not None and device.type == "cuda"
    if limited:
        # A real CUDA limit: the caching allocator refuses to grow this process past the fraction.
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(spec.max_memory_bytes / total, 1.0), device)
    rows: list[dict[str, Any]] = []
    try:
        for index, recipe in enumerate(recipes):
            notify("start", {"recipe": recipe.name, "index": index, "total": len(recipes), "steps": spec.total_steps()})
            row = profile_recipe(recipe, spec, samples, on_step=lambda i, name=recipe.name: notify("step", {"recipe": name, "step": i}))
            row.update({"model": source.name, "random_weights": source.random_weights})
            if dataset is not None:
                row["dataset"] = dataset
            rows.append(normalise(row))
            add_ratios(rows)
            if writer is not None:
                writer.write(rows)
            notify("row", row)
    finally:
        if limited:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return rows


def profile_recipe(
    recipe: Recipe,
    spec: SweepSpec,
    samples: list[Sample],
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train `spec.total_steps()` optimizer steps of a fresh model under `recipe` and measure them.

    Never raises for a failing recipe: returns a row with `status` "ok", "oom" or "error".
    """
    device = spec.torch_device
    row: dict[str, Any] = {
        "recipe": recipe.name,
        "status": "error",
        "message": "",
        "techniques": recipe.summary(),
        "device": str(device),
        "batch_size": spec.batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
        "seq_len": spec.seq_len,
    }
    if problems := precision_problems(recipe.mixed_precision, device):
        row["message"] = "not run: " + " ".join(problems)
        return row
    try:
        micro = micro_batch_size(spec.batch_size, recipe.gradient_accumulation_steps)
    except ValueError as e:
        row["message"] = f"not run: {e}"
        return row
    row["micro_batch_size"] = micro
    state: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    try:
        # Keep only the figures: the profiler holds the model, which must be gone before the next recipe.
        profiler = _train(recipe, spec, samples, micro, state, on_step)
        figures = profiler.metrics(prefix="")
        figures["peak_phase"] = profiler.peak_phase
        row["status"] = "ok"
        if note := _split_note(state.get("splitter"), micro):
            if profiler.peak_includes_refused:
                note += "; every memory step split, so the peak counts the refused allocation (raise --memory-steps)"
            row["message"] = note
    except torch.OutOfMemoryError as e:
        row["status"] = "oom"
        row["requested_bytes"] = getattr(e, "requested_bytes", None) or _requested_from_message(str(e))
        row["oom_live_bytes"] = getattr(e, "live_bytes", None)
        row["message"] = _first_line(str(e))
        if note := _split_note(state.get("splitter"), micro):
            row["message"] = f"{note}; then {row['message']}"
        logger.info("recipe %s ran out of memory: %s", recipe.name, row["message"])
    except Exception as e:  # a recipe that fails is a row, not the end of the sweep
        row["message"] = f"{type(e).__name__}: {_first_line(str(e))}"
        logger.info("recipe %s failed", recipe.name, exc_info=True)
    finally:
        if "padding" in state:
            row["padding_fraction"] = padding_fraction(state["padding"])
        state.clear()  # (the exception, and with it the frames holding tensors, is gone by now)
        _release(device)
    if spec.max_memory_bytes is not None:
        row["limit_bytes"] = spec.max_memory_bytes
    row.update(figures)
    return row


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
    model = recipe.prepare_model(model)
    accelerator = Accelerator(**recipe.accelerator_kwargs(device=device))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
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
    state["padding"] = padded = []  # every micro-batch's attention mask, for the row's padding fraction
    for step, step_samples in enumerate(_steps(samples, spec)):
        planned = micro_batches(step_samples, micro, pad_to, pad_id)
        padded += [{"attention_mask": b["attention_mask"]} for b in planned]
        batches = [{k: v.to(accelerator.device) for k, v in b.items()} for b in planned]
        with profiler.step():
            for window in accumulation_windows(batches, accelerator, model):
                profiler.count(window.batch)
                with accelerator.accumulate(model):
                    backward_step(model, window, accelerator, splitter)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step)
    profiler.close()
    return profiler


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


def _samples(spec: SweepSpec, config, source) -> list[Sample]:
    count = spec.batch_size * spec.total_steps()
    if spec.dataset is None:
        vocab = getattr(config, "vocab_size", 30522)
        return synthetic_samples(count, spec.seq_len, vocab, spec.num_labels, seed=spec.seed)
    tokenizer = load_tokenizer(spec.model)
    return dataset_samples(spec.dataset, tokenizer, count, spec.seq_len, spec.num_labels)


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
