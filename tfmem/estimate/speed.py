"""How the planner ranks recipes by speed: a relative time per sample, 1.0 = fp32, no techniques.

    time per sample = compute(layers) x precision factor x micro-batch factor

- **compute**: a layer costs 1 unit forward and 2 backward (input and weight gradients), so 3 per
  trainable layer. Checkpointing adds one forward (+1) to each checkpointed layer: +33%. A frozen layer
  skips its weight gradients (2 units); in a frozen prefix behind frozen embeddings backward stops
  before it (1 unit, and it is not checkpointed). Normalised by 3 x layers.
- **precision**: fp16/bf16 autocast runs matrix work on tensor cores; end-to-end BERT fine-tuning steps
  are about 2x faster on Volta and newer (0.5). On a CPU, bf16 measured 0.66 (fp16 is never planned there).
- **micro-batch**: each forward/backward has a fixed cost (kernel launches, small kernels that do not
  fill the device) worth about `OVERHEAD_TOKENS` tokens of work, so a micro-batch of m samples of s
  tokens costs (m*s + OVERHEAD_TOKENS) / (m*s) per token. Accumulation keeps the effective batch but
  runs smaller micro-batches, so it is slower only through this term.

The GPU constants are documented defaults, not measurements of the user's GPU; the ranking only needs
them to order recipes, and their orders of magnitude (checkpointing ~1.33x, mixed precision ~0.5x,
micro-batches under ~1-2k tokens lose efficiency) are the commonly measured ones. The CPU constants were
calibrated with `python benchmarks/speed_model.py` on the 2-core development machine (AMD EPYC with
AVX-512 bf16; bert-mini, batch 16 x 128): a micro-batch's fixed cost is about 48 tokens there, not 2048,
and bf16 runs in 0.66 of the fp32 time. `benchmarks/speed_model.py --device cuda` measures the GPU
side. Override any of them with `SpeedModel(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tfmem.estimate.device import DeviceProfile
from tfmem.recipe import Recipe


@dataclass(frozen=True)
class SpeedModel:
    """The constants of the speed estimate (see the module docstring).

    Attributes:
        overhead_tokens: fixed cost of one micro-batch on a GPU, in tokens of work.
        mixed_precision_factor: time factor of fp16/bf16 on a GPU with tensor cores (capability 7.0+).
        recompute_units: extra units per checkpointed layer (1 = one more forward).
        cpu_overhead_tokens: fixed cost of one micro-batch on a CPU (measured).
        cpu_bf16_factor: time factor of bf16 autocast on a CPU (measured).
    """

    overhead_tokens: int = 2048
    mixed_precision_factor: float = 0.5
    recompute_units: float = 1.0
    cpu_overhead_tokens: int = 48
    cpu_bf16_factor: float = 0.66

    def relative_time(self, recipe: Recipe, num_layers: int, batch_size: int, seq_len: int, device: DeviceProfile) -> float:
        """Estimated time per sample of `recipe` relative to fp32 without techniques at the same batch.

        Example:
            >>> from tfmem.estimate.device import device_profile
            >>> m, cuda = SpeedModel(), device_profile("cuda", capability="8.0")
            >>> round(m.relative_time(Recipe(name="c").replace(gradient_checkpointing=True), 12, 32, 512, cuda), 2)
            1.33
        """
        frozen = min(recipe.freeze.layers, num_layers)
        prefix_stops_backward = recipe.freeze.embeddings
        units = 0.0
        for i in range(num_layers):
            if i < frozen:
                units += 1.0 if prefix_stops_backward else 2.0
                if not prefix_stops_backward and recipe.gradient_checkpointing:
                    units += self.recompute_units
            else:
                units += 3.0 + (self.recompute_units if recipe.gradient_checkpointing else 0.0)
        compute = units / (3.0 * num_layers)
        micro = batch_size // recipe.gradient_accumulation_steps
        base_tokens = batch_size * seq_len
        micro_tokens = micro * seq_len
        overhead = self.cpu_overhead_tokens if device.type == "cpu" else self.overhead_tokens
        efficiency = ((micro_tokens + overhead) / micro_tokens) / ((base_tokens + overhead) / base_tokens)
        return compute * self.precision_factor(recipe.mixed_precision, device) * efficiency

    def precision_factor(self, mode: str, device: DeviceProfile) -> float:
        if mode == "no":
            return 1.0
        if device.type == "cpu":
            return self.cpu_bf16_factor if mode == "bf16" else 1.0
        if device.type != "cuda":
            return 1.0
        if device.capability is not None and device.capability < (7, 0):
            return 1.0
        return self.mixed_precision_factor
