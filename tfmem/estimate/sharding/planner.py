"""The fastest (strategy, recipe) that fits on each of N GPUs, and how many GPUs a model would need.

    plan_sharded(model_or_config, batch_size, seq_len, budget_bytes, gpus) -> ShardedPlan
    gpus_needed(model_or_config, batch_size, seq_len, budget_bytes) -> ShardedPlan | None

Built on the per-rank estimate (`tfmem.estimate.sharding.per_rank`) and the single-GPU planner's search
(`tfmem.estimate.search`): the same combinations of techniques (precision, tf32, checkpointing, and when
allowed freezing and lighter optimizers), each under every strategy that can run it, and the same
best-first order over accumulation by predicted speed (the speed model times a documented per-strategy
factor), recipes that change what is learned (freezing, then a lighter optimizer) ranked last as on one
GPU. A candidate fits as on one GPU: its rank's reserved
bytes (the caching allocator's cache included) plus the overhead outside the allocator are within the
budget on CUDA; its peak on CPU. `gpus_needed` answers the single-GPU planner's "Nothing fits": the fewest
GPUs on which FSDP's lowest-memory recipes would fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tfmem.estimate.device import DeviceProfile, device_profile
from tfmem.estimate.estimator import model_config_of
from tfmem.estimate.fake_step import num_layers_of
from tfmem.estimate.search import (
    SearchPoint,
    SearchStep,
    best_first,
    describe_candidate,
    lighter_optimizers,
    needed_bytes,
    planner_recipe,
    search_space,
    speed_order,
)
from tfmem.estimate.search import accumulation_options as _accumulation_options
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
    """One (strategy, recipe) the sharded planner estimated.

    `needed_bytes` is what must fit, as on one GPU: the rank's reserved bytes + overhead on CUDA, its peak +
    overhead on CPU; `headroom_bytes` = budget - needed_bytes.
    """

    strategy: str
    recipe: Recipe
    estimate: ShardedEstimate
    needed_bytes: int
    headroom_bytes: int
    relative_time: float
    point: SearchPoint | None = field(default=None, compare=False, repr=False)

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
                "reserved_bytes": self.estimate.reserved_bytes, "needed_bytes": self.needed_bytes, "headroom_bytes": self.headroom_bytes,
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
    num_labels: int | None = None,
    allow_freeze: int = 0,
    allow_optimizer: Sequence[str] = (),
    progress: Callable[[SearchStep], None] | None = None,
) -> ShardedPlan:
    """The fastest (strategy, recipe) whose per-GPU memory fits `budget_bytes` on each of `gpus` GPUs.

    Keeps the global effective batch: each rank runs batch_size / gpus samples per step, split into
    micro-batches by the recipe's accumulation. Searches what the single-GPU planner searches (precision,
    tf32, checkpointing, accumulation: `tfmem.estimate.search`) under each strategy that can run it (fp16 is
    not offered under FSDP), best first by predicted speed, keeping the fastest fitting recipe of each
    (strategy, combination) for the table. Candidates are screened by depth extrapolation; the chosen one
    is re-estimated at full depth, and if it does not fit then, the search goes on. "Fits" is as on one GPU:
    reserved + `overhead_bytes` within the budget on CUDA (see `ShardedCandidate`).

    `allow_freeze` and `allow_optimizer` are the single-GPU planner's (`plan`): they change what is learned,
    so such recipes rank after every one that does not, and are chosen only when none of those fits.
    Freezing is searched under every strategy (FSDP2 shards per parameter, so a unit may hold frozen and
    trainable parameters: the frozen ones are gathered for compute and get no gradient, reduce-scatter or
    optimizer state; the fake step runs exactly that). Lighter optimizers are searched under DDP only:
    they fail on FSDP2's sharded parameters (`tfmem.adapters.fsdp.recipe_problems`). `quick` tries only the lowest-memory recipes (FSDP's most sharded
    strategy, checkpointing and 16-bit where the device has it, no accumulation and the most), to answer
    "does it fit at all?". `progress`, when given, is called before each estimate with a `SearchStep` (the CLI
    shows it on a terminal).

    Raises:
        ValueError: `allow_freeze` outside 0..the model's depth, an unknown optimizer in `allow_optimizer`; and
            as for `estimate_sharded`.
        RecipeError: as for `estimate_sharded`.
    """
    from tfmem.adapters.fsdp import recipe_problems
    from tfmem.estimate.speed import ModelShape, SpeedModel

    t0 = time.perf_counter()
    profile = device_profile(device) if not isinstance(device, DeviceProfile) else device
    config, model_class, name = model_config_of(model_or_config, num_labels)
    depth = num_layers_of(config)
    if not isinstance(allow_freeze, int) or isinstance(allow_freeze, bool) or not 0 <= allow_freeze <= depth:
        raise ValueError(f"--allow-freeze must be between 0 and {name}'s {depth} layers, got {allow_freeze!r}.")
    lighter = lighter_optimizers(allow_optimizer)  # checked here: a misspelt name is a ValueError with a suggestion
    per_rank = per_rank_batch(batch_size, gpus)
    speed = SpeedModel()
    shape = ModelShape.of(config)
    source = model_or_config if model_class is not None else config
    estimates: dict[tuple, ShardedEstimate] = {}  # tf32 shares fp32's memory

    def recipe_of(point: tuple[str, SearchPoint], steps: int) -> Recipe:
        return planner_recipe(name, batch_size, seq_len, steps, point[1])

    def candidate(point: tuple[str, SearchPoint], steps: int, exact: bool) -> ShardedCandidate:
        strategy, p = point
        recipe = recipe_of(point, steps)
        key = (strategy, steps, p.precision, p.checkpointing, p.frozen, p.optimizer, exact)
        if key not in estimates:
            estimates[key] = estimate_sharded(source, recipe, batch_size, seq_len, gpus, strategy, profile,
                                              num_labels=num_labels, extrapolate_depth=not exact)
        est = replace(estimates[key], recipe=recipe.name, model=name)
        needed = needed_bytes(est.peak_bytes, est.reserved_bytes, overhead_bytes)
        return ShardedCandidate(strategy, recipe, est, needed, budget_bytes - needed, relative_time(point, steps), p)

    def relative_time(point: tuple[str, SearchPoint], steps: int) -> float:
        strategy, p = point
        return speed.relative_time(recipe_of(point, steps), shape, per_rank, seq_len, profile,
                                   tf32=p.tf32) * STRATEGY_TIME[strategy]

    steps_options = _accumulation_options(per_rank)
    # A bound first, so a combination that cannot fit costs no fake step: every rank holds at least (its shard
    # of) the fp32 weights, the trainable parameters' gradients and, with AdamW, their two moments (AdamW and no
    # freezing: 4 x 4 bytes per parameter; the lighter optimizers' state is counted as nothing), and under DDP
    # the reducer's copy of the trainable gradients.
    weights = trainable_bytes(source, Recipe(), num_labels)
    trainable = {frozen: weights if not frozen else trainable_bytes(source, recipe_of(("ddp", SearchPoint(
        "no", False, frozen)), 1), num_labels) for frozen in {0, allow_freeze}}

    def floor(strategy: str, p: SearchPoint) -> int:
        grads = trainable[p.frozen]
        states = weights + grads + (2 * grads if p.optimizer == "adamw" else 0)
        return states + grads if strategy == "ddp" else states // gpus

    points = []
    for strategy in (s for s in STRATEGIES if s in strategies):
        # Under FSDP: no fp16, no optimizer but AdamW (recipe_problems says why); `lighter` was checked above.
        combos = [p for p in search_space(profile, allow_freeze, lighter)
                  if floor(strategy, p) + overhead_bytes <= budget_bytes
                  and (strategy == "ddp" or not recipe_problems(recipe_of((strategy, p), 1)))]
        if quick:  # the least memory: checkpointing, the 16-bit mode where FSDP has it (else fp32)
            combos = [p for p in combos if p.checkpointing and not p.tf32][-1:]
        points += [(strategy, p) for p in combos]
    if quick:  # and no accumulation, or the most
        steps_options = sorted({steps_options[0], steps_options[-1]})
    # Every (strategy, combination) gets a row when one of its accumulations fits, so `keep` is all of them.
    # Recipes that change what is learned go last, whatever their speed, as in the single-GPU planner.
    order = speed_order(points, steps_options, relative_time, rank=lambda pt: (pt[1].frozen > 0, pt[1].optimizer != "adamw"))
    found = best_first(order, candidate, keep=len(points), confirm=lambda c: c.extrapolated, progress=progress,
                       describe=lambda pt, steps: describe_candidate(pt[1], per_rank // steps, pt[0]))
    tried = found.not_fitting
    return ShardedPlan(name, gpus, batch_size, seq_len, budget_bytes, overhead_bytes, profile.describe(),
                       found.fitting, None if found.chosen or not tried else tried[0], found.chosen,
                       time.perf_counter() - t0)


def gpus_needed(
    model_or_config: Any,
    batch_size: int,
    seq_len: int,
    budget_bytes: int,
    device: DeviceProfile | str = "cuda",
    *,
    overhead_bytes: int = 0,
    options: tuple[int, ...] = (2, 4, 8),
    num_labels: int | None = None,
    progress: Callable[[SearchStep], None] | None = None,
) -> ShardedPlan | None:
    """The fewest GPUs (of `options`, dividing the batch) on which FSDP with its lowest-memory recipes fits.

    Returns that quick plan (`plan_sharded(..., quick=True)`), or None when none of the options fits.
    """
    # The same bound as plan_sharded's, here so a hopeless number of GPUs costs nothing at all.
    states = 4 * trainable_bytes(model_or_config, Recipe(), num_labels)
    for gpus in options:
        if batch_size % gpus or states // gpus + overhead_bytes > budget_bytes:
            continue
        result = plan_sharded(model_or_config, batch_size, seq_len, budget_bytes, gpus, device,
                              overhead_bytes=overhead_bytes, strategies=("fsdp",), quick=True, num_labels=num_labels,
                              progress=progress)
        if result.chosen is not None:
            return result
    return None


def planned_recipe(model: str, batch: int, seq_len: int, steps: int, checkpointing: bool, precision: str,
                   frozen: int = 0) -> Recipe:
    """A recipe the sharded planner tries, named and described as the single-GPU planner names its own."""
    return planner_recipe(model, batch, seq_len, steps, SearchPoint(precision, checkpointing, frozen))
