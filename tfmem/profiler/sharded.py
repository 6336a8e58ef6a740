"""Live-bytes accounting under FSDP2: local shards and gathered units, each counted once.

Two things FSDP2 does that `LiveBytes` cannot see through operators alone:

- Parameters, their gradients and the optimizer state of sharded parameters are `DTensor`s: wrapper
  tensors with no storage of their own, whose bytes are the *local* shard (`_local_tensor`). `LiveBytes`
  counts a DTensor as its local storage (`local_tensor`), never its logical (unsharded) size.
- A unit's gathered parameters live in buffers that FSDP2 allocates and frees by resizing their storage
  (`untyped_storage().resize_(n)` / `resize_(0)`), which is not an operator. The growth is seen by the
  first operator that writes into the buffer (the all-gather copy-out); the free would not be seen at all,
  so the tracker re-reads those buffers' sizes right after each unit gathers (`wait_for_unshard`) and
  reshards (`_to_sharded`, `_to_sharded_post_forward`).

FSDP2 also stores each reduced, sharded gradient with `param.grad = ...` (no post-accumulate-grad hook
fires), so after each unit's `post_backward` the tracker learns its gradients' role.

`watch_fsdp(tracker, model)` installs these per-instance wrappers on every FSDP parameter group of
`model` and returns handles whose `remove()` restores the group's own methods (the class is untouched).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# After these, a unit's gathered buffers have a new size: allocated (the copy-out writes into them, which a
# tracker that watches operator inputs sees at once; one that does not learns it here) or freed.
_RESHARD = ("wait_for_unshard", "_to_sharded", "_to_sharded_post_forward")
_GRADS = ("post_backward", "finalize_backward")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds `t`'s bytes on this rank: a DTensor's local shard, else `t` itself.

    Example:
        >>> t = torch.zeros(2)
        >>> local_tensor(t) is t
        True
    """
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


def param_groups(model: nn.Module) -> list[Any]:
    """Every FSDP2 parameter group in `model` (empty when it is not sharded)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return []  # nothing can be sharded without a process group; skip importing FSDP
    from torch.distributed.fsdp import FSDPModule

    groups = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            groups += [g for g in getattr(state, "_fsdp_param_groups", []) if g not in groups]
    return groups


def gathered_tensors(group: Any) -> list[torch.Tensor]:
    """The buffers holding `group`'s gathered (unsharded) parameters, whatever their current size."""
    out = []
    for fsdp_param in group.fsdp_params:
        out += list(getattr(fsdp_param, "all_gather_outputs", []))
        out += list(getattr(fsdp_param, "_unsharded_inner_tensors", []))
    return out


def gathered_bytes(group: Any) -> int:
    """Bytes of `group`'s gathered parameters now (0 while the unit is sharded): an independent count."""
    return sum(t.untyped_storage().nbytes() for t in gathered_tensors(group))


def flat_buffer_bytes(model: nn.Module) -> int:
    """Bytes of the flat all-gather buffers FSDP2 holds now: a unit's own until its copy-out, and in forward
    the last unit's, kept until the next unit's all-gather is waited on (to overlap the two)."""
    seen: dict[int, int] = {}
    for group in param_groups(model):
        results = [group._all_gather_result]
        state = getattr(group.comm_ctx, "all_gather_state", None)
        results.append(getattr(state, "all_gather_result", None))
        for result in results:
            if result is not None:
                storage = result.all_gather_output.untyped_storage()
                seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def sharded_bytes(model: nn.Module) -> int:
    """Bytes of this rank's local shards of `model`'s parameters, and of its other parameters and buffers.

    Read from FSDP's own records of the shards, since while a unit is gathered the module's parameters
    are its unsharded ones.
    """
    seen: dict[int, int] = {}
    tensors = [fp.sharded_param for g in param_groups(model) for fp in g.fsdp_params]
    managed = {id(t) for t in tensors}
    gathered = {t.untyped_storage()._cdata for g in param_groups(model) for t in gathered_tensors(g)}
    for t in tensors + [p for p in model.parameters() if id(p) not in managed] + list(model.buffers()):
        storage = local_tensor(t).untyped_storage()
        if storage._cdata not in gathered:
            seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


class _Restore:
    def __init__(self, group: Any, names: tuple[str, ...]) -> None:
        self.group, self.names = group, names

    def remove(self) -> None:
        for name in self.names:
            self.group.__dict__.pop(name, None)


def watch_fsdp(recount: Callable[[torch.Tensor, str | None], Any], model: nn.Module) -> list[_Restore]:
    """Make a tracker see FSDP2's storage resizes and sharded gradients in `model`.

    Args:
        recount: the tracker's `(tensor, role) -> ...` that (re)reads a tensor's storage size.
        model: a model sharded by FSDP2 (anything else: nothing to do).

    Returns:
        handles whose `remove()` undoes the wrapping.
    """
    handles = []
    for group in param_groups(model):
        if any(name in group.__dict__ for name in _RESHARD + _GRADS):
            continue  # already watched by another tracker
        for name in _RESHARD:
            group.__dict__[name] = functools.partial(_after, getattr(group, name), lambda g=group: _recount_gathered(recount, g))
        for name in _GRADS:
            group.__dict__[name] = functools.partial(_after, getattr(group, name), lambda g=group: _recount_grads(recount, g))
        handles.append(_Restore(group, _RESHARD + _GRADS))
    return handles


def _after(method: Callable[..., Any], then: Callable[[], None], *args: Any, **kwargs: Any) -> Any:
    out = method(*args, **kwargs)
    then()
    return out


def _recount_gathered(recount: Callable[[torch.Tensor, str | None], Any], group: Any) -> None:
    for t in gathered_tensors(group):
        recount(t, "parameters")  # a unit's gathered parameters count as parameters while they exist


def _recount_grads(recount: Callable[[torch.Tensor, str | None], Any], group: Any) -> None:
    for fsdp_param in group.fsdp_params:
        grad = fsdp_param.sharded_param.grad
        if grad is not None:
            recount(grad, "gradients")
