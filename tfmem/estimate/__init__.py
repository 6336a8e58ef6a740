"""Predict the peak memory of a training step before training, and plan the fastest recipe that fits.

    estimate_memory(model_or_config, recipe, batch_size, seq_len, device="cuda") -> MemoryEstimate
    plan(model_or_config, batch_size, seq_len, budget_bytes, device=...) -> Plan

Data flow: the estimator runs the real model's training step on fake tensors with the recipe applied
(fake_step.py), counted by the profiler's live-bytes tracker as the target device's allocator would
count it (device.py, allocator.py, tracking.py), with what the target's kernels allocate where they differ
from the CPU code the fake step runs (attention.py, kernels.py). Each estimate's fake-step result is kept on
disk (cache.py), so a repeated one reads it. The planner (plan.py, speed.py) searches recipes with it.

The names below are imported on first use (PEP 562 module `__getattr__`), as in `tfmem/__init__.py`:
the estimator imports torch and transformers, and `tfmem estimate --help` needs only device.py's GPU
table. One name is also a submodule: once tfmem/estimate/plan.py has been imported directly, the
attribute `tfmem.estimate.plan` is that module, so call the planner as `tfmem.plan(...)` or
`from tfmem.estimate.plan import plan`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "GPUS": "tfmem.estimate.device",
    "DeviceProfile": "tfmem.estimate.device",
    "device_profile": "tfmem.estimate.device",
    "MemoryEstimate": "tfmem.estimate.estimator",
    "estimate_memory": "tfmem.estimate.estimator",
    "Candidate": "tfmem.estimate.plan",
    "Plan": "tfmem.estimate.plan",
    "plan": "tfmem.estimate.plan",
    "SpeedModel": "tfmem.estimate.speed",
}
__all__ = ["GPUS", "Candidate", "DeviceProfile", "MemoryEstimate", "Plan", "SpeedModel", "device_profile",
           "estimate_memory", "plan"]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time `__getattr__` imports on demand
    from tfmem.estimate.device import GPUS, DeviceProfile, device_profile
    from tfmem.estimate.estimator import MemoryEstimate, estimate_memory
    from tfmem.estimate.plan import Candidate, Plan, plan
    from tfmem.estimate.speed import SpeedModel


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tfmem.estimate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups find it directly (for `plan`: replaces the submodule)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
