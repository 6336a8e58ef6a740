"""MemoryProfilerCallback's end-of-training summary, and the order of `apply` and `attach`."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import transformers as tf
from test_profiler_callback import Dataset, tiny_trainer
from transformers import Trainer, TrainingArguments

from tfmem import Recipe
from tfmem.profiler import MemoryProfilerCallback
from tfmem.profiler.units import format_bytes


def test_the_summary_is_logged_once_at_the_end_in_mib_with_the_steps_it_rests_on(tmp_path, caplog):
    trainer = tiny_trainer(tmp_path, max_steps=5, per_device_train_batch_size=8, logging_steps=1)
    callback = MemoryProfilerCallback.attach(trainer)  # defaults: memory steps 1-2, warm-up step 3
    with caplog.at_level(logging.INFO, logger="tfmem"):
        trainer.train()
    logged = [r for r in caplog.records if "training summary" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO and logged[0].name.startswith("tfmem.")
    text = callback.summary()
    assert logged[0].getMessage() == text

    m = callback.metrics()
    assert text.startswith("tfmem: training summary on cpu")
    assert f"peak memory {format_bytes(m['tfmem/peak_allocated_bytes'])}: the peak of live tensor bytes, " \
           "the largest of steps 1-2" in text
    phases = {"forward": "the forward pass", "backward": "the backward pass", "optimizer": "the optimizer step"}
    assert callback.profiler.peak_phase in phases
    assert f"steps 1-2, reached during {phases[callback.profiler.peak_phase]}" in text
    for label, key in (("parameters", "parameters"), ("gradients", "gradients"),
                       ("optimizer state", "optimizer_state"), ("activations and temporaries", "activations")):
        assert f"{label} {format_bytes(m[f'tfmem/peak_{key}_bytes'])}" in text
    assert re.search(r"KiB|MiB|GiB", text) and not re.search(r"\d{6,}", text), "sizes for people, not raw bytes"
    assert f"process resident memory (RSS) at its peak: {format_bytes(m['tfmem/peak_rss_bytes'])}" in text
    assert m["tfmem/timed_steps"] == 2
    assert f"speed {m['tfmem/samples_per_second']:,.1f} samples/s, {m['tfmem/tokens_per_second']:,.0f} tokens/s" in text
    assert "over steps 4-5" in text
    assert "not timed: steps 1-2 (memory accounting slows them), step 3 (warm-up)" in text


def test_a_run_too_short_to_time_says_when_timing_would_start(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=2, per_device_train_batch_size=8)
    callback = MemoryProfilerCallback.attach(trainer)
    trainer.train()
    text = callback.summary()
    assert "peak memory" in text and "the largest of steps 1-2" in text
    assert "speed: not measured: timing starts at step 4 and the run had 2 step(s)" in text


def test_the_summary_before_training_says_there_is_nothing_yet():
    assert MemoryProfilerCallback().summary() == "tfmem: no training step ran, so there are no figures."


def _trainer(tmp_path) -> Trainer:
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, max_steps=4, per_device_train_batch_size=8, logging_steps=1)
    return Trainer(model=tf.BertForSequenceClassification(config), args=args, train_dataset=Dataset())


@pytest.mark.parametrize("order", ["apply, then attach", "attach, then apply"])
def test_apply_and_attach_work_in_either_order(tmp_path, order):
    """The callback reads the Trainer when training begins, so it sees the recipe whichever came first."""
    trainer = _trainer(tmp_path)
    recipe = Recipe.from_dict({"name": "r", "gradient_accumulation_steps": 2, "mixed_precision": "bf16",
                               "gradient_checkpointing": True})
    if order == "apply, then attach":
        recipe.apply(trainer)
        callback = MemoryProfilerCallback.attach(trainer, warmup_steps=0)
    else:
        callback = MemoryProfilerCallback.attach(trainer, warmup_steps=0)
        recipe.apply(trainer)
    trainer.train()
    assert trainer.args.per_device_train_batch_size == 4 and trainer.args.gradient_accumulation_steps == 2
    assert callback.profiler.mixed_precision == "bf16", "the profiler saw the recipe's precision"
    assert trainer.callback_handler.callbacks[0] is callback, "still ahead of the integrations"
    m = callback.metrics()
    # Every sample of the timed steps 3-4 was counted: 2 micro-batches of 4 per step.
    assert m["tfmem/timed_steps"] == 2 and m["tfmem/samples_per_second"] > 0
    assert callback.profiler.timed_samples == 16
    # Checkpointing ran under the measurement either way: the peak matches the other order's.
    reference = _reference_peak(tmp_path)
    assert m["tfmem/peak_allocated_bytes"] == reference


_PEAKS: dict[str, float] = {}


def _reference_peak(tmp_path) -> float:
    """The peak with the documented order (apply, then attach), measured once."""
    if "peak" not in _PEAKS:
        trainer = _trainer(tmp_path / "reference")
        Recipe.from_dict({"name": "r", "gradient_accumulation_steps": 2, "mixed_precision": "bf16",
                          "gradient_checkpointing": True}).apply(trainer)
        callback = MemoryProfilerCallback.attach(trainer, warmup_steps=0)
        trainer.train()
        _PEAKS["peak"] = callback.metrics()["tfmem/peak_allocated_bytes"]
    return _PEAKS["peak"]
