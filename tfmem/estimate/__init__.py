"""Predict the peak memory of a training step before training, and plan the fastest recipe that fits.

    estimate_memory(model_or_config, recipe, batch_size, seq_len, device="cuda") -> MemoryEstimate
    plan(model_or_config, batch_size, seq_len, budget_bytes, device=...) -> Plan

Data flow: the estimator runs the real model's training step on fake tensors with the recipe applied
(fake_step.py), counted by the profiler's live-bytes tracker as the target device's allocator would
count it (device.py, allocator.py, tracking.py), with what the target's kernels allocate where they differ
from the CPU code the fake step runs (attention.py, kernels.py). The planner (plan.py, speed.py) searches
recipes with it.
"""

from tfmem.estimate.device import GPUS, DeviceProfile, device_profile
from tfmem.estimate.estimator import MemoryEstimate, estimate_memory
from tfmem.estimate.plan import Candidate, Plan, plan
from tfmem.estimate.speed import SpeedModel

__all__ = ["GPUS", "Candidate", "DeviceProfile", "MemoryEstimate", "Plan", "SpeedModel", "device_profile",
           "estimate_memory", "plan"]
