"""What CUDA kernels allocate that the same step on (fake) CPU tensors does not, and the reverse.

The fake step runs PyTorch's CPU code paths on fake tensors. Where the CUDA path allocates differently,
this module makes the fake step allocate what the GPU would (all found by comparing, block by block, the
H200 allocator snapshot of a real `Trainer` step of bert-base 32x512 with the fake step's allocation
log; ../shared/gpu-runs/2026-11-26-h200/snapshot-bert-base-b32-s512.pickle.gz):

- **Dropout.** `F.dropout` on a CUDA tensor runs the fused `native_dropout`, which keeps a bool mask
  (1 byte per element) for backward; on a CPU tensor it multiplies by a noise tensor of the input's
  dtype (4 bytes per element in fp32) and keeps that. In bert-base 32x512 fp32 that is 36 MiB per
  dropout, 25 dropouts: the fake step over-predicted the real step by 0.9 GiB (+7%). `cuda_dropout()`
  routes `F.dropout` to `torch.native_dropout` while a fake step for a CUDA target runs (a patch of the
  function, not a mode: checkpointing recomputes layers inside backward, where function modes are off).
- **Reduction staging buffers.** A sum over a large tensor that leaves few outputs (a bias gradient:
  (batch x seq, hidden) -> hidden) splits each output across thread blocks, which combine their partial
  results through a global-memory buffer from the caching allocator (aten/src/ATen/native/cuda/Reduce.cuh,
  `setReduceConfig` and `ReduceConfig::global_memory_size`). It lives only while the kernel runs, but
  the top layer's feed-forward bias gradient runs at the step's peak: 96 MiB in bert-base 32x512 on the
  H200, 8 MiB in bert-tiny 16x512. `reduce_staging_bytes` reproduces the kernel's launch arithmetic
  (it gives exactly the 8, 96 and 132 MiB the snapshots show); `CudaKernelTemporaries` allocates and
  frees such a buffer after each sum, so the tracker sees it where the GPU has it.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tfmem.estimate.device import DeviceProfile

_REDUCTIONS = {torch.ops.aten.sum.dim_IntList, torch.ops.aten.mean.dim}
MAX_NUM_THREADS = 512        # ReduceConfig::MAX_NUM_THREADS
WARP_SIZE = 32
MIN_VALUES_PER_THREAD, MAX_VALUES_PER_THREAD = 16, 256


def _last_pow2(n: int) -> int:
    return max(1, 1 << (max(1, n).bit_length() - 1))


def reduce_staging_bytes(shape: Sequence[int], dims: Sequence[int], device: DeviceProfile,
                         accumulate_bytes: int = 4) -> int:
    """Bytes of the global-memory staging buffer CUDA's reduction kernel allocates to reduce a contiguous
    tensor of `shape` over `dims` (0 when the kernel reduces within one thread block).

    Args:
        shape, dims: the input's shape and the reduced dimensions.
        device: the target GPU (its SM count and resident threads per SM bound the grid).
        accumulate_bytes: size of the accumulator type (float32 for fp32/bf16/fp16 inputs).

    Example:
        >>> from tfmem.estimate.device import device_profile
        >>> h100 = device_profile(gpu="h100")
        >>> reduce_staging_bytes((16384, 768), (0,), h100) // 2**20   # bert-base's bias gradient at 32 x 512
        96
    """
    rank = len(shape)
    dims = sorted({d % rank for d in dims}) if rank else []
    numel = math.prod(shape)
    num_outputs = math.prod(s for i, s in enumerate(shape) if i not in dims)
    if numel == 0 or num_outputs == 0:
        return 0
    inputs_per_output = numel // num_outputs
    if inputs_per_output <= 1:
        return 0
    # The kernel maps block.x to the fastest-moving dimension: reducing the innermost one ("row") lets a
    # thread block reduce inside; otherwise ("column") block.x walks the outputs, vectorised by 4.
    row = (rank - 1) in dims or num_outputs == 1
    if row:
        dim0, dim1, output_vec = inputs_per_output, num_outputs, 1
        if dim0 > 128 and len(dims) == 1:
            dim0 //= 4  # "vectorize along input"
    else:
        output_vec = 4 if num_outputs % 4 == 0 else 2 if num_outputs % 2 == 0 else 1
        dim0, dim1 = num_outputs // output_vec, inputs_per_output
    max_threads = MAX_NUM_THREADS // output_vec
    dim0_pow2 = _last_pow2(dim0) if dim0 < max_threads else max_threads
    dim1_pow2 = _last_pow2(dim1) if dim1 < max_threads else max_threads
    width = min(dim0_pow2, WARP_SIZE)
    height = min(dim1_pow2, max_threads // width)
    width = min(dim0_pow2, max_threads // height)
    step_input = step_output = 1
    if row:
        step_input *= width
    else:
        step_output *= width
    split_warps = math.ceil(inputs_per_output / step_input) >= min(height * 16, MAX_VALUES_PER_THREAD)
    if split_warps:
        step_input *= height
    else:
        step_output *= height
    values_per_thread = math.ceil(inputs_per_output / step_input)
    grid_x = math.ceil((num_outputs // output_vec) / step_output)
    target_grid = device.multiprocessor_count * (device.max_threads_per_multiprocessor // (width * height))
    if not (split_warps and values_per_thread >= MAX_VALUES_PER_THREAD and grid_x <= target_grid):
        return 0
    ctas = max(min(math.ceil(target_grid / grid_x), math.ceil(values_per_thread / MIN_VALUES_PER_THREAD)),
               math.ceil(values_per_thread / MAX_VALUES_PER_THREAD))
    if ctas <= 1:
        return 0
    size = accumulate_bytes * num_outputs * ctas
    if not row:  # no reduction across block.x: each lane stages its own partial results
        size *= width * output_vec
    return size


class CudaKernelTemporaries(TorchDispatchMode):
    """Allocates, and frees at once, the staging buffer each large reduction would take on `device`.

    Enter it after (inside) the `LiveBytes` tracker, so the buffer is counted; it sees backward too
    (autograd carries dispatch modes into its device thread).
    """

    def __init__(self, device: DeviceProfile) -> None:
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _REDUCTIONS and isinstance(args[0], torch.Tensor):
            x = args[0]
            dims = args[1] if len(args) > 1 and args[1] is not None else list(range(x.dim()))
            acc = 8 if x.dtype in (torch.float64, torch.complex64) else 4
            nbytes = reduce_staging_bytes(tuple(x.shape), list(dims), self.device, acc)
            if nbytes:
                buffer = torch.empty((nbytes,), dtype=torch.uint8, device=x.device)
                del buffer
        return out


_dropout_lock = threading.Lock()


@contextlib.contextmanager
def cuda_dropout() -> Iterator[None]:
    """Within, `torch.nn.functional.dropout` runs as it does on a CUDA tensor (`native_dropout`: a bool
    mask kept for backward) whatever the tensor's device. Restored on exit; not re-entrant across threads
    (a lock serialises fake steps that use it).

    Example:
        >>> from torch._subclasses.fake_tensor import FakeTensorMode
        >>> with FakeTensorMode(), cuda_dropout():
        ...     x = torch.ones(4, requires_grad=True)
        ...     y = torch.nn.functional.dropout(x, 0.1, training=True)
        ...     y.grad_fn.name()
        'NativeDropoutBackward0'
    """
    functional = torch.nn.functional
    original = functional.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and not inplace and input.numel() > 0:
            return torch.native_dropout(input, p, True)[0]
        return original(input, p, training, inplace)

    with _dropout_lock:
        functional.dropout = dropout
        try:
            yield
        finally:
            functional.dropout = original
