"""Run one training step of the real model on fake tensors and account its memory.

The model is built from its configuration under `FakeTensorMode`: every parameter, activation and
gradient has its real shape, dtype and byte count but no data, so a bert-large step at batch 32 costs
the same few seconds as one at batch 1, and nothing is allocated. The step is the one a training loop
runs, with the recipe applied by the same code training uses (`Recipe.prepare_model` freezes and
checkpoints), and the profiler's `LiveBytes` accounting watches it (with the CUDA allocator's rounding
and an allocation log for the reserved figure, see tracking.py).

The step measured is a steady-state one, the worst micro-batch of an optimizer step:

- The optimizer's state already exists (after the first step it always does); see `build_optimizer`.
  AdamW: exp_avg and exp_avg_sq per trainable parameter, plus its step counter (a device tensor for
  the fused CUDA optimizer, transformers' default there). Other optimizers (`optimizer: adamw-8bit |
  adafactor`) keep their own state: see optimizer_state.py.
- With accumulation, the gradients of the earlier micro-batches are live while this one runs forward.
- forward under autocast for fp16/bf16 (weights stay fp32; autocast's cast copies live until backward),
  loss, backward, `optimizer.step()`, `zero_grad(set_to_none=True)`.
- The batch is `seq_len` tokens per sample. Padded (the default, as the profiler's batches are): the
  attention mask has zeros, so transformers builds a (batch, 1, seq, seq) mask and sdpa keeps it. Not
  padded (every sample fills `seq_len`): the mask is all ones and transformers drops it before
  attention (see attention.py), so the model is called without one.
- For a CUDA target, the CUDA kernels' own allocations replace the CPU ones where they differ (dropout's
  mask, reduction staging buffers, fused attention: kernels.py, attention.py).

Not modelled here: the CUDA context (outside PyTorch's allocator), cuBLAS workspaces (added by the
estimator, see `DeviceProfile.library_workspace_bytes`), GradScaler's few scalars, data-loader tensors of
the next batch.
"""

from __future__ import annotations

import copy
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from tfmem.estimate.allocator import simulate
from tfmem.estimate.attention import implementation_for
from tfmem.estimate.device import DeviceProfile
from tfmem.estimate.kernels import CudaKernelTemporaries, cuda_dropout
from tfmem.estimate.optimizer_state import fake_optimizer
from tfmem.estimate.tracking import AllocationLog, device_live_bytes
from tfmem.prepare import prepare
from tfmem.profiler.batches import zero_labels
from tfmem.profiler.live_bytes import LiveBytes
from tfmem.recipe import Recipe
from tfmem.techniques.precision import autocast_dtype

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

# Phases of the step, peaked separately, because the depth extrapolation needs quantities that grow
# linearly with depth, and the peak of a whole step does not: the forward's end (autocast's weight
# cache) can overtake the backward's start, and within backward the top layer's window (all activations,
# no gradients yet) can overtake the bottom layer's (all gradients) as layers are added. Backward is
# split at each encoder layer (a gradient hook on the layer's output fires when its backward starts):
#   backward:head                       loss and head, before the top layer
#   backward:layer:top / :bottom        the top and the bottom trainable layer (bottom: + embeddings)
#   backward:frozen:top / :bottom       same for layers frozen behind trainable embeddings
#   backward:layer:middle / frozen:middle   the others (bounded by top and bottom: bytes are linear
#                                       in the layer index between them)
# Each of these is affine in the number of trainable and frozen layers.
PHASES = ("forward", "backward:head", "backward:layer:top", "backward:layer:middle", "backward:layer:bottom",
          "backward:frozen:top", "backward:frozen:middle", "backward:frozen:bottom", "optimizer")


@dataclass(frozen=True)
class PhasePeak:
    """The peak of one phase of the step and its split into CATEGORIES (bytes)."""

    peak_bytes: int
    breakdown: dict[str, int]


@dataclass(frozen=True)
class StepMemory:
    """What one fake step measured.

    Attributes:
        phases: peak and breakdown of each of PHASES.
        per_module: activation bytes each top-level module (embeddings, each layer, head) left alive
            after its forward, in forward order.
        reserved_bytes: peak reserved by the simulated CUDA caching allocator; None on CPU.
        num_layers: encoder layers of the model that ran.
    """

    phases: dict[str, PhasePeak]
    per_module: dict[str, int]
    reserved_bytes: int | None
    num_layers: int

    @property
    def peak(self) -> PhasePeak:
        return max(self.phases.values(), key=lambda p: p.peak_bytes)


