"""The one search both planners run: which recipes to try, in what order, and when a fit is final.

`tfmem plan` (plan.py, one GPU) and `tfmem plan --gpus N` (sharding/planner.py) differ in what a
candidate is (a recipe, or a strategy and a recipe) and in how its memory is estimated; what they search
and how is here, once:

- `search_space`: every combination of techniques, before accumulation (precision, tf32, checkpointing,
  and when allowed freezing and lighter optimizers);
- `accumulation_options`: every accumulation that keeps the batch (the divisors of the batch);
- `best_first`: every (combination, accumulation) in order of predicted speed; the first that fits, once
  confirmed at full depth, is the answer; a combination's slower accumulations are skipped once one fits.
  Memory is not assumed to fall with more micro-batches (under FSDP it can rise: see sharding/per_rank.py),
  so nothing is skipped on that account.
- `needed_bytes`: what must fit: on CUDA the simulated reserved bytes of the caching allocator (allocator.py)
  plus the memory outside it (`overhead_bytes`), since the reserved figure is what runs out on a GPU; on
  CPU the live tensor peak.
- `SearchStep` / `describe_candidate`: what `best_first` tells an optional `progress` callback before each estimate, so
  the CLI can show where a search of seconds to minutes is (library code does not print: the caller renders).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from tfmem.estimate import speed as _speed
from tfmem.estimate.device import DeviceProfile

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchPoint:
    """One combination of techniques the planner searches accumulation steps for.

    Attributes:
        precision: the recipe's `mixed_precision` ("no", "bf16" or "fp16").
        checkpointing: gradient checkpointing on or off.
        frozen: 0, or the embeddings and this many first layers frozen.
        tf32: fp32 with TF32 matmuls (same memory as fp32; only with precision "no").
        optimizer: the recipe's `optimizer` ("adamw", or an allowed lighter one).
    """

    precision: str
    checkpointing: bool
    frozen: int = 0
    tf32: bool = False
    optimizer: str = "adamw"


def search_space(profile: DeviceProfile, allow_freeze: int = 0, allow_optimizer: Sequence[str] = ()) -> list[SearchPoint]:
    """Every combination the planners try, before accumulation; the one place to add a technique to search.

    Example:
        >>> from tfmem.estimate.device import device_profile
        >>> [p.precision for p in search_space(device_profile(gpu="t4")) if not p.checkpointing]
        ['no', 'fp16']
    """
    sixteen = [m for m in profile.precisions() if m != "no"][:1]
    fp32_variants = [False, True] if _speed.tf32_available(profile) else [False]
    points = []
    for optimizer in ["adamw", *lighter_optimizers(allow_optimizer)]:
        for frozen in [0] + ([allow_freeze] if allow_freeze else []):
            for precision in ["no", *sixteen]:
                for tf32 in fp32_variants if precision == "no" else [False]:
                    for checkpointing in (False, True):
                        points.append(SearchPoint(precision, checkpointing, frozen, tf32, optimizer))
    return points


def lighter_optimizers(allowed: Sequence[str]) -> list[str]:
    """The allowed optimizers other than AdamW, checked (a misspelt one is a ValueError with a suggestion)."""
    from tfmem.errors import RecipeError
    from tfmem.techniques.optimizer import OptimizerConfig

    names = [allowed] if isinstance(allowed, str) else list(allowed)
    for n in names:
        try:
            OptimizerConfig(n)
        except RecipeError as e:
            raise ValueError(f"--allow-optimizer: {e.problems[0].removeprefix('`optimizer` ')}") from None
    return [n for n in dict.fromkeys(names) if n != "adamw"]


def accumulation_options(batch_size: int) -> list[int]:
    """Every number of accumulation steps that splits `batch_size` into equal micro-batches.

    Example:
        >>> accumulation_options(12)
        [1, 2, 3, 4, 6, 12]
    """
    return [s for s in range(1, batch_size + 1) if batch_size % s == 0]


def needed_bytes(peak_bytes: int, reserved_bytes: int | None, overhead_bytes: int) -> int:
    """What must fit in the budget: reserved (CUDA: the allocator's cache included) + overhead, else the peak.

    Example:
        >>> needed_bytes(3 << 30, 4 << 30, 1 << 29) == (4 << 30) + (1 << 29), needed_bytes(100, None, 0)
        (True, 100)
    """
    return (reserved_bytes if reserved_bytes is not None else peak_bytes) + overhead_bytes


class Fitting(Protocol):
    """What the search reads of a candidate."""

    @property
    def fits(self) -> bool: ...

    needed_bytes: int
    headroom_bytes: int


C = TypeVar("C", bound=Fitting)
P = TypeVar("P", bound=Hashable)


def speed_order(points: Iterable[P], steps_options: Sequence[int], relative_time: Callable[[P, int], float],
                rank: Callable[[P], tuple] = lambda p: ()) -> list[tuple[P, int]]:
    """Every (point, accumulation steps), fastest first.

    Args:
        relative_time: predicted time per sample of a point with that many accumulation steps.
        rank: what goes before speed (the single-GPU planner: recipes that freeze nothing, then AdamW).
            Ties go to fewer micro-batches.
    """
    queue = [((*rank(p), round(relative_time(p, s), 6), s), i, p, s)
             for i, p in enumerate(points) for s in steps_options]
    queue.sort(key=lambda item: item[:2])
    return [(p, s) for _, _, p, s in queue]


@dataclass
class Search(Generic[C, P]):
    """What `best_first` found.

    Attributes:
        fitting: the candidates that fit, at most one per point, in the search's order (the chosen first).
        lowest: for each point tried without a fit, its lowest-memory try.
        failed: candidates that fitted by extrapolation but not at full depth.
        chosen: the first fitting candidate (confirmed at full depth when `confirm` asked); None if none fits.
    """

    fitting: list[C] = field(default_factory=list)
    lowest: dict[P, C] = field(default_factory=dict)
    failed: list[C] = field(default_factory=list)
    chosen: C | None = None

    @property
    def not_fitting(self) -> list[C]:
        """The lowest try of each point without a fit, and the full-depth failures, least memory first."""
        return sorted([*self.lowest.values(), *self.failed], key=lambda c: c.needed_bytes)


@dataclass(frozen=True)
class SearchStep:
    """What `best_first` passes its `progress` callback just before an estimate.

    Attributes:
        index: the candidate's place in the search order, from 1.
        total: how many candidates the order holds: an upper bound on the estimates, since the search stops at
            its first fit (its `keep` fits) and skips a fitted combination's slower accumulations.
        description: the candidate, for people: "fsdp, checkpointing, bf16, micro 16".
        exact: True for the full-depth estimate that confirms a fit (`confirm`); False for a screening one.
    """

    index: int
    total: int
    description: str
    exact: bool = False

    def text(self) -> str:
        """One line for a status display.

        Example:
            >>> SearchStep(7, 24, "checkpointing, bf16, micro 16").text()
            'candidate 7 of at most 24 (checkpointing, bf16, micro 16)'
        """
        depth = ", confirming at full depth" if self.exact else ""
        return f"candidate {self.index} of at most {self.total} ({self.description}{depth})"


def describe_candidate(point: SearchPoint, micro_batch_size: int, strategy: str | None = None) -> str:
    """A candidate in a few words, as `SearchStep.description` gives it.

    Example:
        >>> describe_candidate(SearchPoint("bf16", True), 16, "fsdp")
        'fsdp, checkpointing, bf16, micro 16'
    """
    precision = "tf32" if point.tf32 else ("fp32" if point.precision == "no" else point.precision)
    parts = [strategy or "", "checkpointing" if point.checkpointing else "", precision,
             f"freeze {point.frozen} layers" if point.frozen else "",
             point.optimizer if point.optimizer != "adamw" else "", f"micro {micro_batch_size}"]
    return ", ".join(p for p in parts if p)


def best_first(
    order: Iterable[tuple[P, int]],
    estimate: Callable[[P, int, bool], C],
    *,
    keep: int = 1,
    confirm: Callable[[C], bool] = lambda c: False,
    progress: Callable[[SearchStep], None] | None = None,
    describe: Callable[[P, int], str] = lambda point, steps: f"{point}, {steps} accumulation steps",
) -> Search[C, P]:
    """Estimate candidates in `order` until `keep` points have a fit; the first fit is the choice.

    Args:
        order: (point, accumulation steps), best first (see `speed_order`).
        estimate: `(point, steps, exact)` -> candidate; `exact` False may extrapolate the depth, True
            must not.
        keep: stop once this many points have a fitting candidate (one each: a point's later, slower
            accumulations are skipped once one fits).
        confirm: for the first fit only: whether to re-estimate it with `exact=True` before choosing it.
            One that does not fit then is `failed`, and the search goes on (its slower accumulations too).
        progress: called with a `SearchStep` before each estimate (None: nothing is called); the CLI shows it.
        describe: `(point, steps)` -> the `SearchStep.description` of that candidate.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> memory = {("a", 1): 9, ("a", 2): 5, ("b", 1): 7}
        >>> def est(p, s, exact):
        ...     return NS(fits=memory[p, s] <= 6, needed_bytes=memory[p, s], headroom_bytes=6 - memory[p, s], s=s)
        >>> found = best_first([("a", 1), ("b", 1), ("a", 2)], est)
        >>> found.chosen.needed_bytes, [c.needed_bytes for c in found.not_fitting]
        (5, [7])
    """
    found: Search[C, P] = Search()
    done: set[P] = set()
    order = list(order)  # its length is the progress's upper bound

    def estimate_with_progress(index: int, point: P, steps: int, exact: bool) -> C:
        if progress is not None:
            progress(SearchStep(index, len(order), describe(point, steps), exact))
        return estimate(point, steps, exact)

    for index, (point, steps) in enumerate(order, 1):
        if len(done) >= max(keep, 1):
            break
        if point in done:
            continue
        c = estimate_with_progress(index, point, steps, False)
        if not c.fits:
            if point not in found.lowest or c.needed_bytes < found.lowest[point].needed_bytes:
                found.lowest[point] = c
            continue
        if found.chosen is None and confirm(c):
            full = estimate_with_progress(index, point, steps, True)
            if not full.fits:
                logger.info("tfmem: a candidate fits by extrapolation but not at full depth (%d bytes over); next",
                            -full.headroom_bytes)
                found.failed.append(full)
                continue
            c = full  # the table shows what the chosen line says: the full-depth figures
        if found.chosen is None:
            found.chosen = c
        found.fitting.append(c)
        done.add(point)
        found.lowest.pop(point, None)
    return found


def planner_recipe(model: str, batch: int, seq_len: int, steps: int, point: SearchPoint) -> Any:
    """The recipe a planner tries for `point` with `steps` accumulation steps, named for the model and shape."""
    from tfmem.recipe import Recipe

    changes: dict[str, Any] = {
        "gradient_accumulation_steps": steps,
        "gradient_checkpointing": point.checkpointing,
        "mixed_precision": point.precision,
        "freeze": {"embeddings": point.frozen > 0, "layers": point.frozen},
    }
    if point.tf32:
        changes["tf32"] = True
    if point.optimizer != "adamw":
        changes["optimizer"] = point.optimizer
    recipe = Recipe(name="planned").replace(**changes)
    short = model.rsplit("/", 1)[-1]
    return recipe.replace(
        name=f"{short}-b{batch}-s{seq_len}",
        description=f"planned by tfmem for {short}, batch {batch}, seq {seq_len}: {recipe.summary()}",
    )
