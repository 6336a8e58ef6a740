"""Gradient accumulation gives the full-batch gradient, on the Trainer path and the accelerate path.

Models run in float64 so that the only difference left is summation order (relative error ~1e-15);
the bar is 1e-9. Micro-batches hold different numbers of real tokens (masked and causal LM), and
the epoch ends on a short accumulation window (28 samples, effective batch 16: windows of 16 and 12).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _grad_check import (
    EFFECTIVE_BATCH,
    N_SAMPLES,
    STEPS,
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
from tfmem.techniques.accumulation import micro_batch_size

# Skip, rather than fail to collect, where `datasets` is missing (the GPU machines).
Dataset = pytest.importorskip("datasets", reason="the GPU machines may lack `datasets`").Dataset


def run_trainer(task: str, tmp_path, *, apply_recipe: bool = True, recipe: dict | None = None, user_steps: int = 1):
    model = make_model(task)
    initial = copy.deepcopy(model)
    samples = make_samples(task)
    recorder, collator = GradientRecorder(), RecordingCollator()
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=EFFECTIVE_BATCH,
        num_train_epochs=1, learning_rate=0.0, optim="sgd", max_grad_norm=0.0, weight_decay=0.0,
        train_sampling_strategy="sequential", remove_unused_columns=False, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0,
    )
    recipe = Recipe.from_dict(recipe or {"name": "acc", "gradient_accumulation_steps": STEPS})
    if user_steps > 1:  # the user accumulates in the arguments; the recipe adds other techniques
        args.per_device_train_batch_size = micro_batch_size(EFFECTIVE_BATCH, user_steps)
        args.gradient_accumulation_steps = user_steps
    if not apply_recipe:  # what a user gets from transformers alone with the same split
        args.per_device_train_batch_size = micro_batch_size(EFFECTIVE_BATCH, STEPS)
        args.gradient_accumulation_steps = STEPS
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(samples), data_collator=collator,
                      callbacks=[recorder])
    if apply_recipe:
        recipe.apply(trainer)
    trainer.train()
    windows = [sum(collator.micro_batches[i:i + STEPS], []) for i in range(0, len(collator.micro_batches), STEPS)]
    return initial, samples, recorder.steps, windows, collator.micro_batches


@pytest.mark.parametrize("task", ["classification", "masked_lm", "causal_lm"])
def test_trainer_accumulated_gradient_equals_full_batch_gradient(task, tmp_path):
    initial, samples, steps, windows, micro = run_trainer(task, tmp_path)
    assert [len(m) for m in micro] == [4] * 7, "the recipe should split the batch of 16 into micro-batches of 4"
    assert [len(w) for w in windows] == [16, 12], "the epoch should end on a short window"
    assert len(steps) == 2
    for got, window in zip(steps, windows):
        assert relative_error(got, reference_gradient(initial, samples, window)) <= 1e-9


def test_without_tfmem_transformers_alone_gets_the_accumulated_gradient_wrong(tmp_path):
    """Documents the failure the recipe closes: BERT accepts `num_items_in_batch` and ignores it."""
    initial, samples, steps, windows, _ = run_trainer("classification", tmp_path, apply_recipe=False)
    assert relative_error(steps[0], reference_gradient(initial, samples, windows[0])) > 0.5


def run_accelerate(task: str, *, exact: bool = True):
    model = make_model(task)
    initial = copy.deepcopy(model)
    samples = make_samples(task)
    recipe = Recipe.from_dict({"name": "acc", "gradient_accumulation_steps": STEPS})
    accelerator = Accelerator(**recipe.accelerator_kwargs(device="cpu"))
    model = recipe.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    rows = [{k: samples[k][i] for k in samples} for i in range(N_SAMPLES)]
    loader = torch.utils.data.DataLoader(rows, batch_size=micro_batch_size(EFFECTIVE_BATCH, STEPS), collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps, windows, current = [], [], []
    batches = tfmem.accumulation_windows(loader, accelerator, model) if exact else loader
    for item in batches:
        batch = item.batch if exact else item
        current += batch.pop("idx").tolist()
        with accelerator.accumulate(model):
            outputs = model(**batch)
            loss = tfmem.exact_loss(model, outputs, item, accelerator) if exact else outputs.loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
                windows.append(current)
                current = []
            optimizer.step()
            optimizer.zero_grad()
    return initial, samples, steps, windows


@pytest.mark.parametrize("task", ["classification", "masked_lm", "causal_lm"])
def test_accelerate_accumulated_gradient_equals_full_batch_gradient(task):
    initial, samples, steps, windows = run_accelerate(task)
    assert [len(w) for w in windows] == [16, 12], "one optimizer step per window, the last one short"
    for got, window in zip(steps, windows):
        assert relative_error(got, reference_gradient(initial, samples, window)) <= 1e-9


def test_accelerate_plain_loss_is_not_exact_for_token_losses():
    """What `exact_loss` fixes: averaging micro-batch means weights tokens unequally."""
    initial, samples, steps, windows = run_accelerate("masked_lm", exact=False)
    assert relative_error(steps[0], reference_gradient(initial, samples, windows[0])) > 1e-4


def test_accumulation_windows_count_items_over_the_whole_window():
    loader = [{"labels": torch.tensor([[1, -100], [2, 3]])}, {"labels": torch.tensor([[4, 5], [-100, -100]])},
              {"labels": torch.tensor([[6, -100], [-100, -100]])}]

    class FakeAccelerator:
        gradient_accumulation_steps = 2

    windows = list(tfmem.accumulation_windows(loader, FakeAccelerator(), torch.nn.Linear(1, 1)))
    assert [int(w.num_items) for w in windows] == [5, 5, 1]
    assert [w.num_micro_batches for w in windows] == [2, 2, 1]


def test_accumulation_set_in_the_arguments_is_made_exact_by_any_recipe(tmp_path):
    """The user accumulates in TrainingArguments and applies a recipe that does not accumulate."""
    recipe = {"name": "ckpt", "gradient_checkpointing": True}
    initial, samples, steps, windows, micro = run_trainer("classification", tmp_path, recipe=recipe, user_steps=STEPS)
    assert [len(w) for w in windows] == [16, 12]
    for got, window in zip(steps, windows):
        assert relative_error(got, reference_gradient(initial, samples, window)) <= 1e-9
