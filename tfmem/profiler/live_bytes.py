"""Exact accounting of live tensor bytes, for CPU runs and for fake (meta) tensors.

PyTorch's CUDA allocator keeps peak statistics; the CPU allocator keeps none, and the process's
resident memory mixes tensors with the interpreter, libraries and whatever malloc keeps for reuse.
`LiveBytes` answers "how many bytes of tensors did this run hold at its worst moment?" exactly, by
watching every operator through a `TorchDispatchMode`:

- Each tensor an operator returns is resolved to its storage. A storage is counted once, however
  many views share it, with `nbytes()` bytes; a `weakref.finalize` on the storage subtracts them when
  the last tensor using it dies. In-place and `out=` ops return a storage already known, so they add
  nothing unless they resized it (`resize_`, an `out=` tensor grown to fit), in which case the
  difference is added.
- Storages of tensors that existed before (parameters, buffers, optimizer state, inputs) are counted
  from the moment `track()` is given them, or the first time an operator reads them.
- Backward is seen too: the autograd engine carries the dispatch-mode stack into the thread that runs
  backward, and recomputation under non-reentrant checkpointing runs ordinary operators.
- Fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`) have meta storages with the real
  `nbytes()`, so the same accounting predicts a peak without allocating it. Enter `FakeTensorMode`
  first and `LiveBytes` second (innermost), so `LiveBytes` sees the fake outputs.

The peak is split into parameters (with buffers), gradients, optimizer state and activations
(everything else: activations, temporaries, inputs). At the first decrease after a new peak the live
set is exactly the peak's, and a copy of it is kept (storage serial numbers and sizes only: nothing is
read from tensors there, since that moment can fall inside PyTorch freeing one). Roles come from
`track()` and from hooks on the tracked model and optimizer: a storage is a gradient once autograd
stores it in a parameter's `.grad`, optimizer state once it is in the optimizer's `state` after a step.

Public API:

    tracker = LiveBytes(limit_bytes=None,      # limit_bytes: raise CpuOutOfMemoryError above it
                        size_of=None,          # n -> bytes counted for a storage of n bytes (default: n)
                        observer=None)         # an AllocationObserver, told of every count and free
    tracker.track(model, optimizer, batch)     # count existing tensors; models/optimizers also
                                               # name the parameters, gradients and optimizer state
    with tracker:                              # every op inside is accounted
        loss = model(**batch).loss; loss.backward(); optimizer.step()
    tracker.peak_bytes                         # int: the most live tensor bytes at any moment
    tracker.current_bytes                      # int: live tensor bytes now (while inside)
    tracker.peak_breakdown                     # {"parameters": .., "gradients": .., "optimizer_state": ..,
                                               #  "activations": ..}, bytes, summing to peak_bytes
    tracker.reset_peak()                       # start a new measured window at the current level
    tracker.phase = "backward"                 # set by the loop (or profiler.phases.PhaseMarker): a label
    tracker.peak_phase                         # the `phase` standing when the peak was reached
    tracker.requested_bytes                    # bytes of the op output that crossed limit_bytes, or None

    CpuOutOfMemoryError                        # a torch.OutOfMemoryError: one `except` serves CUDA and CPU
    storage_key(tensor) -> int | None          # identity of a tensor's storage (None: no storage)
    storage_bytes(*tensors) -> int             # independent count: bytes of the distinct storages
    AllocationObserver                         # protocol: on_alloc(key, nbytes), on_free(key, nbytes)

Extension points, for counting as another allocator would (the estimator's CUDA model is built on them):

- `size_of(nbytes) -> int` is what a storage of `nbytes` bytes costs. Every figure (current, peak,
  breakdown, `limit_bytes`, `requested_bytes`) is in these counted bytes. It is called once per new or
  resized storage, while the tracker holds its lock: plain arithmetic only.
- `observer.on_alloc(key, nbytes)` runs when a storage is first counted, `observer.on_free(key, nbytes)`
  when it is freed; `key` is `storage_key`'s, `nbytes` the storage's exact size (before `size_of`, 0 for
  an empty storage). A resize is a free of the old size then an alloc of the new, as an allocator would
  do it. Both run in the order the storages were counted, after the tracker has updated its figures
  (`current_bytes` already includes the change), not inside that update. `on_free` runs from the
  storage's finalizer, possibly in the middle of PyTorch deallocating it (`p.grad = None` in
  `zero_grad`): it is given recorded integers only, and must not touch any tensor (reading `p.grad`
  there has crashed the interpreter). Keys are addresses, reused after a free, so pair events by order.
  Storages still live when the window closes get no `on_free`.

Leaving the `with` block stops the accounting (finalizers are detached, so nothing keeps a reference
to the tracker); the figures stay readable. A tracker is used for one window.

Under FSDP2 (see `sharded.py`): a DTensor counts as its local shard's storage, and a unit's gathered
parameters count from the all-gather copy-out until the unit reshards, once each.

Not seen: memory that is not a tensor storage (the allocator's caches, library workspaces, Python
objects), storages resized directly through `untyped_storage().resize_()`, and tensors made by
threads the run starts itself (data-loader workers).
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tfmem.profiler.sharded import local_tensor, watch_fsdp

# Part of this module's public API (see the docstring); they live in storages.py.
from tfmem.profiler.storages import CpuOutOfMemoryError, storage_bytes, storage_key  # noqa: F401

logger = logging.getLogger(__name__)

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations")


@runtime_checkable
class AllocationObserver(Protocol):
    """Told of every storage a `LiveBytes` tracker counts and frees, in order (see the module docstring).

    Example:
        >>> class Log:
        ...     def __init__(self): self.events = []
        ...     def on_alloc(self, key, nbytes): self.events.append(nbytes)
        ...     def on_free(self, key, nbytes): self.events.append(-nbytes)
        >>> log = Log()
        >>> with LiveBytes(observer=log):
        ...     a = torch.zeros(4)                   # 16 bytes
        ...     del a
        >>> log.events
        [16, -16]
    """

    def on_alloc(self, key: int, nbytes: int) -> None:
        """A storage of `nbytes` exact bytes is counted from now (new, or resized after an `on_free`)."""

    def on_free(self, key: int, nbytes: int) -> None:
        """The storage counted under `key` with `nbytes` is gone. Touch no tensor here."""


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages and their peak, operator by operator.

    See the module docstring for what is counted and how.

    Args:
        limit_bytes: raise `CpuOutOfMemoryError` from the operator whose output takes live bytes above
            this (a simulated device capacity, so out-of-memory handling can be exercised on a CPU).
        track_inputs: also count storages that operators read but that were made before tracking began
            (parameters, inputs) from their first use. Turn off to count only what `track()` was given
            and what operators create.
        size_of: the bytes to count for a storage of n bytes (an allocator's rounding, say); default n.
            Called under the tracker's lock, so it must be plain arithmetic.
        observer: an `AllocationObserver` told of every storage counted and freed (to replay them into an
            allocator model); its `on_free` must touch no tensor.

    Example:
        >>> a = torch.zeros(256)                 # 1 KiB, made before tracking
        >>> with LiveBytes() as tracker:
        ...     b = a * 2                        # +1 KiB
        ...     del b                            # -1 KiB
        ...     c = torch.ones(128)              # +512 B
        >>> tracker.peak_bytes, tracker.current_bytes
        (2048, 1536)
    """

    def __init__(
        self,
        *,
        limit_bytes: int | None = None,
        track_inputs: bool = True,
        size_of: Callable[[int], int] | None = None,
        observer: AllocationObserver | None = None,
    ) -> None:
        super().__init__()
        if limit_bytes is not None and (not isinstance(limit_bytes, int) or limit_bytes <= 0):
            raise ValueError(f"`limit_bytes` must be a positive number of bytes or None, got {limit_bytes!r}.")
        if size_of is not None and not callable(size_of):
            raise TypeError(f"`size_of` must be a function of a byte count, or None, got {size_of!r}.")
        if observer is not None and not isinstance(observer, AllocationObserver):
            raise TypeError(f"`observer` must have `on_alloc(key, nbytes)` and `on_free(key, nbytes)` methods, "
                            f"got {observer!r}.")
        self.limit_bytes = limit_bytes
        self.track_inputs = track_inputs
        self._size_of = size_of
        self._observer = observer
        self.current_bytes = 0
        self.peak_bytes = 0
        self.requested_bytes: int | None = None
        # A label the loop sets ("forward", "backward", "optimizer"): kept with each new peak, so the
        # phase that set the peak is known (see tfmem/profiler/phases.py).
        self.phase: str | None = None
        self.peak_phase: str | None = None
        # storage key -> [counted bytes, finalizer, serial, exact nbytes]. The serial names a storage for
        # its whole life and is never reused (a freed storage's address is), so roles and the peak's live
        # set use it. The exact size is kept so the free path hands the observer an integer, not a tensor.
        self._live: dict[int, list[Any]] = {}
        self._serials = itertools.count()
        self._roles: dict[int, str] = {}          # serial -> "parameters" | "gradients" | "optimizer_state"
        self._peak_live: dict[int, int] = {}      # serial -> bytes, the live set at the peak
        self._peak_pending = False                # a new peak whose live set is not yet copied
        self._lock = threading.RLock()  # re-entrant: a finalizer can fire inside our own bookkeeping
        self._hooks: list[Any] = []
        self._closed = False

    # -- seeding --------------------------------------------------------------------------------

    def track(self, *objects: Any) -> None:
        """Count tensors that already exist, from now on.

        Args:
            objects: tensors; modules (their parameters, buffers and gradients); optimizers (their state);
                or lists, tuples and dicts of these. For modules and optimizers the tracker also learns which
                storages are parameters (buffers count with them), gradients and optimizer state, through
                hooks that run as gradients are accumulated and after each optimizer step.
        """
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                for p in obj.parameters():
                    self._add_tensor(p, "parameters")
                    if p.grad is not None:
                        self._add_tensor(p.grad, "gradients")
                    if p.requires_grad:
                        self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
                for b in obj.buffers():
                    self._add_tensor(b, "parameters")
                self._hooks += watch_fsdp(self._add_tensor, obj)  # FSDP2: gathered units and sharded grads
            elif isinstance(obj, torch.optim.Optimizer):
                # accelerate (and others) wrap the optimizer; hooks belong on the one that steps.
                while isinstance(getattr(obj, "optimizer", None), torch.optim.Optimizer):
                    obj = obj.optimizer
                self._on_optimizer_step(obj)
                self._hooks.append(obj.register_step_post_hook(self._on_optimizer_step))
            elif isinstance(obj, torch.Tensor):
                self._add_tensor(obj)
            elif isinstance(obj, Mapping):
                self.track(*obj.values())
            elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
                self.track(*obj)
        self._note_peak()

    # -- the figures ----------------------------------------------------------------------------

    @property
    def peak_breakdown(self) -> dict[str, int]:
        """The peak split into CATEGORIES, in bytes; the values sum to `peak_bytes`.

        A storage counts in the role it had, or took on later in the window (a gradient computed in
        backward before it was stored in `.grad`, an optimizer moment made inside the step).
        """
        with self._lock:
            if self._peak_pending and self.current_bytes == self.peak_bytes:
                self._copy_peak()
            split = dict.fromkeys(CATEGORIES, 0)
            for serial, nbytes in self._peak_live.items():
                split[self._roles.get(serial, "activations")] += nbytes
            return split

    def reset_peak(self) -> None:
        """Start a new measured window: the peak becomes the current live bytes."""
        with self._lock:
            self.peak_bytes = self.current_bytes
            self.peak_phase = self.phase
            self._peak_pending = True

    # -- the dispatch mode ----------------------------------------------------------------------

    def __enter__(self):
        if self._closed:
            raise RuntimeError("a LiveBytes tracker measures one window; make a new one for the next.")
        return super().__enter__()

    def __exit__(self, exc_type, exc, tb):
        try:
            return super().__exit__(exc_type, exc, tb)
        finally:
            self._close()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.track_inputs:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    self._add_tensor(t)
        out = func(*args, **kwargs)
        added = 0
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                added += self._add_tensor(t)
        if added > 0:
            # Refuse before noting the peak: like a real allocator, a refused allocation was never held,
            # so it must not become the window's peak (a split-and-retried step would report it).
            if self.limit_bytes is not None and self.current_bytes > self.limit_bytes:
                self.requested_bytes = added
                raise CpuOutOfMemoryError(added, self.current_bytes, self.limit_bytes)
            self._note_peak()
        return out

    # -- bookkeeping ----------------------------------------------------------------------------

    def _add_tensor(self, t: torch.Tensor, role: str | None = None) -> int:
        """Count `t`'s storage if new, or its growth if resized; return the bytes added (may be negative)."""
        if self._closed:
            return 0
        t = local_tensor(t)  # a DTensor (FSDP2 shard) holds its local shard's bytes, not its logical size
        try:
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):
            return 0  # no storage to count (sparse, nested, some wrapper subclasses)
        key = storage._cdata
        changed = True            # a new storage, or a resize: the observer hears of it
        freed: int | None = None  # a resize: the exact bytes it replaces
        with self._lock:
            entry = self._live.get(key)
            if entry is None:
                finalizer = weakref.finalize(storage, self._on_free, key)
                finalizer.atexit = False
                counted = self._counted(nbytes)
                entry = self._live[key] = [counted, finalizer, next(self._serials), nbytes]
                delta = counted
            elif nbytes != entry[3]:
                counted = self._counted(nbytes)
                delta = counted - entry[0]
                if delta < 0:
                    self._before_decrease()
                freed = entry[3]
                entry[0], entry[3] = counted, nbytes
            else:
                changed, delta = False, 0  # known storage, same size: at most a new role
            self.current_bytes += delta
            if role is not None and self._roles.get(entry[2]) != "parameters":
                self._roles[entry[2]] = role
        if changed and self._observer is not None:
            if freed is not None:
                self._observer.on_free(key, freed)
            self._observer.on_alloc(key, nbytes)
        return delta

    def _counted(self, nbytes: int) -> int:
        return nbytes if self._size_of is None else self._size_of(nbytes)

    def _on_free(self, key: int) -> None:
        # Runs while PyTorch deallocates a storage, possibly in the middle of assigning a tensor
        # attribute (`p.grad = None`): touch no tensor here, only our own dicts.
        with self._lock:
            entry = self._live.get(key)
            if entry is None:
                return
            self._before_decrease()
            del self._live[key]
            self.current_bytes -= entry[0]
        if self._observer is not None:
            self._observer.on_free(key, entry[3])  # a recorded integer: no tensor is read while freeing

    def _on_grad(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self._add_tensor(param.grad, "gradients")

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        for t in _optimizer_tensors(optimizer):
            self._add_tensor(t, "optimizer_state")

    def _note_peak(self) -> None:
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self.peak_phase = self.phase
            self._peak_pending = True

    def _before_decrease(self) -> None:
        # Live bytes are about to fall. If they stand at a peak whose live set is not yet copied, the
        # live set now is exactly the peak's: copy it before it changes.
        if self._peak_pending and self.current_bytes == self.peak_bytes:
            self._copy_peak()

    def _copy_peak(self) -> None:
        self._peak_live = {entry[2]: entry[0] for entry in self._live.values()}
        self._peak_pending = False

    def _close(self) -> None:
        with self._lock:
            if self._peak_pending and self.current_bytes == self.peak_bytes:
                self._copy_peak()
            self._closed = True
            for entry in self._live.values():
                entry[1].detach()
            self._live.clear()
            for hook in self._hooks:
                hook.remove()
            self._hooks.clear()

def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = []
    for state in list(optimizer.state.values()):
        if isinstance(state, Mapping):
            out += [v for v in list(state.values()) if isinstance(v, torch.Tensor)]
    return out
