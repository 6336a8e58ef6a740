"""Rank 0's memory over one steady-state FSDP2 step, on fake tensors: what `per_rank.estimate_sharded` rests on.

    shard_like_accelerate(model, strategy, recipe, mesh)   # fully_shard into the units accelerate makes
    fake_sharded_step(config, model_class, recipe, micro, seq_len, gpus, strategy, profile) -> (peak, split)

A fake process group of `gpus` ranks stands for the launch: the collectives move no data, so the step runs on
one CPU and counts what rank 0 holds (its parameter and optimizer shards, the gathered units, the gradients
before their reduce-scatter). Kept apart from `per_rank`, which turns these figures into an estimate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from tfmem.errors import RecipeError
from tfmem.estimate.device import DeviceProfile
from tfmem.estimate.tracking import AllocationLog
from tfmem.recipe import Recipe


def shard_like_accelerate(model: nn.Module, strategy: str, recipe: Recipe, mesh: Any) -> nn.Module:
    """Shard `model` with `fully_shard` into the units `accelerate.prepare` makes (FSDP2), in place.

    Each encoder layer is a unit; the input embeddings are a unit (unless tied to the output layer); the
    final norm and output embeddings a unit kept gathered after forward; the rest goes with the root.
    """
    from torch.distributed.fsdp import fully_shard

    from tfmem.adapters.fsdp import STRATEGIES as RESHARD
    from tfmem.adapters.fsdp import mixed_precision_policy
    from tfmem.techniques.architecture import find_backbone

    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": RESHARD[strategy]}
    if (policy := mixed_precision_policy(recipe)) is not None:
        kwargs["mp_policy"] = policy
    for layer in find_backbone(model, recipe.modules).layers:
        fully_shard(layer, **kwargs)
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = inputs is not None and outputs is not None and getattr(inputs, "weight", None) is getattr(outputs, "weight", 0)
    if inputs is not None and not tied:
        fully_shard(inputs, **kwargs)
    tail = [m for m in ((inputs, outputs) if tied else (outputs,)) if m is not None]
    if tail:
        fully_shard(tail, **{**kwargs, "reshard_after_forward": False})
    root = {k: v for k, v in kwargs.items() if k != "reshard_after_forward"}
    fully_shard(model, **root)
    return model


def fake_sharded_step(
    config: PretrainedConfig,
    model_class: type[nn.Module] | None,
    recipe: Recipe,
    micro: int,
    seq_len: int,
    gpus: int,
    strategy: str,
    profile: DeviceProfile,
    *,
    log: AllocationLog | None = None,
) -> tuple[int, dict[str, int]]:
    """Peak live bytes of rank 0 and its split, over a steady-state FSDP2 step on fake tensors.

    `log`, when given, is told of every allocation and free of the measured step, in order (for
    `allocator.simulate`'s reserved figure).
    """
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as e:  # pragma: no cover - stripped builds
        raise ValueError(f"this PyTorch build has no fake process group ({e}); cannot estimate FSDP.") from None
    if dist.is_initialized():
        raise ValueError(
            "a torch.distributed process group already exists in this process; run the sharded estimate outside "
            "the distributed launch (for example `tfmem estimate --gpus N` on the command line)."
        )
    from tfmem.estimate.fake_step import _batch, _build
    from tfmem.profiler.live_bytes import LiveBytes

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        mesh = init_device_mesh("cpu", (gpus,))  # outside fake mode: the mesh reads real rank tensors
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with fake:
            model = _build(config, model_class, profile)
            recipe.prepare_model(model)
            model.train()
            shard_like_accelerate(model, strategy, recipe, mesh)
            trainable = [p for p in model.parameters() if p.requires_grad]
            if not trainable:
                raise ValueError("the recipe freezes every parameter; there is nothing to train. Freeze fewer layers.")
            optimizer = _sharded_optimizer(recipe, trainable)
            batch = _batch(model, config, micro, seq_len)
            steps = recipe.gradient_accumulation_steps
            size_of = _rounding(profile)
            tracker = None
            for step in range(2):  # the second step is the steady state (AdamW state exists)
                if step == 1:
                    tracker = LiveBytes(size_of=size_of, observer=log)
                    tracker.track(model, optimizer, batch)
                    tracker.__enter__()
                for i in range(steps):
                    # accelerate's `accumulate`: no gradient sync until the window's last micro-batch.
                    model.set_requires_gradient_sync(i == steps - 1)
                    model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            assert tracker is not None
            tracker.__exit__(None, None, None)
            return tracker.peak_bytes, tracker.peak_breakdown
    finally:
        dist.destroy_process_group()


def _sharded_optimizer(recipe: Recipe, trainable: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The recipe's optimizer over FSDP2's sharded parameters: AdamW, its state sharded with them (1/N each)."""
    if recipe.optimizer.name != "adamw":  # refused before (recipe_problems): they fail on DTensors
        raise RecipeError(f"`optimizer` {recipe.optimizer.name!r} cannot be estimated under FSDP; use `optimizer: adamw`.")
    return torch.optim.AdamW(trainable, lr=1e-5, foreach=True)


def _rounding(profile: DeviceProfile):
    if not profile.rounds_allocations:
        return None
    from tfmem.estimate.allocator import round_allocation

    return round_allocation
