"""`plan`: the fastest recipe whose predicted peak fits a memory budget, keeping the effective batch.

Search space, per target device:

- gradient accumulation: every divisor of the batch size (micro-batch = batch / steps);
- gradient checkpointing: off / on;
- mixed precision: fp32 and the 16-bit mode the device runs natively (bf16 on capability 8.0+, else
  fp16; fp16 and bf16 need the same memory, so one is searched);
- freezing: only with `allow_freeze=N` (it changes what is learned): the embeddings and the first N layers.

For each (checkpointing, precision, freezing) the accumulation steps are tried from 1 upwards and the
first that fits is kept: fewer micro-batches are faster. Estimates use the depth extrapolation
(estimator.py), a few shallow fake steps each; the chosen recipe is then estimated at full depth, and
if that does not fit the next one is taken. Speed comes from `speed.SpeedModel` (see its docstring):
recompute cost of checkpointing, micro-batch efficiency, tensor-core speed-up of 16-bit precision.
Ranking: recipes that freeze nothing first (freezing changes what is learned), then fastest, then
lowest peak.

What "fits" means: on CUDA, the simulated reserved bytes (the allocator's cache included) plus
`overhead_bytes` (the CUDA context and library workspaces, outside PyTorch's allocator: 0.5 GiB by
default) are at most the budget. On CPU, the live tensor peak is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from tfmem.estimate import speed as _speed
from tfmem.estimate.device import DeviceProfile, device_profile
from tfmem.estimate.estimator import MemoryEstimate, estimate_memory, model_config_of
from tfmem.estimate.fake_step import num_layers_of
from tfmem.estimate.speed import SpeedModel
from tfmem.recipe import Recipe

logger = logging.getLogger(__name__)

CUDA_OVERHEAD_BYTES = 512 * 2**20
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
    """

    recipe: Recipe
    estimate: MemoryEstimate
    needed_bytes: int
    headroom_bytes: int
    relative_time: float

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
            "fits": self.fits,
        }


@dataclass(frozen=True)
class Plan:
    """The planner's answer.

    Attributes:
        fitting: recipes that fit, best first (see the module docstring for the order).
        not_fitting: for each searched combination that fits at no accumulation, its lowest-memory try.
        chosen: the best fitting recipe, its peak confirmed by a full-depth estimate; None if nothing fits.
        chosen_estimate: that full-depth estimate.
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
    overhead_bytes: int | None = None,
    speed: SpeedModel | None = None,
    verify: bool = True,
    num_labels: int = 2,
) -> Plan:
    """Find the fastest recipe that trains `batch_size` x `seq_len` within `budget_bytes`.

    Args:
        model_or_config: as for `estimate_memory`.
        batch_size: the effective batch every recipe keeps.
        seq_len: tokens per sample.
        budget_bytes: device memory available (for a whole card: its memory; `overhead_bytes` is taken off).
        device, gpu: the target device (see `device_profile`).
        allow_freeze: 0 never freezes; N also tries freezing the embeddings and the first N layers.
        overhead_bytes: memory outside PyTorch's allocator; default 0.5 GiB on CUDA, 0 on CPU.
        speed: the speed model; default `SpeedModel()`.
        verify: re-estimate the chosen recipe at full depth.

    Raises:
        ValueError: bad sizes, `allow_freeze` above the model's depth, unknown model or device.
    """
    t0 = time.perf_counter()
    profile = device_profile(device, gpu=gpu) if gpu or not isinstance(device, DeviceProfile) else device
    config, model_class, name = model_config_of(model_or_config, num_labels)
    depth = num_layers_of(config)
    if not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise ValueError(f"`budget_bytes` must be a positive number of bytes, got {budget_bytes!r}; for example --budget 8GiB.")
    if not isinstance(allow_freeze, int) or not 0 <= allow_freeze <= depth:
        raise ValueError(f"--allow-freeze must be between 0 and {name}'s {depth} layers, got {allow_freeze!r}.")
    if overhead_bytes is None:
        overhead_bytes = CUDA_OVERHEAD_BYTES if profile.type == "cuda" else 0
    speed = speed or SpeedModel()
    sixteen = [m for m in profile.precisions() if m != "no"][:1]
    freezes = [0] + ([allow_freeze] if allow_freeze else [])
    steps_options = [s for s in range(1, batch_size + 1) if batch_size % s == 0]

    runs = 0

    def candidate(recipe: Recipe, exact: bool) -> Candidate:
        nonlocal runs
        runs += 1
        est = estimate_memory(config if model_class is None else model_or_config, recipe, batch_size, seq_len,
                              profile, extrapolate_depth=not exact, num_labels=num_labels)
        est = _named(est, name)
        needed = (est.reserved_bytes if est.reserved_bytes is not None else est.peak_bytes) + overhead_bytes
        return Candidate(recipe, est, needed, budget_bytes - needed,
                         speed.relative_time(recipe, depth, batch_size, seq_len, profile))

    fitting: list[Candidate] = []
    not_fitting: list[Candidate] = []
    for frozen in freezes:
        for precision in ["no", *sixteen]:
            for checkpointing in (False, True):
                lowest: Candidate | None = None
                for steps in steps_options:
                    recipe = _recipe(name, batch_size, seq_len, steps, checkpointing, precision, frozen)
                    c = candidate(recipe, exact=False)
                    if c.fits:
                        fitting.append(c)
                        break
                    if lowest is None or c.needed_bytes < lowest.needed_bytes:
                        lowest = c
                else:
                    if lowest is not None:
                        not_fitting.append(lowest)
    fitting.sort(key=lambda c: (c.recipe.freeze.enabled, round(c.relative_time, 6), c.needed_bytes))
    not_fitting.sort(key=lambda c: c.needed_bytes)

    chosen = chosen_estimate = None
    for c in list(fitting):
        if not verify:
            chosen = c
            break
        full = candidate(c.recipe, exact=True)
        if full.fits:
            chosen, chosen_estimate = full, full.estimate
            break
        logger.info("tfmem: %s fits by extrapolation but not at full depth (%d bytes over); next", c.recipe.name, -full.headroom_bytes)
        fitting.remove(c)
        not_fitting.append(full)
    closest = None if chosen else (min(not_fitting, key=lambda c: c.needed_bytes) if not_fitting else None)
    return Plan(name, batch_size, seq_len, budget_bytes, overhead_bytes, profile.describe(), fitting, not_fitting,
                chosen, chosen_estimate, closest, runs, time.perf_counter() - t0)


def _named(est: MemoryEstimate, name: str) -> MemoryEstimate:
    from dataclasses import replace

    return replace(est, model=name)


def _recipe(model: str, batch: int, seq_len: int, steps: int, checkpointing: bool, precision: str, frozen: int) -> Recipe:
    recipe = Recipe(name="planned").replace(
        gradient_accumulation_steps=steps,
        gradient_checkpointing=checkpointing,
        mixed_precision=precision,
        freeze={"embeddings": frozen > 0, "layers": frozen},
    )
    short = model.rsplit("/", 1)[-1]
    return recipe.replace(
        name=f"{short}-b{batch}-s{seq_len}",
        description=f"planned by tfmem for {short}, batch {batch}, seq {seq_len}: {recipe.summary()}",
    )
