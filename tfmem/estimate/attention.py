"""Stand in CUDA's fused attention kernels when the fake step runs on a CPU.

The fake step runs on fake CPU tensors, where `scaled_dot_product_attention` in training takes the math
path and keeps (batch, heads, seq, seq) probabilities and a dropout mask for backward. On a CUDA GPU the
same call runs a fused kernel that keeps neither, which at seq 512 is the difference between fitting
and not. For a CUDA target the model is built with an attention implementation registered here
(transformers' `AttentionInterface`), whose forward and backward allocate what the CUDA kernels allocate
(PyTorch's aten/src/ATen/native/transformers/cuda):

- flash (fp16/bf16, no mask, head dim <= 256, capability 8.0+): output laid out (batch, seq, heads,
  dim) and a float32 logsumexp (batch, heads, seq) kept for backward, plus the dropout RNG state; its
  backward makes dq, dk, dv, a float32 dq accumulator (batch, seq, heads, dim) and a float32
  (batch, heads, seq) softmax-delta buffer.
- memory-efficient (otherwise: fp32, a mask, pre-Ampere GPUs): the same output and a logsumexp padded to
  a multiple of 32 positions; its backward makes dq, dk, dv and a float32 delta (batch, heads, seq).

A registered implementation (not a function mode) because checkpointing recomputes layers inside
backward, where torch-function modes are not active; the model's own attention call is.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from tfmem.estimate.device import DeviceProfile

# One registered name per kernel family: whether flash is available depends only on the capability.
AMPERE_PLUS = "tfmem_cuda_sdpa_sm80"
PRE_AMPERE = "tfmem_cuda_sdpa_sm70"


def attention_kernel(dtype: torch.dtype, has_mask: bool, head_dim: int, flash_capable: bool) -> str:
    """Which CUDA sdpa kernel trains with these inputs: "flash" or "mem_efficient".

    Example:
        >>> attention_kernel(torch.bfloat16, False, 64, True), attention_kernel(torch.float32, False, 64, True)
        ('flash', 'mem_efficient')
    """
    if dtype in (torch.float16, torch.bfloat16) and not has_mask and head_dim <= 256 and flash_capable:
        return "flash"
    return "mem_efficient"


def implementation_for(device: DeviceProfile) -> str:
    """The `attn_implementation` to build a model with for `device`'s attention."""
    if not device.fused_attention:
        return device.attention
    register()
    return PRE_AMPERE if device.capability is not None and device.capability < (8, 0) else AMPERE_PLUS


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kernel: str):
        b, h, s, d = q.shape
        out = torch.empty((b, s, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
        lse_len = s if kernel == "flash" else -(-s // 32) * 32
        lse = torch.empty((b, h, lse_len), dtype=torch.float32, device=q.device)
        rng_state = torch.empty((2,), dtype=torch.int64, device=q.device)
        ctx.kernel = kernel
        ctx.save_for_backward(q, k, v, out, lse, rng_state)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _out, _lse, _rng = ctx.saved_tensors
        b, h, s, d = q.shape
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
        if ctx.kernel == "flash":
            dq_accum = torch.empty((b, s, h, d), dtype=torch.float32, device=q.device)
            del dq_accum
        del delta
        return dq, dk, dv, None


def _forward(flash_capable: bool):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
        query, key, value = (t.to(dtype) for t in (query, key, value))
        kernel = attention_kernel(dtype, attention_mask is not None, query.shape[-1], flash_capable)
        out = _FusedAttention.apply(query, key, value, kernel)
        return out.transpose(1, 2).contiguous(), None

    return attention


_registered = False


def register() -> None:
    """Register the stand-in implementations with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    for name, flash in ((AMPERE_PLUS, True), (PRE_AMPERE, False)):
        AttentionInterface.register(name, _forward(flash))
        AttentionMaskInterface.register(name, sdpa_mask)
    _registered = True
