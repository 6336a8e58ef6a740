"""Helpers for FSDP2 tests under a 2-process CPU launch (gloo).

accelerate does not shard on a CPU: given a CPU device it sets up `MULTI_CPU` and ignores the FSDP
plugin (its FSDP branch is for accelerators only). FSDP2 itself runs on CPU with gloo, so these
helpers select accelerate's FSDP path explicitly after the `Accelerator` exists; everything after
that (`accelerator.prepare` → `fully_shard`, `accumulate` → `set_requires_gradient_sync`) is
accelerate's and PyTorch's own code.
"""

from __future__ import annotations

import copy

import torch


def force_fsdp(accelerator, plugin) -> None:
    """Make `accelerator` (built on CPU) take its FSDP path with `plugin`."""
    from accelerate.utils import DistributedType

    def select() -> None:
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin

    select()
    # `prepare` rebuilds the process state, which puts MULTI_CPU back; without selecting FSDP again
    # `accumulate` would not turn gradient sync off (`set_requires_gradient_sync`) between micro-batches.
    prepare = accelerator.prepare

    def prepare_then_select(*args, **kwargs):
        out = prepare(*args, **kwargs)
        select()
        return out

    accelerator.prepare = prepare_then_select


def fsdp_trainer_class():
    """A `transformers.Trainer` whose accelerator takes the FSDP path on CPU (see the module docstring)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import Trainer

    class CpuFsdpTrainer(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if self.args.fsdp_plugin_args is not None:
                force_fsdp(self.accelerator, FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args))
                self.is_fsdp_enabled = True

    return CpuFsdpTrainer


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as one full tensor (DTensor shards gathered: a collective), by its original name."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = t.detach().clone()
    return out


def sgd_reference_step(model: torch.nn.Module, grads: dict[str, torch.Tensor], lr: float) -> torch.nn.Module:
    """A copy of `model` after one plain SGD step with `grads` (parameters without a gradient unchanged)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in grads:
                p -= lr * grads[name]
    return model
