"""`recipe.apply(trainer)`: the whole recipe takes effect in the Trainer's own machinery, or nothing changes."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from tfmem import Recipe, RecipeError
from tfmem.techniques.accumulation import ExactLoss

# Skip, rather than fail to collect, where `datasets` is missing (the GPU machines).
Dataset = pytest.importorskip("datasets", reason="the GPU machines may lack `datasets`").Dataset


def tiny_bert(cls=BertForSequenceClassification):
    torch.manual_seed(0)
    return cls(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=32))


def dataset(n=16, seq=8):
    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({
        "input_ids": torch.randint(1, 64, (n, seq), generator=g).tolist(),
        "attention_mask": [[1] * seq] * n,
        "labels": torch.randint(0, 2, (n,), generator=g).tolist(),
    })


def make_trainer(tmp_path, model=None, **overrides):
    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=8,
                  max_steps=2, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    kwargs.update(overrides)
    return Trainer(model=model or tiny_bert(), args=TrainingArguments(**kwargs), train_dataset=dataset())


def snapshot(trainer):
    return (trainer.args, trainer.accelerator, trainer.compute_loss_func, trainer._train_batch_size,
            [p.requires_grad for p in trainer.model.parameters()])


def test_apply_puts_every_technique_into_the_trainer(tmp_path):
    trainer = make_trainer(tmp_path)
    recipe = Recipe.from_dict({"name": "r", "gradient_accumulation_steps": 4, "mixed_precision": "bf16"})
    assert recipe.apply(trainer) is trainer
    assert trainer.args.per_device_train_batch_size == 2, "the user's batch (8) stays the effective batch"
    assert trainer.args.gradient_accumulation_steps == 4
    assert trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    assert isinstance(trainer.compute_loss_func, ExactLoss)
    assert trainer.get_train_dataloader().total_batch_size == 2


def test_bf16_recipe_really_runs_the_model_in_bf16(tmp_path):
    trainer = make_trainer(tmp_path)
    Recipe.load("bf16").apply(trainer)
    seen = []
    layer = trainer.model.bert.encoder.layer[0].intermediate.dense
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16}
    assert next(trainer.model.parameters()).dtype == torch.float32, "master weights stay fp32"


def test_contradicting_precision_is_an_error_and_nothing_changes(tmp_path):
    trainer = make_trainer(tmp_path, fp16=False, bf16=True)
    before = snapshot(trainer)
    with pytest.raises(RecipeError, match=r"`mixed_precision` is 'no' in the recipe but the TrainingArguments ask for 'bf16'"):
        Recipe.load("accumulate-4").apply(trainer)
    assert snapshot(trainer) == before


def test_every_contradiction_is_listed_at_once(tmp_path):
    trainer = make_trainer(tmp_path, per_device_train_batch_size=6, gradient_accumulation_steps=2,
                           bf16=True, activation_checkpointing=True)
    recipe = Recipe.from_dict({"name": "r", "gradient_accumulation_steps": 4, "mixed_precision": "no"})
    with pytest.raises(RecipeError) as info:
        recipe.apply(trainer)
    text = str(info.value)
    assert "3 problems" in text
    assert "leave `gradient_accumulation_steps=1`" in text
    assert "'bf16'" in text
    assert "`activation_checkpointing` (or its deprecated alias `gradient_checkpointing`) is True" in text


def test_batch_that_does_not_divide_is_an_error(tmp_path):
    trainer = make_trainer(tmp_path, per_device_train_batch_size=10)
    with pytest.raises(RecipeError, match=r"`per_device_train_batch_size` 10 does not divide by it; use .* \(for example 8 or 12\)"):
        Recipe.load("accumulate-4").apply(trainer)


def test_fp16_on_cpu_is_refused_before_training(tmp_path):
    trainer = make_trainer(tmp_path)
    before = snapshot(trainer)
    with pytest.raises(RecipeError, match=r"fp16 but training runs on the CPU.*bf16"):
        Recipe.load("fp16").apply(trainer)
    assert snapshot(trainer) == before
    assert trainer.state.global_step == 0


def test_existing_optimizer_is_an_error(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.create_optimizer()
    with pytest.raises(RecipeError, match="optimizer already exists"):
        Recipe.load("bf16").apply(trainer)


def test_applying_twice_is_an_error(tmp_path):
    trainer = make_trainer(tmp_path)
    Recipe.load("accumulate-4").apply(trainer)
    with pytest.raises(RecipeError, match="already applied"):
        Recipe.load("accumulate-4").apply(trainer)


def test_unknown_loss_under_accumulation_needs_a_compute_loss_func(tmp_path):
    trainer = make_trainer(tmp_path, model=tiny_bert(BertForQuestionAnswering))
    with pytest.raises(RecipeError, match=r"cannot normalise the loss of BertForQuestionAnswering.*compute_loss_func"):
        Recipe.load("accumulate-4").apply(trainer)
    trainer.compute_loss_func = lambda outputs, labels, num_items_in_batch=None: outputs.loss
    Recipe.load("accumulate-4").apply(trainer)  # the user's own loss is trusted


def test_label_smoothing_under_accumulation_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, label_smoothing_factor=0.1)
    with pytest.raises(RecipeError, match="label_smoothing_factor"):
        Recipe.load("accumulate-4").apply(trainer)


def test_checkpointing_in_both_is_agreement_and_tfmem_takes_it_over(tmp_path):
    trainer = make_trainer(tmp_path, activation_checkpointing=True)
    Recipe.load("checkpointing").apply(trainer)
    assert not trainer.args.activation_checkpointing, "transformers must not re-wrap the layers (frozen ones too)"
    trainer.train()


def test_training_arguments_route_before_the_trainer_exists(tmp_path):
    recipe = Recipe.load("low-memory")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=8)
    new = recipe.training_arguments(args)
    assert (new.per_device_train_batch_size, new.gradient_accumulation_steps, new.bf16) == (2, 4, True)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.bf16) == (8, 1, False)
    model = recipe.prepare_model(tiny_bert())
    assert isinstance(recipe.compute_loss_func(model), ExactLoss)
    with pytest.raises(RecipeError, match="already carry recipe 'low-memory'"):
        recipe.training_arguments(new)


def test_problems_from_arguments_device_and_model_come_in_one_error(tmp_path):
    trainer = make_trainer(tmp_path, per_device_train_batch_size=6)
    before = snapshot(trainer)
    recipe = Recipe.from_dict({"name": "r", "gradient_accumulation_steps": 4, "mixed_precision": "fp16",
                               "freeze": {"embeddings": True, "layers": 5}})
    with pytest.raises(RecipeError) as info:
        recipe.apply(trainer)
    text = str(info.value)
    assert "Recipe 'r' cannot be applied to this Trainer (3 problems)" in text
    assert "`per_device_train_batch_size` 6 does not divide" in text
    assert "fp16 but training runs on the CPU" in text
    assert "`freeze.layers` is 5 but" in text and "2 encoder layers" in text
    assert snapshot(trainer) == before, "nothing may change when the recipe does not apply"


def test_deprecated_checkpointing_alias_is_named_in_the_error(tmp_path):
    trainer = make_trainer(tmp_path, gradient_checkpointing=True)
    with pytest.raises(RecipeError, match=r"deprecated alias `gradient_checkpointing`\) is True"):
        Recipe.load("accumulate-4").apply(trainer)
