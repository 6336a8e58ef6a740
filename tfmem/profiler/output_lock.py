"""One sweep at a time per results folder: an exclusive lock on the folder for the whole sweep.

Two sweeps writing `results.json` into one folder would each rewrite it with only their own rows, and
the first to finish would lose its rows silently. The lock is taken by `run_sweep` itself, so a script
or notebook calling it gets the same protection as `tfmem profile`, which holds it around the sweep
and its chart.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".tfmem-profile.lock"

# Folders this process already holds: `tfmem profile` locks around `run_sweep`, which locks again.
# `flock` locks belong to an open file, so a second open in the same process would refuse itself.
_held: set[Path] = set()


class OutputLocked(ValueError):
    """Another sweep is writing into the same results folder."""


@contextlib.contextmanager
def output_lock(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if missing) while the block runs.

    `fcntl.flock` on a lock file: the kernel drops it when the process dies (even by kill -9), so a stale
    file never blocks a later run. The file holds the owner's PID for the message. Where there is no
    `fcntl` (Windows) nothing is locked. Re-entrant within one process.

    Raises:
        OutputLocked: another process holds the folder.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    key = Path(folder).resolve()
    if key in _held:
        yield
        return
    key.mkdir(parents=True, exist_ok=True)
    with open(key / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise OutputLocked(
                f"--output {str(folder)!r} is in use by another tfmem profile (PID {owner}); wait for it to "
                "finish or give another --output folder."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
