"""How the planner ranks recipes by speed: a predicted step time, and a time per sample relative to fp32.

On a GPU (calibrated on an H200, compute capability 9.0), the host (Python, PyTorch's dispatcher, kernel
launches) and the GPU work at the same time: the host queues kernels and runs ahead, and the step waits for
whichever is slower. A step of `n` micro-batches of `m` samples of `s` tokens, with no synchronisation
inside it (fused AdamW, and GradScaler with a fused optimizer, do not synchronise: see `torch.amp.GradScaler.step`),
costs

    step = max(n x host(micro-batch), n x gpu(micro-batch) + (n - 1) x accumulate) + max(host(optimizer), gpu(optimizer))

- **gpu(micro-batch)** = units x tokens x (F / throughput[precision] + hidden x elementwise[precision])
  + `micro_batch_s`, where F is the matmul FLOPs of one layer per token (2 x (4h^2 + 2h x intermediate)
  + 4 x s x h for attention) and a *unit* is one layer's forward: a trainable layer costs 3 (forward, input
  and weight gradients), a checkpointed one 4 (its forward again), a frozen one 2, or 1 in a frozen prefix
  behind frozen embeddings (backward stops before it). bf16 and fp16 share their constants: the same
  tensor-core rate (datasheet) and 2-byte activations. fp32 and tf32 share the elementwise one (the same
  fp32 activations; tf32 only changes the matmuls). `micro_batch_s` is the per-micro-batch cost seen in the
  fp32/tf32 rows of both models (micro-batch 8 vs 32: 7-15 ms per extra micro-batch, independent of
  depth and of the matmul rate); its source is not identified, so it is fitted, as GPU time.
- **host(micro-batch)** = `host_op_s` x the PyTorch operators dispatched for one micro-batch (`HOST_OPS`:
  counted, not fitted, per layer and outside the layers, fp32 vs autocast, plain vs checkpointed), plus
  `checkpoint_host_s` per checkpointed layer: non-reentrant checkpointing runs Python (saved-tensor hooks,
  the recompute's frame, RNG state) on top of the operators it re-dispatches. A frozen layer issues 2/3 of
  a trainable one's (no weight gradients), a forward-only one 1/3. The host does not depend on the
  micro-batch size, so small 16-bit micro-batches are host-bound: bf16 at micro-batch 8 measured 4x the
  time of micro-batch 32 per sample on the H200.
- **accumulate**: every micro-batch after the first adds its gradients into `.grad` (one add per
  parameter, 12 bytes moved per trainable parameter) at the GPU's memory bandwidth (datasheet).
- **optimizer**: fused AdamW moves 28 bytes per trainable parameter (read parameter, gradient and two
  moments, write three), fp16's GradScaler 4 more (its inf check reads every gradient); host: the
  operators of `HOST_OPS["step"]`.

Precisions: fp32, tf32 (fp32 weights and activations, TF32 tensor-core matmuls), bf16 and fp16 autocast.
The capability-9.0 constants (3 throughputs, 2 elementwise costs, `micro_batch_s`, `host_op_s`,
`checkpoint_host_s`: 8 fitted numbers) are a least-squares fit on log step time to the 48 configurations
of `../shared/gpu-runs/2026-11-26-h200/speed-grid.json` (NVIDIA H200, torch 2.11, bert-base and bert-large
at batch 32 x 512, measured at tfmem commit 730a4d8); refit with
`python benchmarks/speed_model.py --grid FILE --fit`, recount the operators with `--count-ops`. Other
capabilities are NOT measured: their throughputs are scaled from the capability-9.0 fit by the ratio of
NVIDIA's datasheet dense TFLOPS of a reference card (`REFERENCE_CARDS`) to the H100's, elementwise costs
and memory traffic by memory bandwidth; the host constants (a property of the host, not the GPU) are kept.

On a CPU the model stays relative: time per sample = compute units x precision factor x micro-batch factor,
with (m x s + `cpu_overhead_tokens`) / (m x s) for the micro-batch's fixed cost. Those two CPU constants
were calibrated with `python benchmarks/speed_model.py` on the 2-core development machine (AMD EPYC with
AVX-512 bf16; bert-mini, batch 16 x 128): ~48 tokens per micro-batch, bf16 in 0.66 of the fp32 time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tfmem.estimate.device import DeviceProfile
from tfmem.recipe import Recipe

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
TF32_MIN_CAPABILITY = (8, 0)

# Fitted to ../shared/gpu-runs/2026-11-26-h200/speed-grid.json (NVIDIA H200, measured at tfmem commit
# 730a4d8) by `python benchmarks/speed_model.py --grid FILE --fit`, which prints these: least squares on
# log step time, plus a penalty on pairs measured >15% apart and predicted the other way round, matmul
# throughputs bounded by the H100/H200 datasheet peaks. Throughputs in matmul FLOP/s reached (bf16 = fp16);
# elementwise in seconds per (token x hidden) per unit (fp32 = tf32, bf16 = fp16); micro_batch_s in seconds
# of GPU time per micro-batch; host_op_s in seconds per dispatched operator; checkpoint_host_s in seconds per
# checkpointed layer and micro-batch.
H200_FIT: dict[str, Any] = {
    "throughput_flops": {"fp32": 54.82e12, "tf32": 433.0e12, "bf16": 989.0e12, "fp16": 989.0e12},
    "elementwise_s": {"fp32": 134.5e-12, "tf32": 134.5e-12, "bf16": 56.33e-12, "fp16": 56.33e-12},
    "micro_batch_s": 5.999e-3,
    "host_op_s": 14.35e-6,
    "checkpoint_host_s": 1.123e-3,
}

# PyTorch operators dispatched (aten calls, views included: each costs host time) for BERT, counted with
# `python benchmarks/speed_model.py --count-ops` (a TorchDispatchMode around training steps of a small BERT
# on the CPU, 2 vs 4 layers; attention dropout off there so the CPU takes the fused attention kernel, as
# CUDA's flash / memory-efficient kernels do with dropout on; torch 2.13, transformers 5.24). Used for every
# architecture: an encoder layer of another model dispatches a similar number. "32": fp32/tf32, "16":
# bf16/fp16 autocast (its casts: +34 per layer); "outside": embeddings, pooler, head, loss, loss scaling;
# "step": fused AdamW + zero_grad (fp16: GradScaler's inf check and update too).
HOST_OPS: dict[str, dict[str, int]] = {
    "layer": {"32": 144, "16": 178},
    "layer_checkpointed": {"32": 235, "16": 285},
    "outside": {"fp32": 72, "tf32": 72, "bf16": 84, "fp16": 86},
    "step": {"fp32": 6, "tf32": 6, "bf16": 6, "fp16": 15},
}
ADAMW_BYTES_PER_PARAM = 28  # fused AdamW: read parameter, gradient, exp_avg, exp_avg_sq (4 x 4 B), write three (3 x 4 B)
SCALER_BYTES_PER_PARAM = 4  # GradScaler's inf check reads every fp32 gradient once per step
ACCUMULATE_BYTES_PER_PARAM = 12  # `.grad += new`: read two fp32 gradients, write one

# Dense datasheet figures of one reference card per compute capability (NVIDIA product briefs):
# fp32, tf32, bf16, fp16 tensor TFLOPS (0 = not native: falls back to fp32) and memory bandwidth in GB/s.
REFERENCE_CARDS: dict[tuple[int, int], tuple[str, dict[str, float], float]] = {
    (7, 0): ("V100", {"fp32": 15.7, "tf32": 0, "bf16": 0, "fp16": 125}, 900),
    (7, 5): ("T4", {"fp32": 8.1, "tf32": 0, "bf16": 0, "fp16": 65}, 320),
    (8, 0): ("A100", {"fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312}, 1555),
    (8, 6): ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125, "fp16": 125}, 600),
    (8, 9): ("L4", {"fp32": 30.3, "tf32": 60, "bf16": 121, "fp16": 121}, 300),
    (9, 0): ("H100 SXM", {"fp32": 67, "tf32": 495, "bf16": 989, "fp16": 989}, 4800),  # bandwidth: the H200's datasheet
}
MEASURED_CAPABILITY = (9, 0)


@dataclass(frozen=True)
class ModelShape:
    """What the step time depends on: depth, hidden and feed-forward widths, vocabulary (for the parameter count).

    Example:
        >>> ModelShape.of(12).hidden_size
        768
    """

    num_layers: int
    hidden_size: int = 768
    intermediate_size: int = 3072
    vocab_size: int = 30522

    @classmethod
    def of(cls, model: ModelShape | int | Any) -> ModelShape:
        """From a shape, a depth (bert-base widths assumed) or a transformers config."""
        if isinstance(model, ModelShape):
            return model
        if isinstance(model, int):
            return cls(model)
        from tfmem.estimate.fake_step import num_layers_of

        hidden = int(getattr(model, "hidden_size", 768))
        return cls(num_layers_of(model), hidden, int(getattr(model, "intermediate_size", None) or 4 * hidden),
                   int(getattr(model, "vocab_size", None) or 30522))

    def layer_flops_per_token(self, seq_len: int) -> int:
        """Forward matmul FLOPs of one layer per token: projections, feed-forward, and attention's two products."""
        h, i = self.hidden_size, self.intermediate_size
        return 2 * (4 * h * h + 2 * h * i) + 4 * seq_len * h

    def layer_params(self) -> int:
        """Weights of one layer (projections and feed-forward; biases and norms are <1%)."""
        h, i = self.hidden_size, self.intermediate_size
        return 4 * h * h + 2 * h * i


