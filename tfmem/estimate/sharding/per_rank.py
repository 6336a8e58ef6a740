"""One rank's peak memory when training is spread over N GPUs: DDP, FSDP (FULL_SHARD) or FSDP SHARD_GRAD_OP.

    estimate_sharded(model_or_config, recipe, batch_size, seq_len, gpus=4, strategy="fsdp") -> ShardedEstimate

`batch_size` is the *global* effective batch: each rank runs batch_size / gpus samples per optimizer
step, in micro-batches of batch_size / (gpus x gradient_accumulation_steps).

- **ddp**: every rank holds the whole model, its gradients and optimizer state. The single-GPU estimate
  at the per-rank batch, plus DDP's gradient buckets: with accelerate's default
  `gradient_as_bucket_view=False` the reducer keeps its own flat copy of every trainable gradient
  (fp32), the communication buffer all-reduce runs on.
- **fsdp** / **fsdp-grad-op**: the model is sharded the way `accelerate.prepare` shards it (each encoder
  layer a unit, the input embeddings a unit, the rest with the root) and one steady-state optimizer step
  runs on fake tensors (`sharding/fake_step.py`) over a fake process group of `gpus` ranks (`torch.distributed`'s "fake" backend:
  collectives return at once, nothing is allocated), counted by the profiler's live-bytes tracker with
  its FSDP2 accounting (`tfmem.profiler.sharded`). So the figure includes what FSDP2 really holds:
  this rank's shards of parameters, gradients and AdamW state (1/N each, padded); each unit's gathered
  parameters while it computes (FULL_SHARD frees them after the unit's forward and gathers again in
  backward; SHARD_GRAD_OP keeps every unit gathered from its forward to its backward); the flat
  all-gather buffer, which in forward is kept until the next unit's all-gather (to overlap the two);
  the reduce-scatter input of each unit's gradients; and, under accumulation, the *unsharded* gradients
  FSDP2 keeps between micro-batches while gradient sync is off (accelerate turns it off): accumulation
  does not shard gradients until the window's last backward.

The optimizer is the recipe's: under DDP each rank holds the whole optimizer state, as on one GPU (the
single-GPU estimate builds the recipe's optimizer). Under FSDP only AdamW is estimated: transformers'
Adafactor and bitsandbytes' 8-bit AdamW both fail at their first step on FSDP2's DTensor parameters (they
mix plain tensors into the update), so such a recipe is refused (`tfmem.adapters.fsdp.recipe_problems`).

The fake step needs this process to have no process group of its own (run `tfmem estimate` outside the
distributed launch). CUDA targets get the caching allocator's 512-byte rounding, the cuBLAS workspace and
a reserved figure, like the single-GPU estimate (see `reserved_bytes`); sharded CUDA figures have not been
checked on GPUs yet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from tfmem.errors import RecipeError
from tfmem.estimate.allocator import simulate
from tfmem.estimate.device import DeviceProfile, device_profile
from tfmem.estimate.estimator import _recipe, estimate_memory, model_config_of
from tfmem.estimate.fake_step import num_layers_of, with_depth
from tfmem.estimate.sharding.fake_step import fake_sharded_step, shard_like_accelerate  # noqa: F401 (re-exported)
from tfmem.estimate.tracking import AllocationLog
from tfmem.recipe import Recipe
from tfmem.techniques.accumulation import micro_batch_size

logger = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp", "fsdp-grad-op")


@dataclass(frozen=True)
class ShardedEstimate:
    """The predicted peak of one rank (rank 0, whose shards are the largest when sizes do not divide).

    Attributes:
        peak_bytes: one rank's peak allocated bytes.
        parameters_bytes: at the peak: this rank's parameter shards plus the gathered units it holds.
        gradients_bytes, optimizer_state_bytes: at the peak (sharded under FSDP).
        activations_bytes: everything else at the peak: activations of the per-rank micro-batch, temporaries,
            the batch, and communication buffers (flat all-gather / reduce-scatter buffers; DDP's buckets).
        communication_bytes: DDP's gradient buckets (counted in activations_bytes); 0 under FSDP, whose
            buffers come and go inside the step and are counted where they are live.
        library_workspace_bytes: cuBLAS's workspace on CUDA targets.
        reserved_bytes: what the CUDA caching allocator would hold on this rank at its worst (allocator.py, as
            on one GPU): under FSDP the fake step's allocations and frees replayed through the allocator's
            rules (one stream: FSDP2's all-gather and reduce-scatter streams are not modelled, which can
            only add cached blocks); under DDP the single-GPU figure plus the segment of the reducer's
            gradient buffer. None on CPU. This, plus the CUDA context, is what must fit a GPU.
        strategy, gpus: the sharding. batch_size: the global effective batch. per_rank_batch_size: samples per
            rank per optimizer step; micro_batch_size: per forward on one rank.
    """

    peak_bytes: int
    parameters_bytes: int
    gradients_bytes: int
    optimizer_state_bytes: int
    activations_bytes: int
    communication_bytes: int
    library_workspace_bytes: int
    strategy: str
    gpus: int
    batch_size: int
    per_rank_batch_size: int
    micro_batch_size: int
    seq_len: int
    model: str
    recipe: str
    device: str
    method: str
    seconds: float = 0.0
    reserved_bytes: int | None = None

    def fits(self, budget_bytes: int) -> bool:
        """Whether this rank fits `budget_bytes`: its reserved bytes on CUDA, its peak elsewhere."""
        return (self.reserved_bytes if self.reserved_bytes is not None else self.peak_bytes) <= budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def per_rank_batch(batch_size: int, gpus: int) -> int:
    """Samples each rank runs per optimizer step.

    Raises:
        RecipeError: the global batch does not divide by the number of GPUs.

    Example:
        >>> per_rank_batch(32, 4)
        8
    """
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ValueError(f"`gpus` must be a positive whole number, got {gpus!r}.")
    if batch_size % gpus:
        raise RecipeError(
            f"the batch size {batch_size} does not divide by --gpus {gpus}; each GPU runs batch / gpus samples. "
            f"Use a batch that is a multiple of {gpus}."
        )
    return batch_size // gpus


def estimate_sharded(
    model_or_config: PreTrainedModel | PretrainedConfig | str,
    recipe: Recipe | str | None,
    batch_size: int,
    seq_len: int,
    gpus: int,
    strategy: str = "fsdp",
    device: DeviceProfile | str = "cuda",
    *,
    gpu: str | None = None,
    num_labels: int | None = None,
    extrapolate_depth: bool = False,
) -> ShardedEstimate:
    """Predict one rank's peak memory for a training step spread over `gpus` GPUs.

    Args:
        model_or_config, recipe, seq_len, device, gpu, num_labels: as for `estimate_memory`.
        batch_size: the global effective batch (over all GPUs).
        gpus: processes / GPUs.
        strategy: "ddp", "fsdp" (FULL_SHARD) or "fsdp-grad-op" (SHARD_GRAD_OP).
        extrapolate_depth: estimate shallow copies and extrapolate to the full depth (the planner's
            screening): DDP through `estimate_memory`'s extrapolation; FSDP from 2- and 3-layer copies, and
            with frozen layers a copy with one more frozen layer (per-rank bytes are affine in the number of
            trainable and of frozen layers; the allocator's cached slack is the largest sample's, as on one GPU).

    Raises:
        ValueError: an unknown strategy, or a process group already exists in this process (FSDP).
        RecipeError: the batch does not divide by gpus x accumulation steps; the recipe cannot apply under
            FSDP (auto_micro_batch, fp16, an optimizer other than AdamW); or it does not fit the model.
    """
    t0 = time.perf_counter()
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` is {strategy!r}; use one of {', '.join(STRATEGIES)}.")
    recipe = _recipe(recipe)
    profile = device_profile(device, gpu=gpu) if gpu or not isinstance(device, DeviceProfile) else device
    per_rank = per_rank_batch(batch_size, gpus)
    micro = micro_batch_size(per_rank, recipe.gradient_accumulation_steps)
    if strategy == "ddp" or gpus == 1:
        single = estimate_memory(model_or_config, recipe, per_rank, seq_len, profile, num_labels=num_labels,
                                 extrapolate_depth=extrapolate_depth)
        buckets = trainable_bytes(model_or_config, recipe, num_labels) if gpus > 1 else 0
        reserved = None if single.reserved_bytes is None else single.reserved_bytes + bucket_reserved_bytes(buckets)
        return ShardedEstimate(
            peak_bytes=single.peak_bytes + buckets,
            parameters_bytes=single.parameters_bytes,
            gradients_bytes=single.gradients_bytes,
            optimizer_state_bytes=single.optimizer_state_bytes,
            activations_bytes=single.activations_bytes + buckets,
            communication_bytes=buckets,
            library_workspace_bytes=single.library_workspace_bytes,
            strategy=strategy, gpus=gpus, batch_size=batch_size, per_rank_batch_size=per_rank, micro_batch_size=micro,
            seq_len=seq_len, model=single.model, recipe=recipe.name, device=profile.describe(),
            method=f"single-GPU {single.method} at the per-rank batch + DDP gradient buckets",
            seconds=time.perf_counter() - t0, reserved_bytes=reserved,
        )
    from tfmem.adapters.fsdp import recipe_problems

    if problems := recipe_problems(recipe):
        raise RecipeError(problems, heading=f"Recipe {recipe.name!r} cannot apply under {strategy}")
    config, model_class, model_name = model_config_of(model_or_config, num_labels)
    depth = num_layers_of(config)
    if recipe.freeze.layers > depth:
        raise RecipeError(f"`freeze.layers` is {recipe.freeze.layers} but {model_name} has {depth} layers; freeze at most {depth}.")
    samples = _depth_samples(depth, recipe.freeze.layers) if extrapolate_depth else None
    if samples:
        # Per-rank bytes are affine in the number of trainable and of frozen layers (identical layers, one unit
        # each), as on one GPU (estimator._extrapolated): a base copy, and one more layer of each kind.
        (f0, t0), slopes = samples
        def run(f: int, t: int) -> _SampledStep:
            r = recipe.replace(freeze={"layers": f}) if f != recipe.freeze.layers else recipe
            return _sampled(with_depth(config, f + t), model_class, r, micro, seq_len, gpus, strategy, profile)

        base = run(f0, t0)
        more = [(extra, run(f, t)) for extra, (f, t) in slopes]
        split = {k: base.split[k] + sum(extra * (m.split[k] - base.split[k]) for extra, m in more) for k in base.split}
        peak = base.peak + sum(extra * (m.peak - base.peak) for extra, m in more)
        # The allocator's cached slack does not grow with depth (see estimator._extrapolated): the largest sample's.
        sampled = [base] + [m for _, m in more]
        slack = None if base.reserved is None else max(max(s.reserved - s.peak for s in sampled), 0)
        reserved = None if slack is None else peak + slack
        shapes = " and ".join(str(f + t) for f, t in [(f0, t0)] + [ft for _, ft in slopes])
        method = (f"fake FSDP2 steps over a fake {gpus}-rank process group, {shapes}-layer copies extrapolated to "
                  f"{depth} layers")
    else:
        step = _sampled(config, model_class, recipe, micro, seq_len, gpus, strategy, profile)
        peak, split, reserved = step.peak, step.split, step.reserved
        method = f"fake FSDP2 step over a fake {gpus}-rank process group"
    workspace = profile.library_workspace_bytes
    return ShardedEstimate(
        peak_bytes=peak + workspace,
        parameters_bytes=split["parameters"],
        gradients_bytes=split["gradients"],
        optimizer_state_bytes=split["optimizer_state"],
        activations_bytes=split["activations"],
        communication_bytes=0,
        library_workspace_bytes=workspace,
        strategy=strategy, gpus=gpus, batch_size=batch_size, per_rank_batch_size=per_rank, micro_batch_size=micro,
        seq_len=seq_len, model=model_name, recipe=recipe.name, device=profile.describe(),
        method=method,
        seconds=time.perf_counter() - t0,
        # As on one GPU (estimator.py): the workspace is one more cached block, and reserved is never below the peak.
        reserved_bytes=None if reserved is None else max(reserved + workspace, peak + workspace),
    )


def _depth_samples(depth: int, frozen: int) -> tuple[tuple[int, int], list[tuple[int, tuple[int, int]]]] | None:
    """The shallow copies a depth extrapolation samples: (frozen, trainable) layers of the base copy, and for
    each kind of layer the model has more of, (how many more, the copy with one more); None when the copies
    would be as deep as the model (estimate it at full depth).

    Example:
        >>> _depth_samples(24, 0), _depth_samples(24, 6)
        (((0, 2), [(22, (0, 3))]), ((1, 2), [(16, (1, 3)), (5, (2, 2))]))
        >>> _depth_samples(3, 0) is None
        True
    """
    trainable = depth - frozen
    f0, t0 = min(frozen, 1), min(trainable, 2)
    if f0 + t0 + (frozen > f0) + (trainable > t0) >= depth:
        return None
    slopes = []
    if trainable > t0:
        slopes.append((trainable - t0, (f0, t0 + 1)))
    if frozen > f0:
        slopes.append((frozen - f0, (f0 + 1, t0)))
    return (f0, t0), slopes


@dataclass(frozen=True)
class _SampledStep:
    """A fake sharded step's peak, its split, and the reserved bytes its allocations replay to (None on CPU)."""

    peak: int
    split: dict[str, int]
    reserved: int | None


def _sampled(config: PretrainedConfig, model_class: type[nn.Module] | None, recipe: Recipe, micro: int, seq_len: int,
             gpus: int, strategy: str, profile: DeviceProfile) -> _SampledStep:
    log = AllocationLog() if profile.rounds_allocations else None
    peak, split = fake_sharded_step(config, model_class, recipe, micro, seq_len, gpus, strategy, profile, log=log)
    return _SampledStep(peak, split, None if log is None else simulate(log.events).peak_reserved_bytes)


def bucket_reserved_bytes(bucket_bytes: int) -> int:
    """What DDP's gradient buffer adds to one rank's reserved bytes: the segment it is allocated in.

    With accelerate's defaults (`find_unused_parameters=False`) DDP's reducer starts with one bucket, a flat
    buffer of every trainable gradient, allocated when the model is wrapped and kept; after the first step
    it rebuilds 1 MiB and 25 MiB buckets in gradient order, carved from that buffer's cached segment once
    it is freed. So the buffer's own segment is what stays reserved.

    Example:
        >>> bucket_reserved_bytes(3 << 20) == 20 << 20, bucket_reserved_bytes(0)   # 3 MiB: a 20 MiB segment
        (True, 0)
    """
    return simulate([(0, bucket_bytes)]).peak_reserved_bytes if bucket_bytes > 0 else 0


def trainable_bytes(model_or_config: Any, recipe: Recipe, num_labels: int | None = None) -> int:
    """Bytes of the parameters `recipe` leaves trainable (fp32): the size of DDP's gradient buckets.

    Built on the meta device (no memory), with the recipe's freezing applied.
    """
    from tfmem.estimate.fake_step import _build
    from tfmem.techniques.freezing import apply_freezing

    config, model_class, _ = model_config_of(model_or_config, num_labels)
    with torch.device("meta"):
        model = _build(config, model_class, device_profile("cpu"))
    if recipe.freeze.enabled:
        apply_freezing(model, recipe.freeze, recipe.modules)
    seen: dict[int, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            seen[id(p)] = p.numel() * 4  # gradients are fp32 (autocast keeps fp32 weights)
    return sum(seen.values())
