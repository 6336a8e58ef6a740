"""A sweep's row runs in a process of its own (tfmem/profiler/isolation.py): its log records come back to
this process's logging, and no process of the sweep outlives it but the fork server, which is kept."""

from __future__ import annotations

import logging

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
