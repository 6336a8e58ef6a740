"""Each row of a sweep in a fresh process of its own, forked from a server that preloaded torch.

Rows measured one after the other in one process were not reproducible on a GPU (bert-base 32x512 on
an H200: `low-memory` peaked at 3.61 GB after the fp16 row and 2.28 GB after the baseline). The cause:
accelerate's mixed precision makes reference cycles (`model._original_forward` is a bound method of
the model; with a GradScaler the optimizer's patched `step` refers back to the optimizer), so a
bf16/fp16 row's model, and an fp16 row's optimizer state, outlived the row until Python's cyclic
collector happened to run, which depended on how many Python objects the process had made (the CLI's
progress display, `--steps`, the order of the recipes). An in-process sweep can collect them
(`profile_recipe` does), but it cannot undo everything else a row leaves in a process: allocator
caches and fragmentation, library workspaces, autocast and compile caches, malloc arenas in
`peak_rss_bytes`, accelerate's process-wide state, a CUDA memory fraction. A fresh process per recipe
leaves nothing to undo, and it also makes out-of-memory recovery (even the kernel's OOM killer: the
row says the process died) and `--max-memory` on CUDA clean. The price is the start of a process: a
`forkserver` that imports torch, transformers and accelerate once (a few seconds, overlapped with
preparing the samples) forks each row's process in milliseconds, and the process builds its model as
an in-process row would. `SweepSpec(isolate=False)` keeps the in-process loop for debugging (and for
tests that patch tfmem/profiler/row.py).

A row's process sends its step events and then its row back through a pipe; a process that dies
before sending its row (killed, or exited) still gives an `error` row that says how it died. Its log
records come back through the same pipe when this process has configured logging, and this process's
own loggers and handlers deal with them (the logging cookbook's "logging from multiple processes",
with a pipe for its queue): the CLI's format and level, or an application's file handler, apply to a
row as they would in-process, and nothing of the handlers has to be copied (a handler holds a lock
and a stream; a formatter keeps its format string private).
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from tfmem.profiler.batches import Sample
from tfmem.profiler.row import _first_line, _row_base, profile_recipe
from tfmem.recipe import Recipe

if TYPE_CHECKING:  # the sweep imports this module: its spec is a type here only
    from tfmem.profiler.sweep import SweepSpec


# What the fork server imports once, so that each row's process starts with them loaded (the sweep
# module imports row.py and this one).
_PRELOAD = ["torch", "transformers", "accelerate", "transformers.training_args", "transformers.models.bert.modeling_bert",
            "tfmem.profiler.sweep", "tfmem.adapters.accelerate"]


def _process_context():
    """A `forkserver` context (spawn where there is none): each row's process is forked from a server
    that imported torch and transformers once and never touched CUDA, so CUDA is initialised fresh in
    every row. Plain `fork` of this process would be faster still, but forking after CUDA or OpenMP
    threads have started is unsafe.

    The server is kept after the sweep, until this process exits (it watches a pipe to this process, so
    it never outlives it), and the next sweep reuses it: a fresh server would import torch, transformers
    and accelerate again. Measured on our 2-core CPU machine (one tiny row, tests/conftest.py's model): a
    second sweep took 0.7 s with the server kept, 7.7 s with it stopped. Its cost while kept: about
    380 MB resident (310 MB of it its own, PSS), and no GPU memory, as it never initialises CUDA. The
    CLI exits after its one sweep; the benchmarks and notebooks that sweep again are the ones served.
    Stopping it would also take a private call (multiprocessing has no public one). Row processes are
    never kept: each is joined (or killed) before its row is returned; tests/test_profiler_isolation.py
    checks both."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Only effective before the server starts (the first row of the process's first sweep).
    context.set_forkserver_preload(_PRELOAD)
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return context


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a row's process without it re-importing the caller's `__main__`.

    multiprocessing sends a new process the path (or name) of the parent's main module, and the process
    imports it before running its target, to find functions defined there. A row's target lives in
    tfmem, so that import is never needed, and it is harmful: a script that calls `run_sweep` at top
    level without an `if __name__ == "__main__":` guard would run again inside every row, which
    multiprocessing refuses, and every row would be an error. Without `__spec__` and `__file__` on the
    main module while the process starts, nothing is sent.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if main is not None and k in main.__dict__}
    try:
        for key in saved:
            if key == "__spec__":
                main.__spec__ = None
            else:
                del main.__file__
        yield
    finally:
        for key, value in saved.items():
            setattr(main, key, value)