def num_layers_of(config: PretrainedConfig) -> int:
    """The encoder depth of a config (BERT's num_hidden_layers, DistilBERT's n_layers, ...).

    Raises:
        ValueError: the config has no layer count tfmem knows.
    """
    for name in ("num_hidden_layers", "n_layers", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the number of layers of {type(config).__name__}; it has no `num_hidden_layers`.")


def with_depth(config: PretrainedConfig, num_layers: int) -> PretrainedConfig:
    """A copy of `config` with `num_layers` encoder layers."""
    config = copy.deepcopy(config)
    for name in ("num_hidden_layers", "n_layers", "num_layers"):
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, num_layers)
            return config
    raise ValueError(f"cannot set the number of layers of {type(config).__name__}.")


def run_fake_step(
    config: PretrainedConfig,
    recipe: Recipe,
    micro_batch_size: int,
    seq_len: int,
    device: DeviceProfile,
    *,
    model_class: type[nn.Module] | None = None,
    record_reserved: bool = True,
    padded: bool = True,
) -> StepMemory:
    """Build the model on fake tensors, apply `recipe`, run one steady-state step, account its memory.

    Args:
        config: the model's configuration (its depth is used as is; see `with_depth`).
        recipe: freezing, checkpointing and precision are applied; accumulation decides whether earlier
            micro-batches' gradients are live (the micro-batch size is given separately).
        micro_batch_size: samples per forward/backward.
        seq_len: tokens per sample (padded).
        device: the target device profile.
        model_class: a transformers model class; default AutoModelForSequenceClassification.
        record_reserved: simulate the CUDA allocator's reserved bytes (CUDA targets only).
        padded: batches carry padding (an attention mask with zeros); False: every sample is `seq_len`
            tokens, the mask is all ones and transformers drops it.

    Raises:
        RecipeError: the recipe does not apply to this model (from `tfmem.prepare.prepare`).
    """
    fake = FakeTensorMode(allow_non_fake_inputs=False)
    cast = autocast_dtype(recipe.mixed_precision)
    # A copy: building a model writes its attention implementation into the config, and the caller's
    # config must not come back naming tfmem's stand-in.
    config = copy.deepcopy(config)
    with fake:
        model = _build(config, model_class, device)
        prepare(model, recipe)  # quietly: the planner prepares many candidates, none of them the user's model
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(trainable, device, recipe.optimizer.name, model)
        if recipe.gradient_accumulation_steps > 1:
            for p in trainable:  # the earlier micro-batches' gradients
                p.grad = torch.zeros_like(p)
        batch = _batch(model, config, micro_batch_size, seq_len)
    inputs = batch if padded else {k: v for k, v in batch.items() if k != "attention_mask"}

    log = AllocationLog() if record_reserved and device.rounds_allocations else None
    tracker = device_live_bytes(device, log)
    tracker.track(model, optimizer, batch)
    per_module: dict[str, int] = {}
    hooks = _module_hooks(model, tracker, per_module)
    phases: dict[str, PhasePeak] = {}
    windows = _BackwardWindows(tracker, phases)
    _layer_window_hooks(model, hooks, windows, recipe.freeze.layers)
    try:
        with ExitStack() as stack:
            stack.enter_context(fake)
            stack.enter_context(tracker)
            if device.type == "cuda":
                stack.enter_context(cuda_dropout())
                stack.enter_context(CudaKernelTemporaries(device))  # inside the tracker: it counts them
            hooks.active = True
            if cast is not None:
                with torch.autocast("cpu", dtype=cast):
                    loss = model(**inputs).loss
            else:
                loss = model(**inputs).loss
            hooks.active = False
            phases["forward"] = PhasePeak(tracker.peak_bytes, tracker.peak_breakdown)
            tracker.reset_peak()
            windows.start("backward:head")
            loss.backward()
            del loss
            windows.close()
            tracker.reset_peak()
            optimizer.step()
            # Read the split at the end of the step, before zero_grad frees the gradients: the optimizer
            # phase's peak is the one standing now.
            phases["optimizer"] = PhasePeak(tracker.peak_bytes, tracker.peak_breakdown)
            optimizer.zero_grad(set_to_none=True)
    finally:
        hooks.remove()
    reserved = simulate(log.events).peak_reserved_bytes if log is not None else None
    return StepMemory(
        phases=phases,
        per_module=per_module,
        reserved_bytes=reserved,
        num_layers=num_layers_of(config),
    )


def _build(config: PretrainedConfig, model_class: type[nn.Module] | None, device: DeviceProfile) -> nn.Module:
    # Imported here, where a model is built: transformers' modeling code takes 1-2 s to import, and the
    # estimator answers from its cache without it (see cache.py).
    from transformers import AutoModelForSequenceClassification

    cls = model_class or AutoModelForSequenceClassification
    build = cls.from_config if cls is AutoModelForSequenceClassification else cls._from_config
    try:
        return build(config, attn_implementation=implementation_for(device))
    except (ValueError, ImportError) as e:
        if device.attention != "eager":
            logger.warning("tfmem: %s has no %s attention (%s); estimating with eager attention", cls.__name__, device.attention, e)
            return build(config, attn_implementation="eager")
        raise


