"""MemoryProfilerCallback: a Trainer run puts the figures in log_history and in what integrations receive."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers import Trainer, TrainerCallback, TrainingArguments

from tfmem.profiler import MemoryProfilerCallback

SEQ = 24


class Dataset(torch.utils.data.Dataset):
    """Padded samples of varying real length."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=g)
        self.ids = torch.randint(5, 128, (n, SEQ), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = (torch.arange(SEQ) < self.lengths[i]).long()
        return {"input_ids": self.ids[i] * mask, "attention_mask": mask, "labels": self.labels[i]}


class Recorder(TrainerCallback):
    """Stands in for a `report_to` integration: keeps what `on_log` hands it."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def tiny_trainer(tmp_path, eval_dataset=None, **kwargs) -> Trainer:
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, **kwargs)
    return Trainer(model=tf.BertForSequenceClassification(config), args=args, train_dataset=Dataset(),
                   eval_dataset=eval_dataset)


def test_trainer_with_a_low_memory_recipe_is_profiled(tmp_path):
    from tfmem import Recipe

    trainer = tiny_trainer(tmp_path, max_steps=3, per_device_train_batch_size=8, logging_steps=1)
    Recipe.load("low-memory").apply(trainer)  # accumulation, checkpointing, bf16
    MemoryProfilerCallback.attach(trainer, memory_steps=5, warmup_steps=0)  # longer than the run
    trainer.train()
    last = trainer.state.log_history[-1]
    assert last["tfmem/peak_gradients_bytes"] > 0 and last["tfmem/peak_optimizer_state_bytes"] > 0
    assert "tfmem/samples_per_second" not in last  # every step was in the memory window: none timed


def test_trainer_run_logs_the_figures(tmp_path):
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)
    model = tf.BertForSequenceClassification(config)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        logging_steps=2, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    recorder = Recorder()
    dataset = Dataset()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[recorder])
    callback = MemoryProfilerCallback.attach(trainer, memory_steps=1, warmup_steps=1)
    trainer.train()

    logged = [row for row in trainer.state.log_history if "tfmem/peak_allocated_bytes" in row]
    assert logged, trainer.state.log_history
    last = trainer.state.log_history[-1]  # the end-of-training log carries the final figures
    for key in ("tfmem/peak_allocated_bytes", "tfmem/samples_per_second", "tfmem/tokens_per_second",
                "tfmem/step_time_seconds", "tfmem/peak_activations_bytes", "tfmem/peak_rss_bytes"):
        assert last[key] > 0, key
    # Steps: 1 in the memory window, 1 warm-up, 3 timed, each of 2 micro-batches of 4 samples.
    assert last["tfmem/timed_steps"] == 3
    assert callback.profiler.timed_samples == 3 * 2 * 4
    # Real tokens: the attention-mask ones, not the padded length.
    assert callback.profiler.timed_tokens < callback.profiler.timed_padded_tokens == 3 * 2 * 4 * SEQ
    # An integration registered before the profiler (as report_to's are) still receives the figures.
    assert any("tfmem/samples_per_second" in logs for logs in recorder.logs)
    assert torch._C._len_torch_dispatch_stack() == 0


def test_a_train_that_fails_inside_a_step_leaves_nothing_behind(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=3, per_device_train_batch_size=8)
    model = trainer.model
    MemoryProfilerCallback.attach(trainer, limit_bytes=1000)  # below the parameters: the first op fails
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train()
    assert torch._C._len_torch_dispatch_stack() == 0  # no tracker intercepts later ops...
    assert not model._forward_pre_hooks  # ...the counting hook is gone...
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())  # ...and the tracker's hooks
    assert (torch.zeros(10_000) + 1).sum() == 10_000  # an op over the old limit runs


def test_evaluation_between_steps_is_not_counted_in_the_training_peak(tmp_path):
    peaks = {}
    for evaluate in (False, True):
        # One evaluation batch far larger than a training step, after every step.
        kwargs = dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=256,
                      eval_dataset=Dataset(n=256)) if evaluate else {}
        trainer = tiny_trainer(tmp_path, max_steps=3, per_device_train_batch_size=4, **kwargs)
        callback = MemoryProfilerCallback.attach(trainer, memory_steps=2, warmup_steps=0)
        trainer.train()
        if evaluate:  # evaluation ran inside the memory window (after steps 1 and 2)
            assert sum("eval_loss" in row for row in trainer.state.log_history) >= 2
        peaks[evaluate] = callback.metrics()["tfmem/peak_allocated_bytes"]
    assert peaks[True] == peaks[False]
