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
  a multiple of 32 positions, plus, with a mask, the additive float mask sdpa makes from transformers'
  boolean one (kept for backward, one per layer); its backward makes dq, dk, dv, an output-sized
  temporary, a float32 delta (batch, heads, seq) and a float32 q-sized workspace (the H200 allocator
  trace of bert-base, ../shared/gpu-runs/2026-11-26-h200/snapshot-bert-base-b32-s512.pickle.gz).

Masks: transformers drops an all-ones attention mask before sdpa (masking_utils.
`_ignore_bidirectional_mask_sdpa`, which reads the mask's values), so an unpadded batch runs flash in
16-bit. On fake tensors it cannot read them and keeps the mask; the fake step therefore passes no mask
for unpadded batches (see fake_step.py) and the mask it passes for padded ones is a real one.

A registered implementation (not a function mode) because checkpointing recomputes layers inside
backward, where torch-function modes are not active; the model's own attention call is.
"""

from __future__ import annotations

import torch

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


def attention_of(config) -> str | None:
    """The attention a model or config says it runs, as tfmem models it: "eager", "sdpa", or None when it
    names none (a fresh config: transformers then picks sdpa, the device default).

    A model's config always names one (`from_config` writes it); a config names one when built with
    `attn_implementation=...`. Flash-attention and flex implementations keep no (seq x seq) tensor, as
    sdpa's fused kernels do, so they are estimated as sdpa; tfmem's own stand-ins (a config an estimate
    ran on) name nothing.

    Example:
        >>> from transformers import BertConfig
        >>> attention_of(BertConfig()), attention_of(BertConfig(attn_implementation="eager"))
        (None, 'eager')
    """
    name = getattr(config, "_attn_implementation", None)
    if not isinstance(name, str) or name.startswith("tfmem_"):
        return None
    return "eager" if name == "eager" else "sdpa"


def implementation_for(device: DeviceProfile) -> str:
    """The `attn_implementation` to build a model with for `device`'s attention."""
    if not device.fused_attention:
        return device.attention
    register()
    return PRE_AMPERE if device.capability is not None and device.capability < (8, 0) else AMPERE_PLUS


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, kernel: str):
        b, h, s, d = q.shape
        out = torch.empty((b, s, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
        lse_len = s if kernel == "flash" else -(-s // 32) * 32
        lse = torch.empty((b, h, lse_len), dtype=torch.float32, device=q.device)
        rng_state = torch.empty((2,), dtype=torch.int64, device=q.device)
        ctx.kernel = kernel
        saved = (q, k, v, out, lse, rng_state) + ((bias,) if bias is not None else ())
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors[:5]
        b, h, s, d = q.shape
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if ctx.kernel == "flash":
            # flash_bwd: a float32 softmax-delta and dq accumulator, sequence rounded up to 128 rows.
            rows = -(-s // 128) * 128
            delta = torch.empty((b, h, rows), dtype=torch.float32, device=q.device)
            dq_accum = torch.empty((b, rows, h, d), dtype=torch.float32, device=q.device)
            del dq_accum, delta
        else:
            # _efficient_attention_backward, as the H200 allocator trace shows it (fp32, bert-base 32x512):
            # dq/dk/dv, an elementwise temporary the size of the output, the float32 delta and a
            # contiguous copy of the logsumexp; the temporary is freed, then a float32 workspace the
            # size of q (plus a few KiB) is made for the kernel.
            tmp = torch.empty_like(out)
            delta = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
            lse_copy = torch.empty_like(lse)
            del tmp
            workspace = torch.empty((b, s, h, d), dtype=torch.float32, device=q.device)
            del workspace, lse_copy, delta
        return dq, dk, dv, None, None


def _forward(flash_capable: bool):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
        query, key, value = (t.to(dtype) for t in (query, key, value))
        kernel = attention_kernel(dtype, attention_mask is not None, query.shape[-1], flash_capable)
        bias = None
        if attention_mask is not None:
            # sdpa turns a boolean mask into an additive one in the query's dtype
            # (convert_boolean_attn_mask: where(mask.logical_not(), -inf, 0)), which the memory-efficient
            # kernel keeps for backward: one (batch, 1, q, kv) tensor per layer, the last dimension padded
            # to a multiple of 16 (preprocess_mask).
            mask = attention_mask
            if mask.dtype == torch.bool:
                inverted = torch.empty(mask.shape, dtype=torch.bool, device=mask.device)
                kv = -(-mask.shape[-1] // 16) * 16
                bias = torch.empty((*mask.shape[:-1], kv), dtype=dtype, device=mask.device)
                del inverted
            else:
                bias = mask
        out = _FusedAttention.apply(query, key, value, bias, kernel)
        return out.transpose(1, 2).contiguous(), None

    return attention


_registered = False


def register() -> None:
    """Register the stand-in implementations with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    # Imported here: transformers' modeling code takes 1-2 s to import, and `attention_of` (all the
    # estimator needs when its answer is cached) does not need it.
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    for name, flash in ((AMPERE_PLUS, True), (PRE_AMPERE, False)):
        AttentionInterface.register(name, _forward(flash))
        AttentionMaskInterface.register(name, sdpa_mask)
    _registered = True
