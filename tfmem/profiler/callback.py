"""The profiler as a `transformers.Trainer` callback.

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    MemoryProfilerCallback.attach(trainer)
    trainer.train()
    [row for row in trainer.state.log_history if "tfmem/peak_allocated_bytes" in row]

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
