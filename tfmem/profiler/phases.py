"""Which phase of a training step sets the peak: forward, backward or the optimizer step.

A peak says how much; its phase says what to do about it. With short sequences the peak of a BERT
step is in the optimizer step (parameters, gradients and AdamW's two fp32 moments all live at once),
where activation techniques (checkpointing, accumulation, smaller micro-batches) change nothing: a
profile row at 1.00x the baseline with `peak_phase: optimizer` explains itself. With long sequences
the peak is at the end of the forward or early in backward, where those techniques help.

How the phase is known:

- `PhaseMarker` follows the loop through hooks, so no loop has to be changed: a forward pre-hook on
  the model marks "forward"; hooks on the model's output tensors fire as autograd reaches them, the
  first thing backward does, and mark "backward" (checkpointing's recomputation runs inside it, and is
  backward's); a step pre-hook on the optimizer marks "optimizer" (accelerate skips the step, and so the
  hook, on micro-batches that only accumulate). Whatever runs before the first forward has no phase.
- On CPU the `LiveBytes` tracker keeps the phase standing when it noted its peak (its `phase` and
  `peak_phase` attributes).
- On CUDA the allocator's `max_memory_allocated` is read at every change of phase: the phase during
  which it last grew holds the peak. Resetting the statistic between phases would lose the step's
  peak; reading it is a host-side counter, with no synchronisation.

`PeakPhase` puts these together for the `Profiler`; the estimator's fake step names its own phases
("forward", "backward:layer:top", ..., "optimizer": see `step_phase`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

PHASES = ("forward", "backward", "optimizer")
PHASE_WORDS = {"forward": "forward pass", "backward": "backward pass", "optimizer": "optimizer step"}


def step_phase(name: str | None) -> str | None:
    """The step phase ("forward", "backward" or "optimizer") of a phase or window name.

    Example:
        >>> step_phase("backward:layer:top"), step_phase("optimizer"), step_phase(None)
        ('backward', 'optimizer', None)
    """
    if not name:
        return None
    head = name.split(":", 1)[0]
    if head not in PHASES:
        raise ValueError(f"unknown step phase {name!r}; expected one of {', '.join(PHASES)} (or a backward:... window).")
    return head


# Below this share of activations in a forward/backward peak, the model states set it: naming the
# activation techniques there would send a user to checkpointing that saves nothing (MiniLM on short
# sentences: 0.3 MiB of activations next to 347 MiB of parameters, gradients and AdamW moments).
STATES_DOMINATE_BELOW = 0.25


def explain(phase: str | None, activation_share: float | None = None) -> str:
    """What sets a peak in `phase`, and which techniques can lower it (one sentence, for people).

    Args:
        phase: "forward", "backward" or "optimizer".
        activation_share: activations / peak at the peak, where known; a small share in forward or
            backward means the model states set the peak.

    >>> explain("backward", activation_share=0.01).split(";")[0]
    'the peak is in the backward pass: activations are only 1% of it'
    """
    if phase in ("forward", "backward") and activation_share is not None and activation_share < STATES_DOMINATE_BELOW:
        where = "backward pass" if phase == "backward" else "forward pass"
        return (f"the peak is in the {where}: activations are only {activation_share:.0%} of it; parameters, "
                "gradients and the optimizer's state set it, so freezing layers or a lighter optimizer lower it, "
                "and checkpointing, accumulation and 16-bit precision barely can")
    if phase == "optimizer":
        return ("the peak is in the optimizer step: parameters, gradients and the optimizer's state (AdamW: two "
                "moments per parameter) are live together and activations are already freed, so checkpointing, accumulation and smaller micro-batches cannot "
                "lower it (16-bit autocast neither: the weights stay fp32); freezing layers or a lighter optimizer can")
    if phase == "backward":
        return ("the peak is in the backward pass: saved activations and the gradients computed so far are live "
                "together; checkpointing, accumulation (smaller micro-batches) and 16-bit precision lower it")
    if phase == "forward":
        return ("the peak is at the end of the forward pass: every saved activation is live; checkpointing, "
                "accumulation (smaller micro-batches) and 16-bit precision lower it")
    return "the phase of the peak is unknown"


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):  # transformers' ModelOutput is an OrderedDict
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class PhaseMarker:
    """Knows which phase of a training step is running, from hooks on the model and the optimizer.

    Args:
        model: the model trained (hooks on its own forward; wrappers are fine).
        optimizer: the optimizer (accelerate's wrapper is looked through); None: no "optimizer" phase.

    Example:
        >>> model = nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> marker = PhaseMarker(model, opt)
        >>> seen = []
        >>> marker.listen(lambda old, new: seen.append(new))
        >>> model(torch.ones(2, 4)).sum().backward(); opt.step()
        >>> seen
        ['forward', 'backward', 'optimizer']
        >>> marker.remove()
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.phase: str | None = None
        self._listeners: list[Callable[[str | None, str | None], None]] = []
        self._handles: list[Any] = [
            model.register_forward_pre_hook(lambda _m, _a: self.set("forward")),
            model.register_forward_hook(self._on_output),
        ]
        while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer: hook the one that steps
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(lambda _o, _a, _k: self.set("optimizer")))

    def listen(self, fn: Callable[[str | None, str | None], None]) -> None:
        """Call `fn(old, new)` at every change of phase (from the thread that changes it)."""
        self._listeners.append(fn)

    def set(self, phase: str | None) -> None:
        if phase == self.phase:
            return
        old, self.phase = self.phase, phase
        for fn in self._listeners:
            fn(old, phase)

    def reset(self) -> None:
        """A new step begins: no phase until its first forward."""
        self.set(None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_output(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        for t in _tensors(output):
            if t.requires_grad:
                # Autograd reaches the model's outputs first when backward starts; the hook returns None,
                # so the gradient passes unchanged.
                t.register_hook(lambda _grad: self.set("backward"))


class PeakPhase:
    """The phase that set each memory step's peak, on CPU (through `LiveBytes`) or CUDA (allocator stats).

    Used by `Profiler`: `begin_step(tracker)` after the step's figures are reset (tracker: the CPU step's
    `LiveBytes`, None on CUDA), `end_step()` before they are read, `remove()` when the window closes.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device) -> None:
        self.device = torch.device(device)
        self.marker = PhaseMarker(model, optimizer)
        self.marker.listen(self._changed)
        self._tracker = None
        self._cuda_max = 0
        self._cuda_phase: str | None = None

    def begin_step(self, tracker=None) -> None:
        self.marker.reset()
        self._tracker = tracker
        if tracker is not None:
            tracker.phase = None
        if self.device.type == "cuda":
            self._cuda_max = torch.cuda.max_memory_allocated(self.device)
            self._cuda_phase = None

    def end_step(self) -> str | None:
        """The phase of this step's peak (None: before the first forward, or unknown)."""
        if self._tracker is not None:
            tracker, self._tracker = self._tracker, None
            return tracker.peak_phase
        if self.device.type == "cuda":
            self._read_cuda(self.marker.phase)
            return self._cuda_phase
        return None

    def remove(self) -> None:
        self.marker.remove()
        self._tracker = None

    def _changed(self, old: str | None, new: str | None) -> None:
        if self._tracker is not None:
            self._tracker.phase = new
        if self.device.type == "cuda":
            self._read_cuda(old)

    def _read_cuda(self, phase: str | None) -> None:
        # The peak grew while `phase` ran: that phase holds it (so far).
        peak = torch.cuda.max_memory_allocated(self.device)
        if peak > self._cuda_max:
            self._cuda_max, self._cuda_phase = peak, phase
