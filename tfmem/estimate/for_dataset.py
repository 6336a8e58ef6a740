"""Estimate and plan for a real dataset: the longest padded batch that training on it will meet.

What is assumed, and said with every answer (`assumption`):

- Dynamic padding, as `tfmem profile --dataset` and `DataCollatorWithPadding` do it: each micro-batch is
  padded to its longest row, after the rows are truncated at `truncate_at` (--seq-len, else the
  model's limit).
- Memory peaks on the widest micro-batch, and in any order of the rows (the file's, shuffled, or
  grouped by length) one micro-batch of an epoch holds the longest row: the estimate is for
  micro-batch x longest row, so it holds for every order. Order changes only the padding waste, which
  is reported for each (`tfmem.data.Padding`).
- Truncating at the p99 length cuts at most 1% of the rows. Where that makes the step fit a budget it
  did not (or, for a plan, changes the recipe chosen), the answer says so: `p99_note`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tfmem.data import DatasetStats, Padding, model_dataset_stats
from tfmem.estimate.device import DeviceProfile, device_profile
from tfmem.estimate.estimator import MemoryEstimate, estimate_memory, model_config_of
from tfmem.profiler.units import format_bytes
from tfmem.recipe import Recipe
from tfmem.techniques.accumulation import micro_batch_size
from tfmem.zoo import max_seq_len, seq_len_problem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetShape:
    """The lengths training will meet on one dataset, for one micro-batch size.

    Attributes:
        stats: the file's token lengths (before truncation).
        truncate_at: rows are cut to this many tokens.
        padding: padding waste per order, and the longest padded length (`padding.longest_tokens`).
        p99_tokens: the p99 length, truncated at `truncate_at`.
        rows_over_p99: rows longer than it (what truncating there would cut).
    """

    stats: DatasetStats
    truncate_at: int
    padding: Padding
    p99_tokens: int
    rows_over_p99: int

    @property
    def seq_len(self) -> int:
        """The padded length the peak is estimated for: the longest (truncated) row."""
        return self.padding.longest_tokens

    def assumption(self) -> str:
        f = self.padding.fraction_by_order
        return (f"dynamic padding: each micro-batch padded to its longest row, rows truncated at {self.truncate_at} "
                f"tokens; in any order some micro-batch of an epoch holds the longest row, so the peak is for "
                f"micro-batch {self.padding.micro_batch_size} x {self.seq_len} tokens. Padding waste over an epoch: "
                f"{f['file']:.0%} in file order, {f['random']:.0%} shuffled, {f['sorted']:.0%} grouped by length")

    def to_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.to_dict(), "truncate_at": self.truncate_at, "padding": self.padding.to_dict(),
                "seq_len": self.seq_len, "p99_tokens": self.p99_tokens,
                "rows_over_p99": self.rows_over_p99, "assumption": self.assumption()}


def dataset_shape(path: str | Path, model: str, micro_batch: int, truncate_at: int | None = None, *,
                  config=None, model_name: str | None = None) -> DatasetShape:
    """Tokenize `path` with `model`'s tokenizer and describe the batches of `micro_batch` rows.

    Raises:
        ValueError: `truncate_at` longer than the model holds; a DatasetError for an unusable file.
    """
    if config is not None:
        limit = max_seq_len(config)
        if truncate_at is not None and (problem := seq_len_problem(config, truncate_at, model_name or model, field="--seq-len")):
            raise ValueError(problem)
        truncate_at = truncate_at or limit
    stats, lengths = model_dataset_stats(path, model, truncate_at)
    truncate_at = truncate_at or stats.max_tokens
    padding = Padding.of(lengths, micro_batch, truncate_at)
    p99 = min(stats.p99_tokens, truncate_at)
    return DatasetShape(stats, truncate_at, padding, p99, sum(n > p99 for n in lengths))


@dataclass(frozen=True)
class DatasetEstimate:
    """An estimate for the longest padded batch of a dataset, and what truncating at p99 would change.

    Attributes:
        shape: the dataset's lengths and padding.
        estimate: the estimate for micro-batch x `shape.seq_len`.
        p99_estimate: the same at the p99 length; None when that is the longest length already.
        budget_bytes: what must fit (given, or the --gpu's memory); None when unknown.
        overhead_bytes: memory outside PyTorch's allocator counted against the budget (CUDA context).
    """

    shape: DatasetShape
    estimate: MemoryEstimate
    p99_estimate: MemoryEstimate | None
    budget_bytes: int | None
    overhead_bytes: int

    def needed_bytes(self, est: MemoryEstimate) -> int:
        """What must fit in the budget: reserved bytes (CUDA) or the peak (CPU), plus the overhead."""
        return (est.reserved_bytes if est.reserved_bytes is not None else est.peak_bytes) + self.overhead_bytes

    def fits(self, est: MemoryEstimate) -> bool | None:
        return None if self.budget_bytes is None else self.needed_bytes(est) <= self.budget_bytes

    def p99_note(self) -> str | None:
        """One sentence on truncating at p99, or None when it changes nothing."""
        if self.p99_estimate is None:
            return None
        s, full, p99 = self.shape, self.estimate, self.p99_estimate
        saving = 1 - p99.peak_bytes / full.peak_bytes if full.peak_bytes else 0.0
        line = (f"truncating at the p99 length ({s.p99_tokens} tokens, {s.rows_over_p99} of {s.stats.rows} rows cut) "
                f"gives a peak of {format_bytes(p99.peak_bytes)} instead of {format_bytes(full.peak_bytes)} ({saving:.0%} less)")
        fits_full, fits_p99 = self.fits(full), self.fits(p99)
        if fits_full is False and fits_p99:
            return (f"Does not fit in {format_bytes(self.budget_bytes)} at the longest row, but fits truncated at p99: "
                    f"{line} (e.g. tokenizer(..., truncation=True, max_length={s.p99_tokens})).")
        return line[0].upper() + line[1:] + "."

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.estimate.to_dict(),
            "dataset": self.shape.to_dict(),
            "budget_bytes": self.budget_bytes,
            "fits": self.fits(self.estimate),
            "p99_estimate": self.p99_estimate.to_dict() if self.p99_estimate else None,
            "p99_fits": self.fits(self.p99_estimate) if self.p99_estimate else None,
            "p99_note": self.p99_note(),
        }


def estimate_for_dataset(
    model: str,
    recipe: Recipe | str | None,
    batch_size: int,
    dataset: str | Path,
    device: DeviceProfile | str = "cuda",
    *,
    truncate_at: int | None = None,
    budget_bytes: int | None = None,
    overhead_bytes: int | None = None,
    num_labels: int | None = None,
) -> DatasetEstimate:
    """Estimate a training step on `dataset` at its longest padded batch (see the module docstring).

    Args:
        model: a model directory or a name with a tokenizer (all-MiniLM-L6-v2, ...).
        recipe, batch_size, device, num_labels: as for `estimate_memory`.
        dataset: a .csv/.json/.jsonl/.parquet file with a text column.
        truncate_at: the tokenizer's max_length in training; default the model's limit.
        budget_bytes: memory available; default the device's memory when known.
        overhead_bytes: memory outside PyTorch's allocator; default 0.5 GiB on CUDA, 0 on CPU.

    Raises:
        ValueError: as `estimate_memory`; a DatasetError (a ValueError) for an unusable file.
        RecipeError: as `estimate_memory`.
    """
    from tfmem.estimate.estimator import _recipe
    from tfmem.estimate.plan import CUDA_OVERHEAD_BYTES

    profile = device if isinstance(device, DeviceProfile) else device_profile(device)
    config, _, name = model_config_of(model, num_labels)
    recipe = _recipe(recipe)
    micro = micro_batch_size(batch_size, recipe.gradient_accumulation_steps)
    shape = dataset_shape(dataset, model, micro, truncate_at, config=config, model_name=name)
    est = estimate_memory(model, recipe, batch_size, shape.seq_len, profile, num_labels=num_labels)
    p99 = None
    if shape.p99_tokens < shape.seq_len:
        p99 = estimate_memory(model, recipe, batch_size, shape.p99_tokens, profile, num_labels=num_labels)
    if overhead_bytes is None:
        overhead_bytes = CUDA_OVERHEAD_BYTES if profile.type == "cuda" else 0
    return DatasetEstimate(shape, est, p99, budget_bytes if budget_bytes is not None else profile.memory_bytes,
                           overhead_bytes)


@dataclass(frozen=True)
class DatasetPlan:
    """A plan for the longest padded batch of a dataset, and the plan truncating at p99 would give."""

    shape: DatasetShape
    plan: Any            # tfmem.estimate.plan.Plan
    p99_plan: Any | None  # the same at the p99 length; None when that is the longest length already

    def p99_note(self) -> str | None:
        """One sentence when truncating at p99 changes the recipe chosen (or makes one fit), else None."""
        if self.p99_plan is None:
            return None
        full, p99 = self.plan.chosen, self.p99_plan.chosen
        t = self.shape.p99_tokens
        if p99 is None:
            return None
        if full is None:
            return (f"Nothing fits at the longest row ({self.shape.seq_len} tokens), but truncated at the p99 length "
                    f"({t} tokens, max_length={t}) {p99.recipe.summary()} fits (micro-batch {p99.estimate.micro_batch_size}).")
        if full.recipe.summary() != p99.recipe.summary() or full.estimate.micro_batch_size != p99.estimate.micro_batch_size:
            return (f"Truncated at the p99 length ({t} tokens, max_length={t}) the plan would be {p99.recipe.summary()} "
                    f"(micro-batch {p99.estimate.micro_batch_size}, time {p99.relative_time:.2f} vs {full.relative_time:.2f}) "
                    f"instead of {full.recipe.summary()}.")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan.to_dict(), "dataset": self.shape.to_dict(),
                "p99_chosen": self.p99_plan.chosen.to_dict() if self.p99_plan and self.p99_plan.chosen else None,
                "p99_note": self.p99_note()}


def plan_for_dataset(model: str, batch_size: int, dataset: str | Path, budget_bytes: int,
                     device: DeviceProfile | str = "cuda", *, truncate_at: int | None = None, num_labels: int | None = None,
                     **plan_kwargs: Any) -> DatasetPlan:
    """`plan` for `dataset`'s longest padded batch, and again at its p99 length (see the module docstring).

    The padding reported is for the micro-batch of the chosen recipe (the full batch when none fits).
    """
    from tfmem.estimate.plan import plan

    config, _, name = model_config_of(model, num_labels)
    # The longest row does not depend on the micro-batch: find it once, then the padding of the choice.
    shape = dataset_shape(dataset, model, batch_size, truncate_at, config=config, model_name=name)
    full = plan(model, batch_size, shape.seq_len, budget_bytes, device, num_labels=num_labels, **plan_kwargs)
    p99 = None
    if shape.p99_tokens < shape.seq_len:
        p99 = plan(model, batch_size, shape.p99_tokens, budget_bytes, device, num_labels=num_labels, **plan_kwargs)
    if full.chosen is not None and full.chosen.estimate.micro_batch_size != batch_size:
        shape = replace(shape, padding=dataset_shape(dataset, model, full.chosen.estimate.micro_batch_size,
                                                     shape.truncate_at).padding)
    return DatasetPlan(shape, full, p99)
