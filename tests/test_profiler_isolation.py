"""A sweep's row runs in a process of its own (tfmem/profiler/isolation.py): its log records come back to
this process's logging, and no process of the sweep outlives it but the fork server, which is kept."""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path

import pytest

from tfmem.profiler.sweep import SweepSpec, run_sweep
from tfmem.recipe import Recipe


def one_row(model_dir) -> SweepSpec:
    return SweepSpec(model=model_dir, recipes=(Recipe.load("checkpointing"),), batch_size=4, seq_len=16, steps=1,
                     warmup_steps=0, memory_steps=1, device="cpu", include_baseline=False)


def test_a_rows_log_records_reach_this_processs_handlers_at_its_levels(tiny_model_dir, caplog):
    """The row's process has none of this process's handlers: its records must come back, as logged here."""
    caplog.set_level(logging.INFO)
    rows = run_sweep(one_row(tiny_model_dir))
    assert rows[0]["status"] == "ok"
    summaries = [r for r in caplog.records if r.name == "tfmem.summary"]
    assert [r.processName for r in summaries] == ["tfmem-profile-checkpointing"]  # logged in the row's process
    assert summaries[0].getMessage().startswith("tfmem: prepared BertForSequenceClassification for checkpointing")

    caplog.clear()
    caplog.set_level(logging.WARNING)  # as `tfmem profile` without -v: no summary line per row
    run_sweep(one_row(tiny_model_dir))
    assert [r for r in caplog.records if r.name == "tfmem.summary"] == []


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid` (zombies included), with their command lines, read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == pid:
                    found[int(entry.name)] = (entry / "cmdline").read_text().replace("\0", " ")
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
    return found


def _fork_servers() -> list[int]:
    return [pid for pid, command in _children(os.getpid()).items() if "multiprocessing.forkserver" in command]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc (Linux)")
def test_after_a_sweep_no_row_process_is_left_and_the_fork_server_is_kept_for_the_next(tiny_model_dir):
    """Kept on purpose (see `_process_context`): a second sweep in this process reuses the preloaded server."""
    run_sweep(one_row(tiny_model_dir))
    assert multiprocessing.active_children() == []
    servers = _fork_servers()
    assert len(servers) == 1
    assert _children(servers[0]) == {}  # every row's process has exited and been reaped

    run_sweep(one_row(tiny_model_dir))
    assert _fork_servers() == servers  # the same server, not a second one
    assert _children(servers[0]) == {} and multiprocessing.active_children() == []


@pytest.mark.cuda
def test_the_kept_fork_server_holds_no_gpu(tiny_model_dir):
    """What keeping the server costs on a GPU machine: nothing on the GPU. It must never initialise CUDA
    (every row's process does, fresh); a process that has opens the driver's /dev/nvidia* files."""
    rows = run_sweep(SweepSpec(model=tiny_model_dir, recipes=(), batch_size=4, seq_len=16, steps=1,
                               warmup_steps=0, memory_steps=1, device="cuda"))
    assert rows[0]["status"] == "ok"
    (server,) = _fork_servers()
    opened = [os.readlink(fd) for fd in Path(f"/proc/{server}/fd").iterdir()]
    assert not [name for name in opened if name.startswith("/dev/nvidia")], opened
