"""Model FLOPs utilisation (MFU): the share of the GPU's peak arithmetic a training run turns into model work.

The formula is the PaLM paper's (Chowdhery et al. 2022, appendix B), as nanoGPT's `estimate_mfu` uses it:

    training FLOPs per token = 6 * N  +  12 * L * d * T

- N: parameters that take part in matrix multiplications (embeddings excluded: a lookup is not a
  matmul). Each costs 2 FLOPs per token forward and 4 backward (gradients for inputs and weights).
  Frozen parameters get no weight gradient, so they count 4 (2 forward + 2 for the input gradient)
  instead of 6: tfmem counts `6 * N_trainable + 4 * N_frozen`. (A frozen *prefix* needs no backward at
  all; counting it at 4 keeps the formula simple and errs towards a higher MFU there.)
- 12 * L * d * T: attention scores and the weighted sum (QK^T and AV, 2 * 2 * d * T per token forward,
  times 3 for training), L layers, hidden size d, sequence length T (padded: the GPU computes padding).
- Recomputation under gradient checkpointing is *not* counted: MFU measures the model's work, so
  checkpointing lowers MFU by the recompute it adds (hardware FLOPs utilisation would count it).

MFU = FLOPs per token * processed tokens per second / peak FLOPs of the device at the precision used.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Dense (no sparsity) peak FLOP/s from the vendors' data sheets:
# (name fragment as in torch.cuda.get_device_name, fp32, tf32 tensor cores, fp16/bf16 tensor cores).
# Checked in order: more specific names first.
PEAK_FLOPS: tuple[tuple[str, float, float, float], ...] = (
    ("H200", 67e12, 494e12, 989e12),
    ("H100 PCIe", 51e12, 378e12, 756e12),
    ("H100", 67e12, 494e12, 989e12),          # SXM
    ("A100", 19.5e12, 156e12, 312e12),
    ("L40S", 91.6e12, 183e12, 362e12),
    ("L4", 30.3e12, 60e12, 121e12),
    ("A10G", 31.2e12, 62.5e12, 125e12),
    ("A10", 31.2e12, 62.5e12, 125e12),
    ("RTX 4090", 82.6e12, 82.6e12, 165e12),   # fp16 with fp32 accumulate
    ("RTX 3090", 35.6e12, 35.6e12, 71e12),
    ("V100", 15.7e12, 15.7e12, 125e12),       # no tf32: fp32 runs on CUDA cores
    ("T4", 8.1e12, 8.1e12, 65e12),
)


def peak_flops(device: torch.device | str, mixed_precision: str = "no") -> float | None:
    """Peak FLOP/s of a CUDA device at the precision training uses, or None when it is not in the table."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, fp32, tf32, half in PEAK_FLOPS:
        if fragment in name:
            if mixed_precision in ("fp16", "bf16"):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    logger.info("no peak FLOP/s known for %s; MFU is not reported (add it to tfmem.profiler.flops.PEAK_FLOPS)", name)
    return None


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Model FLOPs to train on one token at sequence length `seq_len` (formula in the module docstring).

    Example:
        >>> from torch import nn
        >>> m = nn.Linear(10, 10)           # 110 parameters, trainable, no config: no attention term
        >>> training_flops_per_token(m, 128)
        660.0
    """
    embedding_params = {id(p) for mod in model.modules() if isinstance(mod, nn.Embedding) for p in mod.parameters()}
    trainable = frozen = 0
    for p in model.parameters():
        if id(p) in embedding_params:
            continue
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    config = getattr(model, "config", None)
    layers = _first_attr(config, "num_hidden_layers", "n_layers", "n_layer") or 0
    hidden = _first_attr(config, "hidden_size", "dim", "n_embd") or 0
    return 6.0 * trainable + 4.0 * frozen + 12.0 * layers * hidden * seq_len


def _first_attr(obj, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int):
            return value
    return None