@dataclass(frozen=True)
class GpuConstants:
    """The speed constants of one compute capability (see the module docstring)."""

    capability: tuple[int, int]
    throughput_flops: dict[str, float]
    elementwise_s: dict[str, float]
    micro_batch_s: float
    host_op_s: float
    checkpoint_host_s: float
    bandwidth_bytes_s: float
    measured: bool
    source: str

    @classmethod
    def for_capability(cls, capability: tuple[int, int] | None, fit: dict[str, Any] | None = None) -> GpuConstants:
        """The fitted constants at 9.0 (and above); below, scaled by a reference card's datasheet ratios."""
        fit = fit or H200_FIT
        cap = capability or (8, 0)  # "any CUDA GPU": planned as capability 8.0 (bf16), see cli/plan.py
        known = [c for c in REFERENCE_CARDS if c <= cap] or [min(REFERENCE_CARDS)]
        ref = max(known)
        h_card, h_tflops, h_bandwidth = REFERENCE_CARDS[MEASURED_CAPABILITY]
        host = (fit["micro_batch_s"], fit["host_op_s"], fit["checkpoint_host_s"])
        if ref >= MEASURED_CAPABILITY:
            return cls(cap, dict(fit["throughput_flops"]), dict(fit["elementwise_s"]), *host, h_bandwidth * 1e9, True,
                       "fitted to step times measured on an H200 (speed-grid.json)")
        card, tflops, bandwidth = REFERENCE_CARDS[ref]
        throughput, elementwise = {}, {}
        for p in PRECISIONS:
            native = tflops[p] > 0
            q = p if native else "fp32"  # emulated precisions run at fp32 speed (bf16 on a T4, tf32 on a V100)
            throughput[p] = fit["throughput_flops"][q] * tflops[q] / h_tflops[q]
            elementwise[p] = fit["elementwise_s"][q] * h_bandwidth / bandwidth
        return cls(cap, throughput, elementwise, *host, bandwidth * 1e9, False,
                   f"not measured: the 9.0 fit scaled by {card} vs {h_card} datasheet ratios")