def _profile_in_child(recipe: Recipe, spec: SweepSpec, samples: list[Sample], on_step: Callable[[int], None]) -> dict[str, Any]:
    """`profile_recipe` in a fresh process; its step events come back through a pipe, then its row."""
    context = _process_context()
    receiver, sender = context.Pipe(duplex=False)
    plain = [(s.input_ids.tolist(), s.label) for s in samples]  # plain data: no tensor sharing to set up
    process = context.Process(target=_child_main, args=(sender, recipe, spec, plain, _log_levels()),
                              name=f"tfmem-profile-{recipe.name}", daemon=True)
    with _main_module_hidden():
        process.start()
    sender.close()  # the child holds the only writing end: EOF when it dies
    row = None
    try:
        while row is None:
            try:
                kind, info = receiver.recv()
            except EOFError:
                break
            if kind == "step":
                on_step(info)
            elif kind == "log":
                _handle_record(info)
            else:
                row = info
    finally:
        receiver.close()
        process.join(timeout=60 if row is not None else 5)
        if process.is_alive():  # interrupted, or a child that hangs on its way out
            process.kill()
            process.join()
    if row is None:
        row = _row_base(recipe, spec)
        row["message"] = _death_message(process.exitcode)
    return row


def _death_message(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        why = " (the system's out-of-memory killer sends it)" if -exitcode == signal.SIGKILL else ""
        return f"the recipe's process was killed by {name}{why} before it reported a row"
    return (f"the recipe's process exited with code {exitcode} before it reported a row (a script that runs a "
            "sweep must keep its top-level code under `if __name__ == \"__main__\":`, which multiprocessing re-imports "
            "in each row's process; or use SweepSpec(isolate=False))")


def _log_levels() -> dict[str, int] | None:
    """The levels a row's process gives its root and `tfmem` loggers before it sends its records here; None
    when this process has configured no logging.

    A process forked from the server starts with logging unconfigured. Unconfigured here too, it stays so,
    and shows what this process would show (tfmem's one-line summaries and warnings, on the same stderr).
    Configured, it makes the records these two levels let through, which are all that an in-process row
    would make unless the application set a lower level on some other logger; this process's own
    loggers then decide which to keep (`_handle_record`).
    """
    if not logging.getLogger().handlers:
        return None
    return {"": logging.getLogger().level, "tfmem": logging.getLogger("tfmem").level}


def _handle_record(record: logging.LogRecord) -> None:
    """A row's log record, handled by this process's logger of that name as if it had been logged here."""
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


class _Channel:
    """The writing end of a row's pipe, one message at a time: the training loop sends step events and the
    row, a log record can come from any thread. It is also the queue of a `QueueHandler`, which makes each
    record safe to send (its message formatted, its arguments and traceback object dropped)."""

    def __init__(self, connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def send(self, kind: str, info: Any) -> None:
        with self._lock:
            self._connection.send((kind, info))

    def put_nowait(self, record: logging.LogRecord) -> None:
        self.send("log", record)


def _child_main(sender, recipe: Recipe, spec: SweepSpec, plain: list[tuple[list[int], Any]],
                log_levels: dict[str, int] | None = None) -> None:
    """The body of a row's process: profile one recipe, send step events, log records and the row, exit."""
    channel = _Channel(sender)
    forward = logging.handlers.QueueHandler(channel)  # type: ignore[arg-type] - a queue is anything with put_nowait
    try:
        if log_levels is not None:
            for name, level in log_levels.items():
                logging.getLogger(name).setLevel(level)
            logging.getLogger().addHandler(forward)
        if spec.threads:
            torch.set_num_threads(spec.threads)
        device = spec.torch_device
        if spec.max_memory_bytes is not None and device.type == "cuda":
            # A real CUDA limit: the caching allocator refuses to grow this process past the fraction.
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(spec.max_memory_bytes / total, 1.0), device)
        samples = [Sample(torch.tensor(ids, dtype=torch.long), label) for ids, label in plain]
        row = profile_recipe(recipe, spec, samples, on_step=lambda i: channel.send("step", i))
    except BaseException as e:  # noqa: BLE001 - whatever happens, the parent gets a row
        row = _row_base(recipe, spec)
        row["message"] = f"{type(e).__name__}: {_first_line(str(e))}"
    try:
        channel.send("row", row)
    finally:
        logging.getLogger().removeHandler(forward)
        sender.close()
