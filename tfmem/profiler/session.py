"""`Profiler`: peak memory and throughput of a training loop, step by step.

The one object behind all three ways in: the Trainer callback, an `accelerate` loop, and the sweep of
`tfmem profile`. A *step* is one optimizer step, with all its accumulation micro-batches.

    profiler = Profiler(model, optimizer)           # after accelerator.prepare(...)
    for step_batches in windows:
        with profiler.step():
            for batch in step_batches:
                profiler.count(batch)               # samples and real (unpadded) tokens
                ...forward, backward...
            optimizer.step(); optimizer.zero_grad()
    profiler.metrics()   # {"tfmem/peak_allocated_bytes": ..., "tfmem/samples_per_second": ..., ...}

Two windows, because on a CPU the accounting slows the steps it watches:

- **memory window**: the first `memory_steps` steps. Memory is measured *inside* each of these steps
  only, and the window's peak is the largest step's: whatever the loop does between steps (a Trainer
  evaluating or saving, say) is not training memory and is not counted. On CUDA the allocator's peak
  statistics are reset at each step's start and read at its end (no overhead). On CPU a fresh
  `LiveBytes` tracker counts every tensor storage of the step exactly, parameters and optimizer state
  included, and is entered at the step's start and left at its end, so no dispatch mode outlives a
  step; it costs time, so these steps are never timed. The process's peak resident memory is read
  per step the same way.
- **speed window**: every step after the memory window (CPU) or after the start (CUDA, where memory
  tracking is free), less `warmup_steps`. The device is synchronised before each clock read, so a
  step's time is the time its work took, not the time it took to queue. On CUDA two
  synchronisations per step are all the profiler adds.

Under a multi-process launch (torch.distributed initialised) each rank measures its own peak; when
the memory window closes the ranks exchange them (a collective: every rank must run the same steps),
and `metrics()` gives the maximum plus one `tfmem/rank{i}/peak_allocated_bytes` per rank. Throughput
is the local rank's.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from tfmem.profiler.flops import peak_flops, training_flops_per_token
from tfmem.profiler.live_bytes import CATEGORIES, LiveBytes
from tfmem.profiler.phases import PeakPhase
from tfmem.profiler.rss import peak_rss_bytes, reset_peak_rss
from tfmem.profiler.storages import storage_bytes
from tfmem.techniques._modules import unwrap_model

logger = logging.getLogger(__name__)

PREFIX = "tfmem/"


class Profiler:
    """Records peak memory (with a breakdown), step time, samples/s, tokens/s and, on CUDA, MFU.

    Args:
        model: the model being trained (its device is the one measured; its parameters and their
            gradients are named in the breakdown).
        optimizer: its state is named in the breakdown. Optional.
        device: where training runs; default the model's device, else CPU.
        memory_steps: steps in the memory window (0: no memory figures).
        warmup_steps: steps that are not timed at the start of the speed window (allocator growth,
            autotuning, lazily created optimizer state).
        limit_bytes: CPU only: a simulated memory capacity; the op that takes live tensor bytes above it
            raises `CpuOutOfMemoryError` (a `torch.OutOfMemoryError`).
        mixed_precision: "no", "fp16" or "bf16": picks the peak FLOP/s that MFU divides by.

    Raises:
        ValueError: a negative step count.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        device: torch.device | str | None = None,
        memory_steps: int = 2,
        warmup_steps: int = 1,
        limit_bytes: int | None = None,
        mixed_precision: str = "no",
    ) -> None:
        for name, value in (("memory_steps", memory_steps), ("warmup_steps", warmup_steps)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a whole number of steps, 0 or more; got {value!r}.")
        self.model = model
        self.optimizer = optimizer
        self.device = torch.device(device) if device is not None else _model_device(model)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.memory_steps = memory_steps
        self.warmup_steps = warmup_steps
        self.limit_bytes = limit_bytes
        self.mixed_precision = mixed_precision
        self.steps_begun = 0
        self._in_step = False
        self._tracker: LiveBytes | None = None
        self._window_open = False
        self._measuring_step = False  # a memory step is being measured (CUDA stats reset, or a tracker entered)
        self._readings: list[dict[str, Any]] = []  # one per measured step: its peaks and breakdown
        # CPU with limit_bytes: every memory step had an allocation refused and survived it (the loop
        # split its micro-batch and retried), so the peak counts bytes that were never held.
        self.peak_includes_refused = False
        self._memory: dict[str, float] = {}
        # The phase ("forward", "backward", "optimizer") of the window's peak step's peak; None if unknown.
        self.peak_phase: str | None = None
        self._phases: PeakPhase | None = None
        self._t0: float | None = None
        self._durations: list[float] = []
        self._step_samples = 0
        self._step_tokens: list[Any] = []
        self._step_padded = 0
        self._step_max_len = 0
        self.timed_samples = 0
        self.timed_tokens = 0
        self.timed_padded_tokens = 0
        self._timed_max_len = 0

    # -- the loop's side ----------------------------------------------------------------------

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def _step_index(self) -> int:
        return self.steps_begun - 1

    def _timed(self, index: int) -> bool:
        first = self.warmup_steps + (0 if self.is_cuda else self.memory_steps)
        return index >= first

    @contextlib.contextmanager
    def step(self, batch: Mapping[str, Any] | None = None) -> Iterator[Profiler]:
        """Measure one optimizer step; `batch` (optional) is counted as with `count`.

        An exception inside (an out-of-memory, say) closes the memory window, so the figures up to it
        stay readable, and propagates.
        """
        self.begin_step()
        try:
            if batch is not None:
                self.count(batch)
            yield self
        except BaseException:
            # Only this rank may be failing: close without exchanging peaks (a collective would hang).
            self._in_step = False
            self._close_memory_window(gather=False)
            raise
        self.end_step()

    def begin_step(self) -> None:
        """Mark the start of an optimizer step (the callback's `on_step_begin`)."""
        if self._in_step:
            raise RuntimeError("Profiler.begin_step() called twice without end_step(); wrap each optimizer step once.")
        index = self.steps_begun
        self.steps_begun += 1
        self._in_step = True
        self._step_samples, self._step_tokens, self._step_padded, self._step_max_len = 0, [], 0, 0
        if index == 0 and self.memory_steps > 0:
            self._window_open = True
        if self._window_open:
            self._begin_memory_step()
        if self._timed(index):
            self._sync()
            self._t0 = time.perf_counter()

    def count(self, batch: Mapping[str, Any]) -> None:
        """Count one micro-batch: its samples, its real tokens (attention-mask ones) and its padded length."""
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        ref = ids if ids is not None else mask
        if ref is None:
            ref = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None) if isinstance(batch, Mapping) else None
        if ref is None:
            return
        samples = int(ref.shape[0])
        length = int(ref.shape[1]) if ref.dim() > 1 else 1
        self._step_samples += samples
        self._step_padded += samples * length
        self._step_max_len = max(self._step_max_len, length)
        if mask is not None:
            # On CUDA a .item() here would synchronise every micro-batch; keep the sum on the device.
            # (On CPU under the tracker this counts as an 8-byte temporary, before the forward pass.)
            total = mask.sum()
            self._step_tokens.append(total if total.device.type == "cuda" else int(total))
        else:
            self._step_tokens.append(samples * length)

    def end_step(self) -> None:
        """Mark the end of an optimizer step (the callback's `on_step_end`)."""
        if not self._in_step:
            raise RuntimeError("Profiler.end_step() called without begin_step().")
        index = self._step_index
        self._in_step = False
        if self._t0 is not None and self._timed(index):
            self._sync()
            self._durations.append(time.perf_counter() - self._t0)
            self._t0 = None
            self.timed_samples += self._step_samples
            self.timed_tokens += sum(int(t) for t in self._step_tokens)
            self.timed_padded_tokens += self._step_padded
            self._timed_max_len = max(self._timed_max_len, self._step_max_len)
        if self._measuring_step:
            self._end_memory_step()
        if index == self.memory_steps - 1:
            self._close_memory_window()

    def close(self, gather: bool = True) -> None:
        """Stop measuring now (a failed step, the end of training): closes an open memory window.

        Args:
            gather: exchange peaks with the other ranks (a collective). Pass False after a failure that
                only this rank may have had: the other ranks would never join, and it would hang.
        """
        self._in_step = False
        if self._window_open or self._measuring_step:
            self._close_memory_window(gather=gather)

    # -- the figures --------------------------------------------------------------------------

    @property
    def timed_steps(self) -> int:
        return len(self._durations)

    def metrics(self, prefix: str = PREFIX) -> dict[str, float]:
        """The figures so far under `prefix` + keys with units in their names; missing ones are left out.

        Keys: peak_allocated_bytes, peak_reserved_bytes (CUDA), peak_rss_bytes,
        peak_{parameters,gradients,optimizer_state,activations}_bytes, rank{i}/peak_allocated_bytes
        (multi-process), step_time_seconds, samples_per_second, tokens_per_second, timed_steps, mfu (CUDA).
        The phase of the step that set the peak is a label, not a figure: see `peak_phase`.
        """
        out: dict[str, float] = {f"{prefix}{k}": v for k, v in self._memory.items()}
        if self._durations:
            total = sum(self._durations)
            out[f"{prefix}timed_steps"] = len(self._durations)
            out[f"{prefix}step_time_seconds"] = total / len(self._durations)
            out[f"{prefix}samples_per_second"] = self.timed_samples / total
            out[f"{prefix}tokens_per_second"] = self.timed_tokens / total
            mfu = self._mfu(total)
            if mfu is not None:
                out[f"{prefix}mfu"] = mfu
        return out

    # -- internals ----------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def _begin_memory_step(self) -> None:
        self._measuring_step = True
        reset_peak_rss()
        if self.is_cuda:
            self._sync()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # A tracker per step rather than one for the window: nothing is intercepted between steps
            # (evaluation, checkpoints), and a loop that dies inside a step leaves at most this one entered.
            self._tracker = LiveBytes(limit_bytes=self.limit_bytes)
            self._tracker.track(*(x for x in (self.model, self.optimizer) if x is not None))
            self._tracker.__enter__()
        if self.model is not None:
            if self._phases is None:  # hooks only for the memory window: removed when it closes
                self._phases = PeakPhase(self.model, self.optimizer, self.device)
            self._phases.begin_step(self._tracker)

    def _end_memory_step(self) -> None:
        """Read the step's peaks and stop watching until the next step begins."""
        self._measuring_step = False
        reading: dict[str, Any] = {"peak_phase": self._phases.end_step() if self._phases is not None else None}
        if self.is_cuda:
            self._sync()
            reading["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            reading["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
            reading.update(self._cuda_breakdown(reading["peak_allocated_bytes"]))
        elif self._tracker is not None:
            tracker, self._tracker = self._tracker, None
            tracker.__exit__(None, None, None)
            reading["peak_allocated_bytes"] = tracker.peak_bytes
            reading.update({f"peak_{k}_bytes": v for k, v in tracker.peak_breakdown.items()})
            # The tracker notes the peak before it refuses an allocation over `limit_bytes`; a step that
            # got past such a refusal (auto_micro_batch split and retried) has a peak that never ran.
            reading["refused"] = tracker.requested_bytes is not None
        else:
            return
        reading["peak_rss_bytes"] = peak_rss_bytes()
        self._readings.append(reading)

    def _close_memory_window(self, gather: bool = True) -> None:
        if self._measuring_step:
            self._end_memory_step()
        if not self._window_open:
            return
        self._window_open = False
        if self._phases is not None:
            self._phases.remove()
            self._phases = None
        if not self._readings:
            return
        readings, self._readings = self._readings, []
        # The window's peak is its largest step, preferring steps that never had an allocation refused.
        clean = [r for r in readings if not r.get("refused")]
        self.peak_includes_refused = not clean
        clean = clean or readings
        memory: dict[str, float] = dict(max(clean, key=lambda r: r["peak_allocated_bytes"]))
        memory.pop("refused", None)
        self.peak_phase = memory.pop("peak_phase", None)  # a label, kept out of the numeric metrics
        # Reserved (the allocator's cache) and resident memory (malloc's arenas) need not peak in the same
        # step as the tensors do; each is the maximum over the steps.
        for key in ("peak_reserved_bytes", "peak_rss_bytes"):
            if key in memory:
                memory[key] = max(r[key] for r in readings)
        if gather:
            memory.update(_gather_peaks(memory["peak_allocated_bytes"]))
        self._memory = memory

    def _cuda_breakdown(self, peak: int) -> dict[str, int]:
        # The allocator knows totals, not owners. Parameters and optimizer state are counted from their
        # storages; gradients as the bytes of the trainable parameters (each grad matches its parameter,
        # and they are all live at the optimizer step); activations/temporaries are the rest of the peak.
        params = [p for p in self.model.parameters()] if self.model is not None else []
        parameters = storage_bytes(*params)
        gradients = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        optimizer_state = 0
        if self.optimizer is not None:
            optimizer_state = storage_bytes(
                *(v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
            )
        rest = max(peak - parameters - gradients - optimizer_state, 0)
        split = dict(zip(CATEGORIES, (parameters, gradients, optimizer_state, rest)))
        return {f"peak_{k}_bytes": v for k, v in split.items()}

    def _mfu(self, seconds: float) -> float | None:
        if not self.is_cuda or self.model is None or not self.timed_padded_tokens:
            return None
        peak = peak_flops(self.device, self.mixed_precision)
        if peak is None:
            return None
        flops = training_flops_per_token(unwrap_model(self.model), self._timed_max_len) * self.timed_padded_tokens
        return flops / seconds / peak


def _model_device(model: nn.Module | None) -> torch.device:
    if model is not None:
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _gather_peaks(peak: int) -> dict[str, float]:
    """Under torch.distributed, every rank's peak: the maximum and one key per rank (a collective)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return {}
    world = torch.distributed.get_world_size()
    if world < 2:
        return {}
    peaks: list[Any] = [None] * world
    torch.distributed.all_gather_object(peaks, int(peak))
    out: dict[str, float] = {f"rank{i}/peak_allocated_bytes": v for i, v in enumerate(peaks)}
    out["peak_allocated_bytes"] = max(peaks)
    out["local_peak_allocated_bytes"] = int(peak)
    return out
