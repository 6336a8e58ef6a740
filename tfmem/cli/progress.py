"""A transient status line on stderr while `tfmem plan` / `tfmem estimate` work (seconds to minutes).

Only on a terminal: piped or logged, stderr gets nothing extra, and stdout never gets anything from here, so
`--json` output is the same byte for byte. The library reports progress through callbacks
(`tfmem.estimate.search.SearchStep`); this module renders it, as `tfmem profile` renders its sweep's events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console


def stderr_console() -> Console:
    """Where the status goes (tests replace this with a Console(force_terminal=True) on a buffer)."""
    return Console(stderr=True)


@contextmanager
def status(label: str) -> Iterator[Callable[[str], None] | None]:
    """Show "`label`..." on stderr while the block runs; yields `update(text)` ("label: text"), or None when
    stderr is not a terminal (pass that None on as the library's callback: then nothing is called at all)."""
    console = stderr_console()
    if not console.is_terminal:
        yield None
        return
    from rich.live import Live
    from rich.spinner import Spinner

    spinner = Spinner("dots", f"{label}...", style="status.spinner")
    # transient: the line is erased when the block ends, so the command's own output reads as before. Not
    # `console.status`: its Live redirects sys.stdout into this (stderr) console, and stdout must stay stdout.
    with Live(spinner, console=console, transient=True, refresh_per_second=12.5, redirect_stdout=False) as live:
        def update(text: str) -> None:
            spinner.update(text=f"{label}: {text}")
            live.refresh()  # now, not at the next tick: a fast estimate would otherwise never be shown

        yield update


def search_callback(update: Callable[[str], None] | None):
    """`update` as a `progress` callback for `plan` / `plan_sharded` (None stays None)."""
    if update is None:
        return None
    return lambda step: update(step.text())