@dataclass(frozen=True)
class SpeedModel:
    """The speed estimate (see the module docstring).

    Attributes:
        gpu_fit: the capability-9.0 constants (default: the H200 fit).
        cpu_overhead_tokens: fixed cost of one micro-batch on a CPU (measured).
        cpu_bf16_factor: time factor of bf16 autocast on a CPU (measured).
        recompute_units: extra units per checkpointed layer (1 = one more forward).
    """

    gpu_fit: dict[str, Any] = field(default_factory=lambda: H200_FIT)
    cpu_overhead_tokens: int = 48
    cpu_bf16_factor: float = 0.66
    recompute_units: float = 1.0

    def step_seconds(self, recipe: Recipe, model: ModelShape | int | Any, batch_size: int, seq_len: int,
                     device: DeviceProfile, *, tf32: bool = False) -> float:
        """Predicted seconds per optimizer step on a CUDA `device` (ValueError on CPU: only relative there).

        Example:
            >>> from tfmem.estimate.device import device_profile
            >>> h100 = device_profile(gpu="h100")
            >>> fast = SpeedModel().step_seconds(Recipe(name="b").replace(mixed_precision="bf16"), 12, 32, 512, h100)
            >>> slow = SpeedModel().step_seconds(Recipe(name="f"), 12, 32, 512, h100)
            >>> fast < slow / 3
            True
        """
        if device.type != "cuda":
            raise ValueError(f"step_seconds needs a CUDA device; got {device.type!r} (use relative_time on a CPU).")
        shape = ModelShape.of(model)
        k = GpuConstants.for_capability(device.capability, self.gpu_fit)
        p = precision_key(recipe, tf32, device)
        n = recipe.gradient_accumulation_steps
        micro = batch_size // n
        units, plain, recomputed = self._units(recipe, shape.num_layers)
        tokens = micro * seq_len
        gpu = units * tokens * (shape.layer_flops_per_token(seq_len) / k.throughput_flops[p]
                                + shape.hidden_size * k.elementwise_s[p]) + k.micro_batch_s
        width = "16" if p in ("bf16", "fp16") else "32"
        host = (k.host_op_s * (plain * HOST_OPS["layer"][width] + recomputed * HOST_OPS["layer_checkpointed"][width]
                               + HOST_OPS["outside"][p]) + recomputed * k.checkpoint_host_s)
        params = self._trainable_params(recipe, shape)
        accumulate = ACCUMULATE_BYTES_PER_PARAM * params / k.bandwidth_bytes_s
        optimizer_bytes = (ADAMW_BYTES_PER_PARAM + (SCALER_BYTES_PER_PARAM if p == "fp16" else 0)) * params
        optimizer = max(k.host_op_s * HOST_OPS["step"][p], optimizer_bytes / k.bandwidth_bytes_s)
        return max(n * host, n * gpu + (n - 1) * accumulate) + optimizer

    def relative_time(self, recipe: Recipe, model: ModelShape | int | Any, batch_size: int, seq_len: int,
                      device: DeviceProfile, *, tf32: bool = False) -> float:
        """Estimated time per sample of `recipe` relative to fp32 without techniques at the same batch.

        Example:
            >>> from tfmem.estimate.device import device_profile
            >>> m, cpu = SpeedModel(), device_profile("cpu")
            >>> round(m.relative_time(Recipe(name="c").replace(gradient_checkpointing=True), 12, 32, 512, cpu), 2)
            1.33
        """
        if device.type == "cuda":
            base = Recipe(name="baseline")
            return (self.step_seconds(recipe, model, batch_size, seq_len, device, tf32=tf32)
                    / self.step_seconds(base, model, batch_size, seq_len, device))
        layers = ModelShape.of(model).num_layers
        units, _, _ = self._units(recipe, layers)
        compute = units / (3.0 * layers)
        micro = batch_size // recipe.gradient_accumulation_steps
        base_tokens, micro_tokens = batch_size * seq_len, micro * seq_len
        overhead = self.cpu_overhead_tokens
        efficiency = ((micro_tokens + overhead) / micro_tokens) / ((base_tokens + overhead) / base_tokens)
        factor = self.cpu_bf16_factor if recipe.mixed_precision == "bf16" else 1.0
        return compute * factor * efficiency

    @staticmethod
    def _trainable_params(recipe: Recipe, shape: ModelShape) -> int:
        frozen = min(recipe.freeze.layers, shape.num_layers)
        embeddings = 0 if recipe.freeze.embeddings else shape.vocab_size * shape.hidden_size
        return (shape.num_layers - frozen) * shape.layer_params() + embeddings

    def _units(self, recipe: Recipe, num_layers: int) -> tuple[float, float, float]:
        """(compute units, host weight of layers not checkpointed, of checkpointed ones) summed over layers.

        A trainable layer is 3 units (4 checkpointed) and host weight 1; a frozen one dispatches 2/3 of the
        operators (no weight gradients), a frozen prefix behind frozen embeddings 1/3 (forward only)."""
        frozen = min(recipe.freeze.layers, num_layers)
        prefix_stops_backward = recipe.freeze.embeddings
        ckpt = recipe.gradient_checkpointing
        units = plain = checkpointed = 0.0
        for i in range(num_layers):
            if i < frozen and prefix_stops_backward:
                u, recomputed = 1.0, False  # forward only; not checkpointed (nothing saved for backward)
            elif i < frozen:
                u, recomputed = 2.0, ckpt
            else:
                u, recomputed = 3.0, ckpt
            units += u + (self.recompute_units if recomputed else 0.0)
            if recomputed:
                checkpointed += u / 3.0
            else:
                plain += u / 3.0
        return units, plain, checkpointed