def build_optimizer(params: list[nn.Parameter], device: DeviceProfile, name: str = "adamw",
                    model: nn.Module | None = None) -> torch.optim.Optimizer:
    """The optimizer a training run on `device` uses, with its state as it stands after the first step.

    AdamW as transformers' Trainer builds it by default: `adamw_torch_fused` on CUDA, plain
    `torch.optim.AdamW` (for-loop) on CPU. One step on zero gradients creates the state exactly as the
    optimizer itself lays it out (exp_avg, exp_avg_sq and the step counter per parameter). `name`
    "adamw-8bit" or "adafactor" (the recipe's `optimizer`) builds theirs instead (see optimizer_state.py).

    Raises:
        ValueError: nothing to train.
    """
    if not params:
        raise ValueError("the recipe freezes every parameter; there is nothing to train. Freeze fewer layers.")
    impl = device.optimizer_impl
    if name != "adamw":  # adamw-8bit (needs the model: its embeddings stay 32-bit), adafactor
        optimizer = fake_optimizer(name, model, params)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=impl == "fused" or None,
                                      foreach=False if impl == "for-loop" else None)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _batch(model: nn.Module, config: PretrainedConfig, size: int, seq_len: int) -> dict[str, torch.Tensor]:
    vocab = getattr(config, "vocab_size", 2)
    batch = {
        "input_ids": torch.randint(0, vocab, (size, seq_len)),
        "attention_mask": torch.ones((size, seq_len), dtype=torch.long),
    }
    name = type(model).__name__
    if "SequenceClassification" in name:
        batch["labels"] = zero_labels(size, config.num_labels, getattr(config, "problem_type", None))  # as its loss reads them
    else:  # token-level heads (MaskedLM, TokenClassification, CausalLM)
        batch["labels"] = torch.zeros((size, seq_len), dtype=torch.long)
    return batch


def top_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules a breakdown is given for: every encoder layer, and the other blocks around them.

    The encoder layers are the longest `nn.ModuleList`; the path down to it is opened up, so BERT gives
    bert.embeddings, bert.encoder.layer.0 ... N-1, bert.pooler, dropout, classifier.
    """
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return list(model.named_children())
    layers_path = max(lists, key=lambda item: len(item[1]))[0]
    out: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path == layers_path:
                out.extend((f"{path}.{i}", layer) for i, layer in enumerate(child))
            elif layers_path.startswith(path + "."):
                visit(path + ".", child)
            else:
                out.append((path, child))

    visit("", model)
    return out


class _Hooks:
    def __init__(self) -> None:
        self.active = False
        self.handles: list = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _module_hooks(model: nn.Module, tracker: LiveBytes, out: dict[str, int]) -> _Hooks:
    hooks = _Hooks()
    start: dict[str, int] = {}
    for name, module in top_modules(model):
        out[name] = 0

        def pre(_m, _args, name=name):
            if hooks.active:
                start[name] = tracker.current_bytes

        def post(_m, _args, _out, name=name):
            if hooks.active and name in start:
                out[name] += max(0, tracker.current_bytes - start.pop(name))

        hooks.handles.append(module.register_forward_pre_hook(pre))
        hooks.handles.append(module.register_forward_hook(post))
    return hooks


class _BackwardWindows:
    """Splits backward into windows at layer boundaries and keeps each window role's peak."""

    def __init__(self, tracker: LiveBytes, phases: dict[str, PhasePeak]) -> None:
        self.tracker = tracker
        self.phases = phases
        self.current: tuple[str, ...] = ()

    def start(self, *names: str) -> None:
        self.current = names

    def boundary(self, *names: str) -> None:
        self.close()
        self.tracker.reset_peak()
        self.current = names

    def close(self) -> None:
        peak = PhasePeak(self.tracker.peak_bytes, self.tracker.peak_breakdown)
        for name in self.current:
            if name not in self.phases or self.phases[name].peak_bytes < peak.peak_bytes:
                self.phases[name] = peak
        self.current = ()


def _layer_roles(index: int, num_layers: int, frozen: int) -> tuple[str, ...]:
    kind, first, last = ("frozen", 0, frozen - 1) if index < frozen else ("layer", frozen, num_layers - 1)
    roles = tuple(f"backward:{kind}:{pos}" for pos, at in (("top", last), ("bottom", first)) if index == at)
    return roles or (f"backward:{kind}:middle",)


def _layer_window_hooks(model: nn.Module, hooks: _Hooks, windows: _BackwardWindows, frozen: int) -> None:
    layers = [m for name, m in top_modules(model) if _is_layer_name(name)]

    for index, layer in enumerate(layers):
        roles = _layer_roles(index, len(layers), frozen)

        def on_output(_m, _args, output, roles=roles):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if hooks.active and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda grad, roles=roles: windows.boundary(*roles))

        hooks.handles.append(layer.register_forward_hook(on_output))


def _is_layer_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].isdigit()
