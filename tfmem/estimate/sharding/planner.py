"""The fastest (strategy, recipe) that fits on each of N GPUs, and how many GPUs a model would need.

    plan_sharded(model_or_config, batch_size, seq_len, budget_bytes, gpus) -> ShardedPlan
    gpus_needed(model_or_config, batch_size, seq_len, budget_bytes) -> ShardedPlan | None

Built on the per-rank estimate (`tfmem.estimate.sharding.per_rank`): the planner searches strategy,
precision, checkpointing and accumulation the way the single-GPU planner searches recipes, and ranks the
fitting ones by the speed model times a documented per-strategy factor. `gpus_needed` answers the
single-GPU planner's "Nothing fits": the fewest GPUs on which FSDP's lowest-memory recipes would fit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tfmem.estimate.device import DeviceProfile, device_profile
from tfmem.estimate.estimator import model_config_of
from tfmem.estimate.sharding.per_rank import (
    STRATEGIES,
    ShardedEstimate,
    estimate_sharded,
    per_rank_batch,
    trainable_bytes,
)
from tfmem.recipe import Recipe

# Time per sample of each strategy relative to DDP, for ranking only: FSDP all-gathers every unit once in
# forward and once more in backward (FULL_SHARD) on top of the reduce-scatter, SHARD_GRAD_OP once. These
# are documented defaults (the share of a step that communication takes depends on the interconnect),
# not measurements.
STRATEGY_TIME = {"ddp": 1.0, "fsdp-grad-op": 1.05, "fsdp": 1.1}


@dataclass(frozen=True)
class ShardedCandidate:
    """One (strategy, recipe) the sharded planner estimated; `needed_bytes` = peak + overhead."""

    strategy: str
    recipe: Recipe
    estimate: ShardedEstimate
    needed_bytes: int
    headroom_bytes: int
    relative_time: float

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    @property
    def extrapolated(self) -> bool:
        """Its peak was extrapolated from 2- and 3-layer copies rather than estimated at full depth."""
        return "extrapolated" in self.estimate.method

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "recipe": self.recipe.to_dict(), "summary": self.recipe.summary(),
                "micro_batch_size": self.estimate.micro_batch_size, "peak_bytes": self.estimate.peak_bytes,
                "needed_bytes": self.needed_bytes, "headroom_bytes": self.headroom_bytes,
                "relative_time": round(self.relative_time, 4), "fits": self.fits, "extrapolated": self.extrapolated}


@dataclass(frozen=True)
class ShardedPlan:
    """The sharded planner's answer: `chosen` is the fastest fitting (strategy, recipe), verified at full depth."""

    model: str
    gpus: int
    batch_size: int
    seq_len: int
    budget_bytes: int
    overhead_bytes: int
    device: str
    fitting: list[ShardedCandidate]
    closest: ShardedCandidate | None
    chosen: ShardedCandidate | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "gpus": self.gpus, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "budget_bytes": self.budget_bytes, "overhead_bytes": self.overhead_bytes, "device": self.device,
                "fitting": [c.to_dict() for c in self.fitting], "closest": self.closest.to_dict() if self.closest else None,
                "chosen": self.chosen.to_dict() if self.chosen else None, "seconds": round(self.seconds, 2)}