def precision_key(recipe: Recipe, tf32: bool, device: DeviceProfile) -> str:
    """'fp32', 'tf32', 'bf16' or 'fp16' for a recipe; tf32 comes from the argument or a recipe's `tf32` key."""
    if recipe.mixed_precision != "no":
        return recipe.mixed_precision
    wants = tf32 or getattr(recipe, "tf32", False) is True  # the recipe key is a bool (issue 8)
    return "tf32" if wants and tf32_available(device) else "fp32"


def tf32_available(device: DeviceProfile) -> bool:
    """TF32 matmuls need an Ampere or newer GPU (capability 8.0)."""
    return device.type == "cuda" and (device.capability is None or device.capability >= TF32_MIN_CAPABILITY)


def speed_note(device: DeviceProfile, model: SpeedModel | None = None) -> str:
    """One sentence on what the ranking rests on for `device`, for the CLI."""
    m = model or SpeedModel()
    if device.type == "cpu":
        return (f"bf16 x{m.cpu_bf16_factor} and a fixed cost of ~{m.cpu_overhead_tokens} tokens per micro-batch, measured "
                "on a 2-core EPYC with benchmarks/speed_model.py; checkpointing +1 forward per layer (~+33%), a "
                "documented default (see tfmem/estimate/speed.py).")
    k = GpuConstants.for_capability(device.capability, m.gpu_fit)
    cap = f"{k.capability[0]}.{k.capability[1]}"
    return (f"step time = the slower of the GPU's work (matmul FLOPs / throughput + elementwise work) and the "
            f"host's (PyTorch operators dispatched x time per operator, more for checkpointed layers), summed over "
            f"the micro-batches, + the optimizer; checkpointing re-runs each forward; constants for capability {cap}: "
            f"{k.source} (see tfmem/estimate/speed.py).")
