"""`group_by_length: true`: every sample once per epoch, the effective batch kept, padding at least halved
on skewed lengths; the Trainer's own sampler, and tfmem's in a real accelerate loop."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

import tfmem
from tfmem import Recipe, RecipeError
from tfmem.techniques.grouping import LengthGroupedBatchSampler, group_batches

Dataset = pytest.importorskip("datasets", reason="the GPU machines may lack `datasets`").Dataset


def skewed_lengths(n=1000, seed=0):
    """Mostly short sentences and a tail of long ones, as real review data."""
    rng = random.Random(seed)
    return [rng.randint(100, 128) if rng.random() < 0.1 else rng.randint(5, 20) for _ in range(n)]


def padding_fraction(batches, lengths):
    """Padded positions / all positions when each batch is padded to its longest sample."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def ungrouped(n, batch_size, seed=0):
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[k:k + batch_size] for k in range(0, n, batch_size)]


@pytest.mark.parametrize("n, batch_size, steps", [(1000, 16, 1), (1000, 8, 4), (103, 8, 3), (5, 8, 2), (64, 4, 4)])
def test_every_sample_once_per_epoch_and_the_batch_sizes_of_an_ungrouped_loader(n, batch_size, steps):
    lengths = skewed_lengths(n)
    for seed in (0, 1):
        batches = group_batches(lengths, batch_size, steps, seed=seed)
        assert Counter(i for b in batches for i in b) == Counter(range(n)), "each sample exactly once"
        assert [len(b) for b in batches] == [len(b) for b in ungrouped(n, batch_size)], "the effective batch is kept"


def test_grouping_cuts_the_padding_at_least_in_half_on_skewed_lengths():
    lengths = skewed_lengths()
    random_fraction = padding_fraction(ungrouped(len(lengths), 16), lengths)
    grouped_fraction = padding_fraction(group_batches(lengths, 16), lengths)
    assert random_fraction > 0.5, "the dataset must be skewed for this test to mean anything"
    assert grouped_fraction <= random_fraction / 2, (random_fraction, grouped_fraction)


def test_the_micro_batches_of_one_accumulation_window_are_of_similar_length():
    lengths, batch_size, steps = skewed_lengths(), 8, 4
    batches = group_batches(lengths, batch_size, steps)
    windows = [sum(batches[k:k + steps], []) for k in range(0, len(batches), steps)]
    # Padding each whole window to its longest sample: low only if its micro-batches are alike.
    assert padding_fraction(windows, lengths) <= padding_fraction(ungrouped(len(lengths), batch_size * steps), lengths) / 2


def test_each_epoch_has_a_new_order_and_the_longest_sample_comes_first():
    lengths = skewed_lengths(200)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8)
    first, second = list(sampler), list(sampler)
    assert first != second
    sampler.set_epoch(0)
    assert list(sampler) == first, "an epoch's order is reproducible"
    assert max(lengths) in [lengths[i] for i in first[0]], "an out-of-memory shows on the first step"


def test_bad_sizes_are_refused_at_construction():
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        LengthGroupedBatchSampler([1, 2], batch_size=0)


def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=64))


def variable_dataset(n=37):
    lengths = skewed_lengths(n, seed=1)
    lengths = [min(x, 60) for x in lengths]
    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({
        "input_ids": [torch.randint(1, 64, (n_tokens,), generator=g).tolist() for n_tokens in lengths],
        "labels": torch.randint(0, 2, (n,), generator=g).tolist(),
        "idx": list(range(n)),
    }), lengths


def collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[k, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["labels"] for r in rows]),
            "idx": torch.tensor([r["idx"] for r in rows])}


def test_a_real_accelerate_loop_sees_every_sample_once_with_one_step_per_window():
    data, lengths = variable_dataset()
    recipe = Recipe.from_dict({"name": "grouped", "gradient_accumulation_steps": 2, "group_by_length": True})
    accelerator = Accelerator(**recipe.accelerator_kwargs(device="cpu"))
    model = recipe.prepare_model(tiny_bert())
    optimizer = recipe.create_optimizer(model, lr=1e-3)
    sampler = recipe.batch_sampler(data, batch_size=4)
    assert isinstance(sampler, LengthGroupedBatchSampler) and sampler.accumulation_steps == 2
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    seen, optimizer_steps, widths = [], 0, []
    for window in tfmem.accumulation_windows(loader, accelerator, model):
        batch = dict(window.batch)
        seen += batch.pop("idx").tolist()
        widths.append(batch["input_ids"].shape[1])
        with accelerator.accumulate(model):
            accelerator.backward(tfmem.exact_loss(model, model(**batch), window, accelerator))
            optimizer_steps += accelerator.sync_gradients
            optimizer.step()
            optimizer.zero_grad()
    assert sorted(seen) == list(range(len(data)))
    assert optimizer_steps == -(-len(data) // 8), "one optimizer step per window of 2 x 4 samples"
    assert widths[0] == max(lengths), "the longest batch first"


def test_no_grouping_no_sampler():
    assert Recipe.from_dict({"name": "plain"}).batch_sampler([1, 2, 3], batch_size=2) is None


def make_trainer(tmp_path, data, **overrides):
    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                  max_steps=1, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    kwargs.update(overrides)
    return Trainer(model=tiny_bert(), args=TrainingArguments(**kwargs), train_dataset=data)


def test_the_trainer_groups_with_its_own_sampler(tmp_path):
    data, _ = variable_dataset()
    trainer = make_trainer(tmp_path, data.remove_columns("idx"))
    Recipe.from_dict({"name": "grouped", "group_by_length": True}).apply(trainer)
    assert trainer.args.train_sampling_strategy == "group_by_length"
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)


def test_a_trainer_sampling_strategy_that_contradicts_the_recipe_is_an_error(tmp_path):
    data, _ = variable_dataset()
    trainer = make_trainer(tmp_path, data, train_sampling_strategy="sequential")
    args = trainer.args
    with pytest.raises(RecipeError, match=r"`group_by_length` is true in the recipe but the TrainingArguments ask for "
                                          r"train_sampling_strategy='sequential'"):
        Recipe.from_dict({"name": "grouped", "group_by_length": True}).apply(trainer)
    assert trainer.args is args


def test_without_group_by_length_the_users_sampling_strategy_stays(tmp_path):
    data, _ = variable_dataset()
    trainer = make_trainer(tmp_path, data, train_sampling_strategy="sequential")
    Recipe.from_dict({"name": "plain"}).apply(trainer)
    assert trainer.args.train_sampling_strategy == "sequential"
