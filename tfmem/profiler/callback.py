"""The profiler as a `transformers.Trainer` callback.

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    Recipe.load("low-memory").apply(trainer)      # optional; before or after attach, either works:
    callback = MemoryProfilerCallback.attach(trainer)   # the callback reads the Trainer when training begins
    trainer.train()
    [row for row in trainer.state.log_history if "tfmem/peak_allocated_bytes" in row]
    print(callback.summary())                     # the same figures for people

The figures (see `Profiler.metrics`: `tfmem/peak_allocated_bytes`, `tfmem/samples_per_second`,
`tfmem/tokens_per_second`, ...) are added to every log Trainer writes once they exist: to
`trainer.state.log_history` and to the `logs` that the `report_to` integrations (TensorBoard,
W&B, ...) receive. Trainer records `log_history` *before* it calls `on_log` and calls callbacks in
order, integrations first; so the callback updates the entry Trainer just appended, and `attach`
puts it at the front of the list, where the integrations after it see the figures. (Passed as
`Trainer(callbacks=[...])` it lands after them: `log_history` still gets the figures, the integrations
do not.) A short run that logs only at its end gets them in that final log.

Samples and tokens are counted by a forward pre-hook on the model that reads `input_ids` and
`attention_mask` of each training micro-batch (evaluation forwards, outside a step, are not counted).
Memory is measured inside training steps only (`on_step_begin` to `on_step_end`), so evaluation and
checkpointing between steps do not raise the training peak.

When each key appears (defaults `memory_steps=2`, `warmup_steps=1`): the memory keys from the first log
after step 2 (the memory window's end; earlier if training is shorter); the speed keys
(`samples_per_second`, `tokens_per_second`, `step_time_seconds`, `timed_steps`, `mfu`) once a step has
been timed: on a CPU from step 4, because steps 1-2 run under the exact tensor accounting, which slows
them, and step 3 is warm-up; on CUDA, where memory tracking costs nothing, from step 2 (after warm-up).
At the end of training the callback logs one readable block (INFO, logger `tfmem.profiler.callback`)
and keeps it: `callback.summary()`.

A failed `train()` (an out-of-memory, Ctrl-C) skips `on_step_end` and `on_train_end`, which would leave
the CPU tracker intercepting every later torch op and the hook on the model. `attach` therefore wraps
`trainer.train` to clean up however it ends; a callback passed as `Trainer(callbacks=[...])` cleans up
at the next `on_train_begin` (Trainer's own `auto_find_batch_size` retry), or when you call `close()`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from transformers import TrainerCallback

from tfmem.adapters.trainer import arguments_precision
from tfmem.profiler.session import Profiler
from tfmem.profiler.units import format_bytes

logger = logging.getLogger(__name__)


class MemoryProfilerCallback(TrainerCallback):
    """Records peak memory and throughput during `Trainer.train()` into its logs.

    Args:
        memory_steps: optimizer steps in the memory window (see `Profiler`).
        warmup_steps: steps not timed at the start of the speed window.
        limit_bytes: CPU only: a simulated memory capacity (raises `CpuOutOfMemoryError` above it).
    """

    def __init__(self, memory_steps: int = 2, warmup_steps: int = 1, limit_bytes: int | None = None) -> None:
        self.memory_steps = memory_steps
        self.warmup_steps = warmup_steps
        self.limit_bytes = limit_bytes
        self.profiler: Profiler | None = None
        self._hook: Any = None

    @classmethod
    def attach(cls, trainer: Any, **kwargs: Any) -> MemoryProfilerCallback:
        """Add a new callback to `trainer` ahead of its other callbacks (so integrations see the figures).

        Also wraps `trainer.train` so that a run that raises leaves nothing behind (see the module docstring).
        """
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        train = trainer.train

        @functools.wraps(train)
        def train_and_clean_up(*args: Any, **train_kwargs: Any):
            try:
                return train(*args, **train_kwargs)
            except BaseException:
                callback.close(failed=True)
                raise

        trainer.train = train_and_clean_up
        return callback

    def close(self, failed: bool = False) -> None:
        """Stop measuring and remove the model hook; safe to call twice. The figures stay readable.

        Args:
            failed: training raised. The peaks are then not exchanged between ranks: only this rank may
                have failed, and the others would never join the collective.
        """
        if self.profiler is not None:
            self.profiler.close(gather=not failed)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def metrics(self) -> dict[str, float]:
        """The figures so far (empty before training)."""
        return self.profiler.metrics() if self.profiler is not None else {}

    def summary(self) -> str:
        """The figures for people: peak memory in MiB/GiB with its breakdown, speed, and which steps gave them.

        Logged at INFO when training ends; call it any time after (or during) training.

        Example (a 2-layer BERT of hidden size 32, 5 steps on a CPU, the defaults):
            tfmem: training summary on cpu
              peak memory 1.3 MiB: the peak of live tensor bytes, the largest of steps 1-2, reached during the backward pass
                parameters 96.6 KiB, gradients 12.8 KiB, optimizer state 191.4 KiB, activations and temporaries 993.3 KiB
              process resident memory (RSS) at its peak: 545.6 MiB
              speed 324.7 samples/s, 6,028 tokens/s (real tokens, padding excluded), 0.025 s per step, over steps 4-5
              not timed: steps 1-2 (memory accounting slows them), step 3 (warm-up)
        """
        profiler = self.profiler
        if profiler is None or profiler.steps_begun == 0:
            return "tfmem: no training step ran, so there are no figures."
        m = profiler.metrics(prefix="")
        cuda = profiler.is_cuda
        lines = [f"tfmem: training summary on {profiler.device}"]
        memory_steps = min(profiler.memory_steps, profiler.steps_begun)
        if "peak_allocated_bytes" in m:
            what = "PyTorch's peak allocated memory" if cuda else "the peak of live tensor bytes"
            phase = getattr(profiler, "peak_phase", None)
            lines.append(f"  peak memory {format_bytes(m['peak_allocated_bytes'])}: {what}, the largest of "
                         f"{_steps(1, memory_steps)}" + (" (all ranks)" if "local_peak_allocated_bytes" in m else "")
                         + (f", reached during {_PHASES.get(phase, phase)}" if phase else ""))
            parts = [(label, m.get(f"peak_{key}_bytes")) for key, label in _BREAKDOWN]
            if any(v is not None for _, v in parts):
                lines.append("    " + ", ".join(f"{label} {format_bytes(v)}" for label, v in parts if v is not None))
            if "peak_reserved_bytes" in m:
                lines.append(f"  peak reserved {format_bytes(m['peak_reserved_bytes'])}: what the caching allocator "
                             "held from the GPU, the figure that must fit")
            if "peak_rss_bytes" in m:
                lines.append(f"  process resident memory (RSS) at its peak: {format_bytes(m['peak_rss_bytes'])}")
            if profiler.peak_includes_refused:
                lines.append("  (every measured step had an allocation refused over limit_bytes: the peak counts it)")
        elif profiler.memory_steps == 0:
            lines.append("  peak memory: not measured (memory_steps=0)")
        else:
            lines.append("  peak memory: not measured (no step of the memory window finished)")
        first_timed = profiler.warmup_steps + (0 if cuda else profiler.memory_steps) + 1
        if profiler.timed_steps:
            last = first_timed + profiler.timed_steps - 1
            mfu = f", MFU {m['mfu']:.0%}" if "mfu" in m else ""
            lines.append(f"  speed {m['samples_per_second']:,.1f} samples/s, {m['tokens_per_second']:,.0f} tokens/s "
                         f"(real tokens, padding excluded), {m['step_time_seconds']:.3f} s per step{mfu}, over "
                         f"{_steps(first_timed, last)}")
        else:
            lines.append(f"  speed: not measured: timing starts at step {first_timed} and the run had "
                         f"{profiler.steps_begun} step(s)")
        untimed = []
        if not cuda and profiler.memory_steps:
            untimed.append(f"{_steps(1, profiler.memory_steps)} (memory accounting slows them)")
        if profiler.warmup_steps:
            start = first_timed - profiler.warmup_steps
            untimed.append(f"{_steps(start, first_timed - 1)} (warm-up)")
        if untimed:
            lines.append("  not timed: " + ", ".join(untimed))
        return "\n".join(lines)

    # -- Trainer events -------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # A previous train() that raised (Trainer's auto_find_batch_size retries after an out-of-memory)
        # may have left a step open: end it before measuring again.
        self.close(failed=True)
        precision = arguments_precision(args)
        self.profiler = Profiler(
            model,
            optimizer,
            device=getattr(args, "device", None),
            memory_steps=self.memory_steps,
            warmup_steps=self.warmup_steps,
            limit_bytes=self.limit_bytes,
            mixed_precision=precision,
        )
        if model is not None:
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.profiler.begin_step()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.profiler.end_step()
            if state.max_steps and state.global_step >= state.max_steps:
                # A run shorter than the memory window: close it now, so the last log gets its figures.
                self.profiler.close()

    def on_log(self, args, state, control, logs=None, **kwargs):
        figures = self.metrics()
        if not figures or logs is None:
            return
        logs.update(figures)
        if state.log_history:
            state.log_history[-1].update(figures)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
        logger.info("%s", self.summary())

    # -- counting ---------------------------------------------------------------------------------

    def _count(self, module, args, kwargs):
        profiler = self.profiler
        if profiler is None or not profiler._in_step or not module.training:
            return None
        batch = dict(kwargs)
        if args and "input_ids" not in batch:
            batch["input_ids"] = args[0]
        profiler.count(batch)
        return None


_PHASES = {"forward": "the forward pass", "backward": "the backward pass", "optimizer": "the optimizer step"}
_BREAKDOWN = (("parameters", "parameters"), ("gradients", "gradients"), ("optimizer_state", "optimizer state"),
              ("activations", "activations and temporaries"))


def _steps(first: int, last: int) -> str:
    """`step 3` or `steps 1-2`, 1-based like Trainer's global_step.

    >>> _steps(3, 3), _steps(1, 2)
    ('step 3', 'steps 1-2')
    """
    return f"step {first}" if first == last else f"steps {first}-{last}"
