"""The profiler: peak memory and throughput of training steps, measured.

    from tfmem.profiler import Profiler, MemoryProfilerCallback, LiveBytes

- `LiveBytes` (live_bytes.py): the exact count of live tensor bytes on CPU (and on fake tensors).
- `Profiler` (session.py): memory and speed windows around the steps of any loop (accelerate).
- `MemoryProfilerCallback` (callback.py): the same inside `transformers.Trainer`.
- `run_sweep` / `SweepSpec` (sweep.py): one model under each recipe, as `tfmem profile` runs it,
  each row in a fresh process (isolation.py) that trains and measures it (row.py); report.py writes
  its rows (results.json, results.csv, a PNG chart).
"""

from tfmem.profiler.live_bytes import CATEGORIES, AllocationObserver, LiveBytes
from tfmem.profiler.session import Profiler
from tfmem.profiler.storages import CpuOutOfMemoryError, storage_bytes, storage_key

__all__ = [
    "CATEGORIES",
    "AllocationObserver",
    "CpuOutOfMemoryError",
    "LiveBytes",
    "MemoryProfilerCallback",
    "Profiler",
    "SweepSpec",
    "run_sweep",
    "storage_bytes",
    "storage_key",
]


def __getattr__(name: str):
    # Imported on first use: the callback needs transformers and the sweep accelerate, which users of
    # LiveBytes alone (the estimator) should not pay for.
    if name == "MemoryProfilerCallback":
        from tfmem.profiler.callback import MemoryProfilerCallback

        return MemoryProfilerCallback
    if name in ("SweepSpec", "run_sweep"):
        from tfmem.profiler import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module 'tfmem.profiler' has no attribute {name!r}")