def plan_sharded(
    model_or_config: Any,
    batch_size: int,
    seq_len: int,
    budget_bytes: int,
    gpus: int,
    device: DeviceProfile | str = "cuda",
    *,
    overhead_bytes: int = 0,
    strategies: tuple[str, ...] = STRATEGIES,
    quick: bool = False,
    num_labels: int = 2,
) -> ShardedPlan:
    """The fastest (strategy, recipe) whose per-GPU peak fits `budget_bytes` on each of `gpus` GPUs.

    Keeps the global effective batch: each rank runs batch_size / gpus samples per step, split into
    micro-batches by the recipe's accumulation. Searches precision (fp32 and the device's 16-bit mode;
    fp16 is not offered under FSDP), checkpointing and accumulation for each strategy, estimating
    2- and 3-layer copies and extrapolating to the full depth (per-rank bytes are affine in the number of
    layers); the chosen one is re-estimated at full depth. Freezing is not searched here. `quick` tries
    only the lowest-memory recipes (checkpointing and 16-bit where the device has it, no accumulation and
    the most), to answer "does it fit at all?".

    Raises:
        ValueError / RecipeError: as for `estimate_sharded`.
    """
    from tfmem.estimate.fake_step import num_layers_of, with_depth
    from tfmem.estimate.speed import SpeedModel

    t0 = time.perf_counter()
    profile = device_profile(device) if not isinstance(device, DeviceProfile) else device
    config, model_class, name = model_config_of(model_or_config, num_labels)
    depth = num_layers_of(config)
    per_rank = per_rank_batch(batch_size, gpus)
    speed = SpeedModel()
    sixteen = [m for m in profile.precisions() if m != "no"][:1]
    steps_options = [s for s in range(1, per_rank + 1) if per_rank % s == 0]
    source = model_or_config if model_class is not None else config

    def estimate(recipe: Recipe, strategy: str, exact: bool) -> ShardedEstimate:
        if exact or depth <= 3 or strategy == "ddp":
            return estimate_sharded(source, recipe, batch_size, seq_len, gpus, strategy, profile, num_labels=num_labels)
        two, three = (estimate_sharded(with_depth(config, d) if model_class is None else _resized(model_or_config, d),
                                       recipe, batch_size, seq_len, gpus, strategy, profile, num_labels=num_labels)
                      for d in (2, 3))
        grow = three.peak_bytes - two.peak_bytes
        from dataclasses import replace

        return replace(two, peak_bytes=two.peak_bytes + (depth - 2) * grow, model=name,
                       method=f"{two.method}, 2- and 3-layer copies extrapolated to {depth} layers")

    def candidate(strategy: str, recipe: Recipe, exact: bool = False) -> ShardedCandidate:
        est = estimate(recipe, strategy, exact)
        needed = est.peak_bytes + overhead_bytes
        time_ = speed.relative_time(recipe, depth, per_rank, seq_len, profile) * STRATEGY_TIME[strategy]
        return ShardedCandidate(strategy, recipe, est, needed, budget_bytes - needed, time_)

    fitting: list[ShardedCandidate] = []
    tried: list[ShardedCandidate] = []
    # FULL_SHARD needs the least memory, SHARD_GRAD_OP more, DDP the most: a (precision, checkpointing)
    # that fits under none of FULL_SHARD's accumulation options is not tried under the others. Under FSDP
    # accumulation is not monotonic: with gradient sync off FSDP2 keeps every unit's *unsharded* gradients
    # between micro-batches, which can cost more than the activations it saves. So no accumulation is tried
    # first, then the most, then the ones between.
    order = [s for s in ("fsdp", "fsdp-grad-op", "ddp") if s in strategies]
    hopeless: set[tuple[str, bool]] = set()
    for strategy in order:
        precisions = ["no", *[m for m in sixteen if not (strategy != "ddp" and m == "fp16")]]
        if quick:
            precisions = precisions[-1:]
        for precision in precisions:
            for checkpointing in (True,) if quick else (False, True):
                if (precision, checkpointing) in hopeless:
                    continue
                found = False
                middle = [] if quick else steps_options[1:-1]
                for steps in [steps_options[0], *steps_options[1:][::-1][:1], *middle]:
                    c = candidate(strategy, planned_recipe(name, batch_size, seq_len, steps, checkpointing, precision, 0))
                    tried.append(c)
                    if c.fits:
                        fitting.append(c)
                        found = True
                        break
                if not found and strategy == order[0]:
                    hopeless.add((precision, checkpointing))
    fitting.sort(key=lambda c: (round(c.relative_time, 6), c.needed_bytes))
    chosen = None
    # The chosen one goes back into the list at full depth, so the table's row and the Chosen line print
    # the same figures; one that does not fit at full depth leaves the list (the closest may be it).
    for c in list(fitting):
        full = candidate(c.strategy, c.recipe, exact=True)
        if full.fits:
            chosen = full
            fitting[fitting.index(c)] = full
            break
        fitting.remove(c)
        tried.append(full)
    closest = None if chosen or not tried else min(tried, key=lambda c: c.needed_bytes)
    return ShardedPlan(name, gpus, batch_size, seq_len, budget_bytes, overhead_bytes, profile.describe(), fitting,
                       closest, chosen, time.perf_counter() - t0)


def gpus_needed(
    model_or_config: Any,
    batch_size: int,
    seq_len: int,
    budget_bytes: int,
    device: DeviceProfile | str = "cuda",
    *,
    overhead_bytes: int = 0,
    options: tuple[int, ...] = (2, 4, 8),
    num_labels: int = 2,
) -> ShardedPlan | None:
    """The fewest GPUs (of `options`, dividing the batch) on which FSDP with its lowest-memory recipes fits.

    Returns that quick plan (`plan_sharded(..., quick=True)`), or None when none of the options fits.
    """
    # A bound first, so a hopeless budget costs no fake step: every rank holds at least its shard of the
    # fp32 weights, gradients and two AdamW moments (4 x 4 bytes per parameter, nothing frozen).
    states = 4 * trainable_bytes(model_or_config, Recipe(), num_labels)
    for gpus in options:
        if batch_size % gpus or states // gpus + overhead_bytes > budget_bytes:
            continue
        result = plan_sharded(model_or_config, batch_size, seq_len, budget_bytes, gpus, device,
                              overhead_bytes=overhead_bytes, strategies=("fsdp",), quick=True, num_labels=num_labels)
        if result.chosen is not None:
            return result
    return None


def _resized(model: Any, depth: int) -> Any:
    from tfmem.estimate.fake_step import with_depth

    return with_depth(model.config, depth)


def planned_recipe(model: str, batch: int, seq_len: int, steps: int, checkpointing: bool, precision: str,
                   frozen: int = 0) -> Recipe:
    """A recipe the sharded planner tries, named and described as the single-GPU planner names its own."""
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
