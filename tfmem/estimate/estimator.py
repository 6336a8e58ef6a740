"""`estimate_memory`: the peak memory of a training step under a recipe, before training.

One fake step (see fake_step.py) of the model with the recipe applied gives the peak, its split, and the
activations each module keeps. For deep models the planner asks for `extrapolate_depth=True`: encoder
layers are identical, so each phase's bytes are affine in the number of trainable and of frozen layers;
two or three fake steps of a 2-4 layer copy give the slopes and the full depth is read off the line.
Tests check the extrapolation against full-depth fake steps.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import PretrainedConfig

from tfmem.errors import RecipeError
from tfmem.estimate import cache
from tfmem.estimate.attention import attention_of
from tfmem.estimate.device import DeviceProfile, device_profile
from tfmem.estimate.fake_step import PHASES, PhasePeak, StepMemory, num_layers_of, run_fake_step, with_depth
from tfmem.profiler.live_bytes import CATEGORIES
from tfmem.recipe import Recipe
from tfmem.techniques.accumulation import micro_batch_size
from tfmem.zoo import model_config, seq_len_problem

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

BASELINE = Recipe(name="baseline", description="no memory techniques")


@dataclass(frozen=True)
class MemoryEstimate:
    """The predicted peak memory of one training step.

    Attributes:
        peak_bytes: peak allocated bytes (on CUDA: what `torch.cuda.max_memory_allocated` reports, i.e.
            with the caching allocator's 512-byte rounding; on CPU: live tensor bytes).
        parameters_bytes, gradients_bytes, optimizer_state_bytes, activations_bytes,
            library_workspace_bytes: the peak's split (they sum to peak_bytes). Activations include every
            other tensor live at the peak (saved activations, temporaries, the batch); the workspace is
            cuBLAS's, allocated through PyTorch on CUDA (see `DeviceProfile.library_workspace_bytes`).
        reserved_bytes: peak bytes the CUDA caching allocator would hold from the driver (allocated plus
            its cached free blocks); None on CPU. Add the CUDA context (0.3-0.5 GiB) for nvidia-smi.
        per_module: activation bytes each top-level module keeps after its forward (one micro-batch).
        peak_phase: where the peak is: "forward", "optimizer", or a backward window such as
            "backward:layer:top" (see fake_step.PHASES).
        device: the target device, in words.
        model, recipe: names. batch_size (effective), micro_batch_size, seq_len: the shape estimated.
        method: "fake step" or how the depth was extrapolated.
        seconds: wall time the estimate took.
    """

    peak_bytes: int
    parameters_bytes: int
    gradients_bytes: int
    optimizer_state_bytes: int
    activations_bytes: int
    library_workspace_bytes: int
    reserved_bytes: int | None
    per_module: dict[str, int] = field(compare=False)
    peak_phase: str
    device: str
    model: str
    recipe: str
    batch_size: int
    micro_batch_size: int
    seq_len: int
    method: str
    seconds: float = field(compare=False, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (ints, strings, a dict of module bytes) for `--json` and programs."""
        return asdict(self)

    def fits(self, budget_bytes: int) -> bool:
        return self.peak_bytes <= budget_bytes


def estimate_memory(
    model_or_config: PreTrainedModel | PretrainedConfig | str,
    recipe: Recipe | str | None,
    batch_size: int,
    seq_len: int,
    device: DeviceProfile | str = "cuda",
    *,
    gpu: str | None = None,
    extrapolate_depth: bool = False,
    num_labels: int | None = None,
    padded: bool = True,
) -> MemoryEstimate:
    """Predict the peak memory of one training step of a model under a recipe, without allocating it.

    Args:
        model_or_config: a transformers model (its class and config are used; its weights are not
            touched), a config (a sequence-classification head is assumed), or a name `tfmem.zoo` knows.
        recipe: a Recipe, a shipped recipe name or a YAML path; None for no techniques.
        batch_size: the effective batch; the micro-batch is batch_size / gradient_accumulation_steps.
        seq_len: tokens per sample (batches padded to it).
        device: "cuda", "cpu" or a `DeviceProfile` (see `device_profile`).
        gpu: a GPU name (t4, a100, ...) for its capability; implies cuda.
        extrapolate_depth: estimate a 2-4 layer copy and extrapolate to the full depth (faster for deep
            models; exact when layers are identical, as in BERT-family encoders).
        num_labels: the classification head's outputs, for names and model folders; None (default) keeps the
            configuration's own: 2 for the known names, what a folder's config.json says (1 for regression,
            5 classes, ...), as `tfmem profile` builds it. A config object keeps its own `num_labels`.
        padded: batches are padded to `seq_len` (an attention mask with zeros, as `tfmem profile`'s and
            most fine-tuning batches are). False: every sample fills `seq_len` (packed or truncated text);
            the mask is all ones, transformers drops it, and 16-bit attention runs the flash kernel.

    The attention implementation is the model's or config's own when it names one
    (`attn_implementation="eager"` on the config or the model), else the device's (`device.attention`,
    sdpa by default): eager keeps the (batch, heads, seq, seq) probabilities, sdpa on CUDA does not.

    Returns:
        a `MemoryEstimate`.

    Raises:
        RecipeError: the batch does not divide by the accumulation steps, or the recipe does not apply to
            the model (more layers frozen than it has, ...).
        ValueError: bad batch size, sequence length, device or model name.

    Example:
        >>> from transformers import BertConfig
        >>> cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        ...                  vocab_size=100, max_position_embeddings=64)
        >>> est = estimate_memory(cfg, None, batch_size=2, seq_len=16, device="cpu")
        >>> est.peak_bytes == (est.parameters_bytes + est.gradients_bytes + est.optimizer_state_bytes
        ...                    + est.activations_bytes + est.library_workspace_bytes)
        True
    """
    t0 = time.perf_counter()
    config, model_class, model_name = model_config_of(model_or_config, num_labels)
    recipe = _recipe(recipe)
    profile = device_profile(device, gpu=gpu) if gpu or not isinstance(device, DeviceProfile) else device
    if (own := attention_of(config)) is not None and own != profile.attention:
        logger.info("tfmem: %s names %s attention; estimating with it", model_name, own)
        profile = dataclasses.replace(profile, attention=own)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive whole number, got {value!r}.")
    # Not `max_position_embeddings` itself: RoBERTa-family positions start after the padding index, so
    # roberta-base's 514 positions hold 512 tokens (see tfmem.zoo.max_seq_len).
    if problem := seq_len_problem(config, seq_len, model_name):
        raise ValueError(problem)
    if problems := profile.precision_problems(recipe.mixed_precision):
        logger.warning("tfmem: recipe %r: %s (estimating it anyway)", recipe.name, problems[0])
    micro = micro_batch_size(batch_size, recipe.gradient_accumulation_steps)
    depth = num_layers_of(config)
    if recipe.freeze.layers > depth:
        raise RecipeError(f"`freeze.layers` is {recipe.freeze.layers} but {model_name} has {depth} layers; freeze at most {depth}.")
    # The fake steps' result is kept on disk (cache.py): a repeated estimate reads it instead.
    material = None if cache.cache_dir() is None else \
        cache.key(config, model_class, recipe, micro, seq_len, profile, padded, extrapolate_depth)
    cached = None if material is None else cache.load(material)
    if cached is not None:
        step, method = cached
    else:
        with cache.warnings_kept() as warned:
            if extrapolate_depth:
                step, method = _extrapolated(config, model_class, recipe, micro, seq_len, profile, padded)
            else:
                step = run_fake_step(config, recipe, micro, seq_len, profile, model_class=model_class, padded=padded)
                method = "fake step"
        if material is not None:
            cache.store(material, step, method, warned)
    phase_name, peak = max(step.phases.items(), key=lambda kv: kv[1].peak_bytes)
    split = peak.breakdown
    workspace = profile.library_workspace_bytes
    peak_bytes = peak.peak_bytes + workspace
    reserved = None if step.reserved_bytes is None else max(step.reserved_bytes + workspace, peak_bytes)
    return MemoryEstimate(
        peak_bytes=peak_bytes,
        parameters_bytes=split["parameters"],
        gradients_bytes=split["gradients"],
        optimizer_state_bytes=split["optimizer_state"],
        activations_bytes=split["activations"],
        library_workspace_bytes=workspace,
        reserved_bytes=reserved,
        per_module=dict(step.per_module),
        peak_phase=phase_name,
        device=profile.describe(),
        model=model_name,
        recipe=recipe.name,
        batch_size=batch_size,
        micro_batch_size=micro,
        seq_len=seq_len,
        method=method,
        seconds=time.perf_counter() - t0,
    )


def _recipe(recipe: Recipe | str | None) -> Recipe:
    if recipe is None:
        return BASELINE
    if isinstance(recipe, Recipe):
        return recipe
    if recipe == "baseline":
        return BASELINE
    return Recipe.load(recipe)


def model_config_of(obj: Any, num_labels: int | None = None) -> tuple[PretrainedConfig, type[nn.Module] | None, str]:
    """(config, model class or None for the sequence-classification default, display name) of a model,
    a config or a name `tfmem.zoo` knows."""
    if isinstance(obj, str):
        config = model_config(obj, num_labels=num_labels)
        return config, None, obj
    if isinstance(obj, PretrainedConfig):
        if getattr(obj, "num_labels", None) is None and num_labels is not None:
            obj.num_labels = num_labels
        return obj, None, getattr(obj, "name_or_path", "") or obj.model_type
    # Looked up, not imported: a model has imported transformers' modeling code already, and a name or a
    # config should not cost its import (1-2 s) when the estimate comes from the cache.
    model_base = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    if model_base is not None and isinstance(obj, model_base):
        return obj.config, type(obj), getattr(obj.config, "name_or_path", "") or type(obj).__name__
    raise ValueError(
        f"`model_or_config` must be a transformers model, a config or a model name, got {type(obj).__name__}; "
        "for example estimate_memory('bert-base-uncased', 'bf16', 32, 128)."
    )


def _extrapolated(config, model_class, recipe: Recipe, micro: int, seq_len: int, profile: DeviceProfile,
                  padded: bool = True):
    """Fake steps of shallow copies, extrapolated to the full depth (see module docstring)."""
    depth = num_layers_of(config)
    frozen, trainable = recipe.freeze.layers, depth - recipe.freeze.layers
    f0, t0 = min(frozen, 1), min(trainable, 2)
    if f0 + t0 + (frozen > f0) + (trainable > t0) >= depth:
        return run_fake_step(config, recipe, micro, seq_len, profile, model_class=model_class, padded=padded), "fake step"

    def run(f: int, t: int) -> StepMemory:
        r = recipe.replace(freeze={"layers": f}) if f != recipe.freeze.layers else recipe
        return run_fake_step(with_depth(config, f + t), r, micro, seq_len, profile, model_class=model_class,
                             padded=padded)

    base = run(f0, t0)
    slopes = []  # (extra layers, StepMemory with one more such layer)
    if trainable > t0:
        slopes.append((trainable - t0, run(f0, t0 + 1)))
    if frozen > f0:
        slopes.append((frozen - f0, run(f0 + 1, t0)))
    phases = {}
    for phase in PHASES:
        # A phase is extrapolated when every sample has it; the middle-layer windows exist only at
        # full depth and are bounded by the top and bottom ones (see fake_step.PHASES).
        if any(phase not in s.phases for s in [base] + [m for _, m in slopes]):
            continue
        split = {}
        for cat in CATEGORIES:
            value = base.phases[phase].breakdown[cat]
            for extra, more in slopes:
                value += extra * (more.phases[phase].breakdown[cat] - base.phases[phase].breakdown[cat])
            split[cat] = value
        phases[phase] = PhasePeak(sum(split.values()), split)
    reserved = base.reserved_bytes
    if reserved is not None:
        # The allocator's cached slack (reserved - peak) does not grow with depth: it is a few blocks the
        # size of one layer's tensors, and jumps between shallow copies (bert-large bf16 + checkpointing:
        # 69 MiB at 2 layers, 190 MiB at 3, 139 MiB at 24). Extrapolating it linearly predicted 9.1 GiB
        # reserved for a 6.5 GiB step and hid that recipe from the planner; the largest sample's slack
        # over the extrapolated peak is what a full-depth fake step shows (within ~50 MiB, above it).
        samples = [base] + [m for _, m in slopes]
        slack = max(s.reserved_bytes - max(p.peak_bytes for p in s.phases.values()) for s in samples)
        reserved = max(p.peak_bytes for p in phases.values()) + max(slack, 0)
    per_module = _per_module(base, slopes, f0, t0, frozen, trainable)
    shapes = " and ".join(f"{s.num_layers}" for s in [base] + [m for _, m in slopes])
    method = f"fake steps of {shapes}-layer copies, extrapolated to {depth} layers"
    return StepMemory(phases, per_module, reserved, depth), method


_LAYER = re.compile(r"^(.*)\.(\d+)$")


def _per_module(base: StepMemory, slopes, f0: int, t0: int, frozen: int, trainable: int) -> dict[str, int]:
    # Layers are identical: a frozen layer keeps what the sample's frozen layer kept, a trainable one
    # what the sample's last trainable layer kept. Other modules are as in the sample.
    sample = slopes[0][1] if slopes else base
    layers = [(n, v) for n, v in sample.per_module.items() if _LAYER.match(n)]
    if not layers:
        return dict(sample.per_module)
    prefix = _LAYER.match(layers[0][0]).group(1)
    frozen_value = layers[0][1] if f0 else 0
    trainable_value = layers[-1][1]
    out: dict[str, int] = {}
    emitted = False
    for name, value in sample.per_module.items():
        if _LAYER.match(name):
            if not emitted:
                for i in range(frozen + trainable):
                    out[f"{prefix}.{i}"] = frozen_value if i < frozen else trainable_value
                emitted = True
            continue
        out[name] = value
    return out
