"""Target devices: what the estimate models about the GPU (or CPU) that will train, not this machine.

A `DeviceProfile` says what the peak depends on:

- whether allocations are rounded as the CUDA caching allocator rounds them (512-byte blocks);
- which kernel `scaled_dot_product_attention` runs. On CUDA, training BERT with sdpa runs the flash
  kernel (fp16/bf16, no mask) or the memory-efficient kernel (fp32, or with a mask); both keep only the
  output and an O(seq) logsumexp for backward. On CPU, training with attention dropout runs the math
  fallback, which keeps the full (batch, heads, seq, seq) probability and dropout tensors;
- the library workspaces PyTorch allocates on the GPU (cuBLAS and cuBLASLt, by compute capability), and
  the GPU's SM count (reduction kernels size their staging buffers by it, see kernels.py);
- which mixed precisions the device runs natively (bf16 needs compute capability 8.0; fp16 is refused on
  CPU, see `tfmem.techniques.precision`);
- the optimizer implementation transformers' Trainer uses there by default;
- how much memory it has, when known (the planner's default budget).

Build one with `device_profile("cuda", capability="7.5")`, `device_profile(gpu="t4")` or
`device_profile("cpu")`.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30

# name -> (marketing name, memory in bytes, compute capability). Memory is the card's total; the CUDA
# context takes a few hundred MiB of it before PyTorch allocates anything (see `budget` in plan.py).
GPUS: dict[str, tuple[str, int, tuple[int, int]]] = {
    "t4": ("NVIDIA T4", 16 * GiB, (7, 5)),
    "v100": ("NVIDIA V100 16GB", 16 * GiB, (7, 0)),
    "v100-32gb": ("NVIDIA V100 32GB", 32 * GiB, (7, 0)),
    "rtx2080ti": ("NVIDIA GeForce RTX 2080 Ti", 11 * GiB, (7, 5)),
    "rtx3060": ("NVIDIA GeForce RTX 3060", 12 * GiB, (8, 6)),
    "rtx3070": ("NVIDIA GeForce RTX 3070", 8 * GiB, (8, 6)),
    "rtx3080": ("NVIDIA GeForce RTX 3080", 10 * GiB, (8, 6)),
    "rtx3090": ("NVIDIA GeForce RTX 3090", 24 * GiB, (8, 6)),
    "rtx4060": ("NVIDIA GeForce RTX 4060", 8 * GiB, (8, 9)),
    "rtx4070": ("NVIDIA GeForce RTX 4070", 12 * GiB, (8, 9)),
    "rtx4090": ("NVIDIA GeForce RTX 4090", 24 * GiB, (8, 9)),
    "a10g": ("NVIDIA A10G", 24 * GiB, (8, 6)),
    "l4": ("NVIDIA L4", 24 * GiB, (8, 9)),
    "a100": ("NVIDIA A100 40GB", 40 * GiB, (8, 0)),
    "a100-80gb": ("NVIDIA A100 80GB", 80 * GiB, (8, 0)),
    "h100": ("NVIDIA H100 80GB", 80 * GiB, (9, 0)),
}
# name -> streaming multiprocessors. CUDA's reduction kernels size their cross-block staging buffer by
# the SM count (see `cuda_kernels.reduce_staging_bytes`); the vendors' spec sheets.
GPU_MULTIPROCESSORS: dict[str, int] = {
    "t4": 40, "v100": 80, "v100-32gb": 80, "rtx2080ti": 68, "rtx3060": 28, "rtx3070": 46, "rtx3080": 68,
    "rtx3090": 82, "rtx4060": 24, "rtx4070": 46, "rtx4090": 128, "a10g": 80, "l4": 58, "a100": 108,
    "a100-80gb": 108, "h100": 132,
}
# An unknown GPU (only --gpu-capability given) is assumed to be as large as an H100: more SMs make
# larger reduction buffers, so this errs towards predicting more memory.
DEFAULT_MULTIPROCESSORS = 132
# CUDA's "maximum resident threads per multiprocessor" by compute capability (CUDA C Programming Guide,
# table "Technical Specifications per Compute Capability"); also used by the reduction kernels.
MAX_THREADS_PER_MULTIPROCESSOR = {(7, 5): 1024, (8, 6): 1536, (8, 7): 2048, (8, 9): 1536, (12, 0): 1536, (12, 1): 1536}
# Compute capabilities CUDA has shipped: 3.0 (Kepler) to 12.x (Blackwell GeForce / DGX Spark).
MIN_CAPABILITY, MAX_CAPABILITY_MAJOR = (3, 0), 12

GPU_ALIASES = {"4090": "rtx4090", "3090": "rtx3090", "3060": "rtx3060", "3070": "rtx3070", "3080": "rtx3080",
               "4060": "rtx4060", "4070": "rtx4070", "2080ti": "rtx2080ti", "a10": "a10g"}

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
BF16_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class DeviceProfile:
    """The device a training run will use, as far as its memory peak is concerned.

    Attributes:
        type: "cuda" or "cpu".
        name: for output, e.g. "NVIDIA T4" or "cuda (capability 8.0)".
        capability: CUDA compute capability, None for CPU (or for "any CUDA GPU").
        memory_bytes: total device memory when known, else None.
        attention: "sdpa" (PyTorch's fused attention, the transformers default) or "eager". A model or
            config that names its own implementation overrides this (see `estimate_memory`).
        multiprocessors: streaming multiprocessors of the GPU when known (reduction buffers depend on it).
    """

    type: str
    name: str
    capability: tuple[int, int] | None = None
    memory_bytes: int | None = None
    attention: str = "sdpa"
    multiprocessors: int | None = None

    def __post_init__(self) -> None:
        if self.type not in ("cpu", "cuda"):
            raise ValueError(f"device `type` must be 'cpu' or 'cuda', got {self.type!r}.")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"`attention` must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got {self.attention!r}."
            )

    @property
    def rounds_allocations(self) -> bool:
        """True when allocations are rounded by the CUDA caching allocator (see allocator.py)."""
        return self.type == "cuda"

    @property
    def library_workspace_bytes(self) -> int:
        """cuBLAS and cuBLASLt workspaces, allocated through PyTorch's caching allocator (so counted as
        allocated) on the first matrix multiply of each thread, and kept until the process ends.

        PyTorch's defaults (aten/src/ATen/cuda/CublasHandlePool.cpp, no CUBLAS_WORKSPACE_CONFIG or
        CUBLASLT_WORKSPACE_SIZE set): the cuBLAS workspace is 32 MiB on capability 9.0 and newer (cuBLAS'
        own recommendation for Hopper) and ":4096:2:16:8" below (4096 KiB x 2 + 16 KiB x 8 = 8.125 MiB);
        the cuBLASLt workspace (addmm with a bias runs through cuBLASLt) is 1024 KiB. One of each per
        (handle, stream), and handles are per thread: training uses two threads that multiply matrices
        (the loop's, and autograd's device thread for backward), hence two of each.

        Measured on an H200 (torch 2.11, ../shared/gpu-runs/2026-11-26-h200): after a training run every
        tensor is gone and 66 MiB stay allocated (profile-rows-in-process.jsonl, 69206016 bytes); the
        allocator snapshots show them as two 32 MiB and two 1 MiB blocks made before the first step.
        """
        if self.type != "cuda":
            return 0
        hopper = self.capability is not None and self.capability >= (9, 0)
        cublas = 32 * 2**20 if hopper else 4096 * 1024 * 2 + 16 * 1024 * 8
        cublaslt = 1024 * 1024
        return 2 * (cublas + cublaslt)

    @property
    def multiprocessor_count(self) -> int:
        """SMs of the GPU; `DEFAULT_MULTIPROCESSORS` when unknown."""
        return self.multiprocessors or DEFAULT_MULTIPROCESSORS

    @property
    def max_threads_per_multiprocessor(self) -> int:
        """Resident threads per SM for this capability (2048 where unknown, the most common value)."""
        return MAX_THREADS_PER_MULTIPROCESSOR.get(self.capability or (9, 0), 2048)

    @property
    def fused_attention(self) -> bool:
        """True when sdpa runs a kernel that keeps no (seq x seq) tensor for backward (flash / mem-efficient)."""
        return self.type == "cuda" and self.attention == "sdpa"

    @property
    def optimizer_impl(self) -> str:
        """The AdamW implementation a run uses: what transformers' Trainer picks by default, on either
        device: `adamw_torch_fused` with torch >= 2.8 (`TrainingArguments.optim`), else plain
        `torch.optim.AdamW`, for-loop on CPU and foreach on CUDA."""
        return "fused" if _trainer_default_optimizer() == "adamw_torch_fused" else (
            "foreach" if self.type == "cuda" else "for-loop")

    def precision_problems(self, mode: str) -> list[str]:
        """Why `mode` ("no", "fp16", "bf16") is not native on this device; empty when it is."""
        if mode == "no":
            return []
        if self.type == "cpu":
            if mode == "fp16":
                return ["fp16 autocast on CPU is about 30x slower than fp32; use bf16 or no mixed precision."]
            return []
        if mode == "bf16" and self.capability is not None and self.capability < BF16_MIN_CAPABILITY:
            return [
                f"bf16 needs compute capability 8.0 (Ampere) or newer; {self.name} has "
                f"{self.capability[0]}.{self.capability[1]} and only emulates it. Use fp16."
            ]
        return []

    def precisions(self) -> list[str]:
        """Mixed-precision modes this device runs natively, fp32 ("no") first."""
        return [m for m in ("no", "bf16", "fp16") if not self.precision_problems(m)]

    def describe(self) -> str:
        parts = [self.name]
        if self.memory_bytes:
            parts.append(f"{self.memory_bytes / GiB:.0f} GiB")
        if self.capability:
            parts.append(f"capability {self.capability[0]}.{self.capability[1]}")
        parts.append(f"attention {self.attention}")
        return ", ".join(parts)


def _trainer_default_optimizer() -> str:
    from transformers import TrainingArguments

    return str(TrainingArguments.__dataclass_fields__["optim"].default)


def parse_capability(text: str | tuple[int, int]) -> tuple[int, int]:
    """"8.6" -> (8, 6), checked against the capabilities CUDA has shipped (3.0 to 12.x).

    Raises:
        ValueError: not of the form MAJOR.MINOR, or outside 3.0-12.x; the message names the flag.

    Example:
        >>> parse_capability("8.6")
        (8, 6)
    """
    valid = (f"a CUDA compute capability from {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} to "
             f"{MAX_CAPABILITY_MAJOR}.x, e.g. 7.5 (T4), 8.0 (A100) or 9.0 (H100)")
    if isinstance(text, tuple):
        major, minor = text
    else:
        try:
            major_text, minor_text = str(text).strip().split(".")
            major, minor = int(major_text), int(minor_text)
        except ValueError:
            raise ValueError(f"--gpu-capability must be {valid}; got {text!r}.") from None
    if not (MIN_CAPABILITY <= (major, minor) and major <= MAX_CAPABILITY_MAJOR and 0 <= minor <= 9):
        raise ValueError(f"--gpu-capability {major}.{minor} is not {valid}.")
    return major, minor


def device_profile(
    device: str | DeviceProfile = "cuda",
    *,
    gpu: str | None = None,
    capability: str | tuple[int, int] | None = None,
    memory_bytes: int | None = None,
    attention: str = "sdpa",
) -> DeviceProfile:
    """A `DeviceProfile` from a device type, a GPU name, or both.

    Args:
        device: "cuda" or "cpu" (a `DeviceProfile` is returned unchanged).
        gpu: a name from `GPUS` (t4, v100, a100, rtx3090, 4090, h100, ...); implies cuda and sets the
            capability and memory.
        capability: CUDA compute capability ("8.0"); overrides the GPU's.
        memory_bytes: device memory; overrides the GPU's.
        attention: "sdpa" or "eager".

    Raises:
        ValueError: unknown device type or GPU name (the message lists the known names).

    Example:
        >>> device_profile(gpu="t4").precisions()
        ['no', 'fp16']
    """
    if isinstance(device, DeviceProfile):
        return device
    if gpu is not None:
        key = GPU_ALIASES.get(gpu.lower(), gpu.lower())
        if key not in GPUS:
            raise ValueError(f"--gpu {gpu!r} is not a GPU tfmem knows; known: {', '.join(GPUS)}. "
                             "Or give --device cuda --gpu-capability X.Y and --budget.")
        name, memory, cap = GPUS[key]
        return DeviceProfile("cuda", name, parse_capability(capability) if capability else cap,
                             memory_bytes or memory, attention, GPU_MULTIPROCESSORS.get(key))
    kind = str(device).split(":")[0]
    if kind == "cpu":
        return DeviceProfile("cpu", "cpu", None, memory_bytes, attention)
    if kind == "cuda":
        cap = parse_capability(capability) if capability else None
        name = f"cuda (capability {cap[0]}.{cap[1]})" if cap else "cuda"
        return DeviceProfile("cuda", name, cap, memory_bytes, attention)
    raise ValueError(f"--device must be 'cuda' or 'cpu', got {device!r}.")
