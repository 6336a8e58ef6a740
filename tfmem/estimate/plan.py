"""`plan`: the fastest recipe whose predicted peak fits a memory budget, keeping the effective batch.

Search space, per target device:

- gradient accumulation: every divisor of the batch size (micro-batch = batch / steps);
- gradient checkpointing: off / on;
- mixed precision: fp32 and the 16-bit mode the device runs natively (bf16 on capability 8.0+, else
  fp16; fp16 and bf16 need the same memory, so one is searched);
- tf32 (fp32 weights, TF32 matmuls) on capability 8.0+, once `Recipe` has the `tf32` key (issue 8);
  it needs fp32's memory, so it reuses fp32's estimates;
- freezing: only with `allow_freeze=N` (it changes what is learned): the embeddings and the first N layers.
- optimizer: only with `allow_optimizer=("adamw-8bit", "adafactor")` (they change what is learned): their
  smaller state (see estimate/optimizer_state.py); the speed model counts their step as AdamW's.

`search_space` lists these combinations (search.py: the one search `tfmem plan --gpus N` runs too); every
(combination, accumulation) is tried in order of predicted speed and a combination's first fit is kept. Estimates use the depth extrapolation
(estimator.py), a few shallow fake steps each; a chosen recipe whose headroom is within the
extrapolation's error margin (`verify_margin`) is then estimated at full depth, and if that does not
fit, the same techniques with more accumulation and the other combinations compete again. Speed comes from `speed.SpeedModel` (see its docstring): a step time per precision with a
kernel-launch floor for small micro-batches, fitted to an H200. Ranking: recipes that freeze nothing
first (freezing changes what is learned), then those that keep AdamW, then fastest, then fewest
micro-batches.

What "fits" means: on CUDA, the simulated reserved bytes (the allocator's cache included) plus
`overhead_bytes` (the CUDA context and library workspaces, outside PyTorch's allocator: 0.5 GiB by
default) are at most the budget. On CPU, the live tensor peak is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tfmem.estimate import speed as _speed
from tfmem.estimate.device import DeviceProfile, device_profile
from tfmem.estimate.estimator import MemoryEstimate, estimate_memory, model_config_of
from tfmem.estimate.fake_step import num_layers_of
from tfmem.estimate.search import (  # noqa: F401  (SearchPoint, search_space: imported from here too)
    SearchPoint,
    SearchStep,
    accumulation_options,
    best_first,
    describe_candidate,
    lighter_optimizers,
    needed_bytes,
    planner_recipe,
    search_space,
    speed_order,
)
from tfmem.estimate.speed import ModelShape, SpeedModel
from tfmem.recipe import Recipe

_lighter_optimizers = lighter_optimizers  # the name this module used before the search moved to search.py

logger = logging.getLogger(__name__)

CUDA_OVERHEAD_BYTES = 512 * 2**20
# The depth extrapolation's peak matched full-depth fake steps to 0.15% on ~40 configurations, and its
# reserved figure to ~110 MiB (bert-base and bert-large at 512 tokens); a recipe that fits by more than
# this is chosen without the full-depth step (about 1.4 s for bert-large), one that fits by less is
# re-estimated at full depth first.
VERIFY_MARGIN_BYTES = 256 * 2**20


def verify_margin(needed_bytes: int) -> int:
    """Headroom below which the chosen recipe is confirmed by a full-depth estimate."""
    return max(VERIFY_MARGIN_BYTES, needed_bytes // 20)
SPEED_NOTE = (_speed.__doc__ or "").strip().splitlines()[0]


@dataclass(frozen=True)
class Candidate:
    """One recipe the planner estimated.

    Attributes:
        recipe: the recipe (batch_size / recipe.gradient_accumulation_steps is the micro-batch).
        estimate: its memory estimate.
        needed_bytes: what must fit in the budget (reserved + overhead on CUDA, peak on CPU).
        headroom_bytes: budget - needed_bytes (negative: does not fit).
        relative_time: estimated time per sample, 1.0 = fp32 without techniques.
        tf32: fp32 with TF32 matmuls (see `search_space`).
        step_seconds: predicted seconds per optimizer step (CUDA only; see speed.py for what it rests on).
    """

    recipe: Recipe
    estimate: MemoryEstimate
    needed_bytes: int
    headroom_bytes: int
    relative_time: float
    tf32: bool = False
    step_seconds: float | None = None
    point: SearchPoint | None = field(default=None, compare=False, repr=False)

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.to_dict(),
            "summary": self.recipe.summary(),
            "micro_batch_size": self.estimate.micro_batch_size,
            "peak_bytes": self.estimate.peak_bytes,
            "reserved_bytes": self.estimate.reserved_bytes,
            "needed_bytes": self.needed_bytes,
            "headroom_bytes": self.headroom_bytes,
            "relative_time": round(self.relative_time, 4),
            "peak_phase": self.estimate.peak_phase,
            "tf32": self.tf32,
            "step_seconds": None if self.step_seconds is None else round(self.step_seconds, 4),
            "fits": self.fits,
        }


@dataclass(frozen=True)
class Plan:
    """The planner's answer.

    Attributes:
        fitting: recipes that fit, best first (see the module docstring for the order).
        not_fitting: for each combination tried without a fit, its lowest-memory try; and any recipe that
            fitted by extrapolation but not at full depth.
        chosen: the best fitting recipe (confirmed at full depth when its headroom is small); None if nothing fits.
        chosen_estimate: its estimate (`method` says whether it is full-depth or extrapolated).
        closest: when nothing fits, the candidate needing the least memory.
    """

    model: str
    batch_size: int
    seq_len: int
    budget_bytes: int
    overhead_bytes: int
    device: str
    fitting: list[Candidate]
    not_fitting: list[Candidate]
    chosen: Candidate | None
    chosen_estimate: MemoryEstimate | None
    closest: Candidate | None
    estimates_run: int
    seconds: float
    speed_note: str = field(default=SPEED_NOTE)
    padded: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "budget_bytes": self.budget_bytes,
            "overhead_bytes": self.overhead_bytes,
            "device": self.device,
            "fitting": [c.to_dict() for c in self.fitting],
            "not_fitting": [c.to_dict() for c in self.not_fitting],
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "chosen_estimate": self.chosen_estimate.to_dict() if self.chosen_estimate else None,
            "closest": self.closest.to_dict() if self.closest else None,
            "estimates_run": self.estimates_run,
            "seconds": round(self.seconds, 2),
            "speed_note": self.speed_note,
            "padded": self.padded,
        }


def plan(
    model_or_config: Any,
    batch_size: int,
    seq_len: int,
    budget_bytes: int,
    device: DeviceProfile | str = "cuda",
    *,
    gpu: str | None = None,
    allow_freeze: int = 0,
    allow_optimizer: Sequence[str] = (),
    overhead_bytes: int | None = None,
    speed: SpeedModel | None = None,
    verify: bool = True,
    keep: int = 1,
    num_labels: int | None = None,
    padded: bool = True,
    progress: Callable[[SearchStep], None] | None = None,
) -> Plan:
    """Find the fastest recipe that trains `batch_size` x `seq_len` within `budget_bytes`.

    Args:
        model_or_config: as for `estimate_memory`.
        batch_size: the effective batch every recipe keeps.
        seq_len: tokens per sample.
        budget_bytes: device memory available (for a whole card: its memory; `overhead_bytes` is taken off).
        device, gpu: the target device (see `device_profile`).
        allow_freeze: 0 never freezes; N also tries freezing the embeddings and the first N layers.
        allow_optimizer: lighter optimizers to try as well ("adamw-8bit", "adafactor"); default AdamW only.
        overhead_bytes: memory outside PyTorch's allocator; default 0.5 GiB on CUDA, 0 on CPU.
        speed: the speed model; default `SpeedModel()`.
        verify: re-estimate the chosen recipe at full depth when its headroom is within the depth
            extrapolation's error (`verify_margin`); False never does.
        keep: stop searching once this many recipes fit (at most one per combination of techniques);
            the fastest is always among them. Each more costs estimates (about a second for bert-large).
        padded: batches padded to `seq_len` (default; an attention mask with zeros); False: every sample
            fills `seq_len`, the mask is all ones and transformers drops it (see `estimate_memory`).
            Every estimate of the plan, the full-depth confirmation included, uses it.
        progress: called before each estimate with a `SearchStep` ("candidate 7 of at most 24 (...)"); the
            CLI shows it on a terminal. None (default): nothing is called.

    Raises:
        ValueError: bad sizes, `allow_freeze` above the model's depth, unknown model or device.
    """
    t0 = time.perf_counter()
    profile = device_profile(device, gpu=gpu) if gpu or not isinstance(device, DeviceProfile) else device
    config, model_class, name = model_config_of(model_or_config, num_labels)
    depth = num_layers_of(config)
    for field_name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{field_name}` must be a positive whole number, got {value!r}.")
    if not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise ValueError(f"`budget_bytes` must be a positive number of bytes, got {budget_bytes!r}; for example --budget 8GiB.")
    if not isinstance(allow_freeze, int) or not 0 <= allow_freeze <= depth:
        raise ValueError(f"--allow-freeze must be between 0 and {name}'s {depth} layers, got {allow_freeze!r}.")
    if overhead_bytes is None:
        overhead_bytes = CUDA_OVERHEAD_BYTES if profile.type == "cuda" else 0
    speed = speed or SpeedModel()
    shape = ModelShape.of(config)
    target = config if model_class is None else model_or_config
    estimates: dict[tuple, MemoryEstimate] = {}  # tf32 shares fp32's memory; verification reuses nothing

    def candidate(point: SearchPoint, steps: int, exact: bool) -> Candidate:
        recipe = _recipe(name, batch_size, seq_len, steps, point)
        key = (steps, point.precision, point.checkpointing, point.frozen, point.optimizer, exact)
        if key not in estimates:
            est = estimate_memory(target, recipe, batch_size, seq_len, profile, extrapolate_depth=not exact,
                                  num_labels=num_labels, padded=padded)
            estimates[key] = _named(est, name)
        est = replace(estimates[key], recipe=recipe.name)
        needed = needed_bytes(est.peak_bytes, est.reserved_bytes, overhead_bytes)
        seconds = speed.step_seconds(recipe, shape, batch_size, seq_len, profile, tf32=point.tf32) \
            if profile.type == "cuda" else None
        return Candidate(recipe, est, needed, budget_bytes - needed,
                         speed.relative_time(recipe, shape, batch_size, seq_len, profile, tf32=point.tf32),
                         point.tf32, seconds, point)

    def relative_time(point: SearchPoint, steps: int) -> float:
        recipe = _recipe(name, batch_size, seq_len, steps, point)
        return speed.relative_time(recipe, shape, batch_size, seq_len, profile, tf32=point.tf32)

    # Best-first (search.py): every (combination, accumulation) in order of predicted speed, so the first that
    # fits (confirmed at full depth when its headroom is within the extrapolation's error) is the answer, and
    # the search stops after `keep` fitting recipes.
    order = speed_order(search_space(profile, allow_freeze, allow_optimizer), accumulation_options(batch_size),
                        relative_time, rank=lambda p: (p.frozen > 0, p.optimizer != "adamw"))
    found = best_first(order, candidate, keep=keep,
                       confirm=lambda c: verify and c.headroom_bytes < verify_margin(c.needed_bytes),
                       progress=progress, describe=lambda p, steps: describe_candidate(p, batch_size // steps))
    # `fitting` is already in the queue's order (the chosen one first): re-sorting could put a tie first.
    fitting, not_fitting, chosen = found.fitting, found.not_fitting, found.chosen
    chosen_estimate = chosen.estimate if chosen else None
    closest = None if chosen else (not_fitting[0] if not_fitting else None)
    return Plan(name, batch_size, seq_len, budget_bytes, overhead_bytes, profile.describe(), fitting, not_fitting,
                chosen, chosen_estimate, closest, len(estimates), time.perf_counter() - t0, padded=padded)


def with_lighter_optimizers(
    model_or_config: Any,
    result: Plan,
    profile: DeviceProfile,
    optimizers: Sequence[str] = ("adamw-8bit", "adafactor"),
    *,
    num_labels: int | None = None,
) -> list[Candidate]:
    """When nothing fits: the closest candidate's techniques with each lighter optimizer, one estimate each.

    What `allow_optimizer` (`--allow-optimizer`) would gain, checked cheaply: the closest candidate is the
    lowest-memory recipe tried, and a lighter optimizer changes only the optimizer state, so if it fits
    with neither optimizer, a full search with them would rarely find more. Returns the candidates in the
    order of `optimizers` (each with `fits`); an empty list when the plan has a choice or no closest.
    """
    c = result.closest
    if result.chosen is not None or c is None:
        return []
    config, model_class, name = model_config_of(model_or_config, num_labels)
    target = config if model_class is None else model_or_config
    out = []
    for optimizer in _lighter_optimizers(optimizers):
        recipe = c.recipe.replace(optimizer=optimizer)
        est = _named(estimate_memory(target, recipe, result.batch_size, result.seq_len, profile, extrapolate_depth=True,
                                     num_labels=num_labels, padded=result.padded), name)
        needed = needed_bytes(est.peak_bytes, est.reserved_bytes, result.overhead_bytes)
        point = replace(c.point, optimizer=optimizer) if c.point else None
        out.append(Candidate(recipe, est, needed, result.budget_bytes - needed, c.relative_time, c.tf32, c.step_seconds,
                             point))
    return out


def _named(est: MemoryEstimate, name: str) -> MemoryEstimate:
    return replace(est, model=name)


def _recipe(model: str, batch: int, seq_len: int, steps: int, point: SearchPoint) -> Recipe:
    return planner_recipe(model, batch, seq_len, steps, point)
