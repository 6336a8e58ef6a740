"""auto_micro_batch: out-of-memory in training halves the micro-batch; the effective batch and the
gradients stay what the smaller micro-batch would have given from the start.

Out-of-memory is real here: the CPU profiler's `LiveBytes` tracker raises `torch.OutOfMemoryError`
when live tensor bytes cross a limit set between the peaks of micro-batches of 4 and 8 rows.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from _grad_check import (
    EFFECTIVE_BATCH,
    N_SAMPLES,
    GradientRecorder,
    RecordingCollator,
    collate,
    make_model,
    make_samples,
    reference_gradient,
    relative_error,
)
from accelerate import Accelerator
from transformers import Trainer, TrainingArguments

import tfmem
from tfmem import Recipe
from tfmem.profiler.live_bytes import LiveBytes
from tfmem.techniques.micro_batch import MicroBatchSplitter, split_batch

# Skip, rather than fail to collect, where `datasets` is missing (the GPU machines).
Dataset = pytest.importorskip("datasets", reason="the GPU machines may lack `datasets`").Dataset

STEPS = 2  # effective batch 16 -> micro-batches of 8, which will not fit; 4 will


def step_peak(model, samples, rows: int) -> int:
    """Peak live bytes of two forward/backward passes over `rows` rows (the second with gradients held)."""
    model = copy.deepcopy(model)
    batch = collate([{k: samples[k][i] for k in ("input_ids", "attention_mask", "labels")} for i in range(rows)])
    tracker = LiveBytes()
    tracker.track(model, batch)
    with tracker:
        for _ in range(2):
            model(**batch).loss.backward()
    return tracker.peak_bytes


def memory_limit(model, samples) -> int:
    small, large = step_peak(model, samples, 4), step_peak(model, samples, 8)
    assert large > small
    return (small + large) // 2


def test_trainer_out_of_memory_halves_the_micro_batch_and_keeps_the_gradient(tmp_path, caplog):
    model, samples = make_model("masked_lm"), make_samples("masked_lm")
    initial = copy.deepcopy(model)
    limit = memory_limit(model, samples)
    recorder, collator = GradientRecorder(), RecordingCollator()
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=EFFECTIVE_BATCH,
        num_train_epochs=1, learning_rate=0.0, optim="sgd", max_grad_norm=0.0, train_sampling_strategy="sequential",
        remove_unused_columns=False, save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(samples), data_collator=collator,
                      callbacks=[recorder])
    Recipe.from_dict({"name": "auto", "gradient_accumulation_steps": STEPS, "auto_micro_batch": True}).apply(trainer)
    tracker = LiveBytes(limit_bytes=limit)
    tracker.track(trainer.model)
    with caplog.at_level(logging.WARNING, logger="tfmem"), tracker:
        trainer.train()

    splitter = trainer.tfmem_micro_batch_splitter
    assert splitter.events and splitter.events[0]["rows"] == 8, "the limit should have forced an out-of-memory"
    # 2 pieces, or 4 if the gradient copies this test keeps push the 4-row pieces over the limit too.
    assert splitter.parts in (2, 4)
    assert "out of memory on a micro-batch of 8 rows; retrying it as 2 x 4" in caplog.text
    assert trainer.state.global_step == 2, "the run finishes"
    assert tracker.peak_bytes <= limit, "what ran stayed under the limit (the refused allocation was never held)"
    # The loader still hands out micro-batches of 8 (split inside): the effective batch is unchanged.
    windows = [sum(collator.micro_batches[i:i + STEPS], []) for i in range(0, len(collator.micro_batches), STEPS)]
    assert [len(w) for w in windows] == [16, 12]
    assert len(recorder.steps) == 2
    for got, window in zip(recorder.steps, windows):
        assert relative_error(got, reference_gradient(initial, samples, window)) <= 1e-9


def test_accelerate_out_of_memory_halves_the_micro_batch_and_keeps_the_gradient():
    model, samples = make_model("classification"), make_samples("classification")
    initial = copy.deepcopy(model)
    limit = memory_limit(model, samples)
    recipe = Recipe.from_dict({"name": "auto", "gradient_accumulation_steps": STEPS, "auto_micro_batch": True})
    accelerator = Accelerator(**recipe.accelerator_kwargs(device="cpu"))
    model = recipe.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    rows = [{k: samples[k][i] for k in samples} for i in range(N_SAMPLES)]
    loader = torch.utils.data.DataLoader(rows, batch_size=EFFECTIVE_BATCH // STEPS, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    splitter = recipe.micro_batch_splitter(model)
    tracker = LiveBytes(limit_bytes=limit)
    tracker.track(model)
    steps, windows, current = [], [], []
    with tracker:
        for window in tfmem.accumulation_windows(loader, accelerator, model):
            current += window.batch.pop("idx").tolist()
            with accelerator.accumulate(model):
                tfmem.backward_step(model, window, accelerator, splitter)
                if accelerator.sync_gradients:
                    steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
                    windows.append(current)
                    current = []
                optimizer.step()
                optimizer.zero_grad()
    assert splitter.events and splitter.events[0]["rows"] == 8
    assert splitter.parts in (2, 4)
    assert [len(w) for w in windows] == [16, 12]
    for got, window in zip(steps, windows):
        assert relative_error(got, reference_gradient(initial, samples, window)) <= 1e-9


def test_out_of_memory_midway_through_backward_does_not_count_a_gradient_twice():
    """The failure that needs care: some parameters already hold this micro-batch's gradient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    reference = copy.deepcopy(model)
    reference(x).sum().backward()

    failures = {"left": 1}

    def fail_in_backward(grad):  # runs after the last layer's gradient is accumulated, before the first's
        if failures["left"] and grad.shape[0] == 8:
            failures["left"] -= 1
            raise torch.OutOfMemoryError("simulated")
        return grad

    def step(batch):
        hidden = model[0](batch["x"])
        hidden.register_hook(fail_in_backward)
        loss = model[2](model[1](hidden)).sum()
        loss.backward()
        return loss

    splitter = MicroBatchSplitter(model)
    splitter.run({"x": x}, step)
    assert splitter.parts == 2
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)


def test_a_single_row_that_does_not_fit_is_reported():
    model = torch.nn.Linear(2, 1)

    def step(batch):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError, match="single row.*gradient checkpointing"):
        MicroBatchSplitter(model).run({"x": torch.zeros(4, 2)}, step)


def test_split_batch_keeps_non_batch_values():
    chunks = split_batch({"x": torch.arange(6).view(3, 2), "flag": True}, 2)
    assert [c["x"].shape[0] for c in chunks] == [2, 1]
    assert all(c["flag"] is True for c in chunks)
