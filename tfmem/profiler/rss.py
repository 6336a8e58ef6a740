"""Peak resident memory of this process, per measured window.

Linux keeps the high-water mark of resident memory (`VmHWM` in /proc/self/status) and lets a process
reset it (writing 5 to /proc/self/clear_refs, Linux 4.0+), so a window's own peak can be read.
Elsewhere only the lifetime peak is known (`getrusage`); `reset_peak_rss()` then returns False and the
figure covers everything the process did before.

Resident memory is not tensor memory: it includes the interpreter, libraries, and memory malloc keeps
for reuse after earlier work in the same process. It answers "will the process fit in RAM?".
"""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def reset_peak_rss() -> bool:
    """Set the process's peak resident memory to its current value; False where the OS cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        logger.debug("cannot reset the peak resident memory on this system; it covers the whole process")
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory of this process in bytes, since the last `reset_peak_rss()` where supported."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
