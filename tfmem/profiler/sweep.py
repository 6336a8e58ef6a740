"""Run a few training steps of one model under each recipe and measure them: the engine of `tfmem profile`.

Three modules, by purpose:

- this one, the sweep: what to profile (`SweepSpec`), the samples every recipe trains on, one row
  per recipe, ratios to the baseline, and each row written to disk at once (see `RowWriter`);
- tfmem/profiler/isolation.py: each row in a fresh process of its own, forked from a server that
  preloaded torch and transformers (why: rows measured in one process were not reproducible);
- tfmem/profiler/row.py: one row, the training loop that process runs (`profile_recipe`), with the
  optimizer and gradient handling a `Trainer` user gets by default (`trainer_defaults`).

Every recipe trains on the same samples with the same effective batch; a recipe that accumulates over
k micro-batches gets micro-batches of batch/k. Failures are results: an out-of-memory (CUDA, the CPU
allocator, or the CPU `max_memory_bytes` limit) gives an `oom` row with the bytes asked for, anything
else an `error` row with its message, and the sweep goes on.

A sweep is one process per row on one device. (Under a multi-process launch, profile each rank's own
loop with `Profiler` or the Trainer callback instead: they report every rank's peak.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tfmem.data import load_tokenizer, model_dataset_stats
from tfmem.errors import is_out_of_memory
from tfmem.profiler.batches import DatasetError, Sample, dataset_samples, synthetic_samples
from tfmem.profiler.isolation import _process_context, _profile_in_child
from tfmem.profiler.output_lock import OutputLocked, output_lock  # noqa: F401 (OutputLocked re-exported)
from tfmem.profiler.report import RowWriter, add_ratios, normalise

# Also imported from here (the CLI, benchmarks, tests): TrainerDefaults, trainer_defaults, profile_recipe,
# quiet_transformers, _steps.
from tfmem.profiler.row import (  # noqa: F401
    TrainerDefaults,
    _not_runnable,
    _oom_fields,
    _row_base,
    _steps,
    profile_recipe,
    quiet_transformers,
    trainer_defaults,
)
from tfmem.recipe import Recipe
from tfmem.techniques.optimizer import trainer_optim
from tfmem.zoo import DEFAULT_MODEL, resolve, seq_len_problem

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
        num_labels: outputs of the classification head; None: the model configuration's own (a folder's
            config.json, which may say regression or more classes; 2 for the known architectures).
        isolate: one fresh process per recipe (see tfmem/profiler/isolation.py); False runs them in this one.
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
    num_labels: int | None = None
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
        OutputLocked: another sweep is writing into `output_dir` (a ValueError).
    """
    if output_dir is None:
        return _run_sweep(spec, None, on_event)
    with output_lock(output_dir):  # two sweeps into one folder would each overwrite the other's rows
        return _run_sweep(spec, output_dir, on_event)


def _run_sweep(spec: SweepSpec, output_dir, on_event: Event | None) -> list[dict[str, Any]]:
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
        # The row names the optimizer it trained with: the Trainer's default unless the recipe chose another.
        optim = trainer_optim(recipe.optimizer) or defaults.optim
        row.update({"model": source.name, "random_weights": source.random_weights, "optimizer": optim,
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


def _samples(spec: SweepSpec, config, source) -> tuple[list[Sample], dict[str, Any]]:
    """The samples every recipe trains on, and the row fields that say where they came from."""
    count = spec.batch_size * spec.total_steps()
    # Labels the head's loss can read: the model's config (its file, or config_overrides) may say regression
    # or multi-label classification (see batches.label_kind).
    problem_type = getattr(config, "problem_type", None)
    num_labels = config.num_labels if spec.num_labels is None else spec.num_labels  # as build_model makes the head
    if spec.dataset is None:
        vocab = getattr(config, "vocab_size", 30522)
        samples = synthetic_samples(count, spec.seq_len, vocab, num_labels, seed=spec.seed, problem_type=problem_type)
        return samples, _data_fields(spec, samples)
    tokenizer = load_tokenizer(spec.model)
    info: dict[str, Any] = {}
    samples = dataset_samples(spec.dataset, tokenizer, count, spec.seq_len, num_labels,
                              batch_size=spec.batch_size, info=info, problem_type=problem_type)
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
