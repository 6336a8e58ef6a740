"""What a recipe becomes in accelerate's FSDP plugin and the Trainer's FSDP arguments (no launch needed)."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from transformers import TrainingArguments

from tfmem import Recipe
from tfmem.adapters import fsdp
from tfmem.errors import RecipeError

CHECKPOINTED = Recipe.from_dict({"name": "ckpt", "gradient_checkpointing": True, "gradient_accumulation_steps": 2})


def test_the_recipe_checkpoints_and_fsdp_checkpointing_is_turned_off_in_a_copy():
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, activation_checkpointing=True)
    kwargs = CHECKPOINTED.accelerator_kwargs(device="cpu", fsdp_plugin=plugin)
    assert kwargs["fsdp_plugin"].activation_checkpointing is False
    assert plugin.activation_checkpointing is True  # the user's plugin is not changed
    assert kwargs["gradient_accumulation_steps"] == 2


def test_fsdp_checkpointing_stays_when_the_recipe_does_not_checkpoint():
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, activation_checkpointing=True)
    kwargs = Recipe.from_dict({"name": "plain"}).accelerator_kwargs(device="cpu", fsdp_plugin=plugin)
    assert kwargs["fsdp_plugin"].activation_checkpointing is True


def test_bf16_goes_through_the_sharding_policy_not_autocast():
    recipe = Recipe.from_dict({"name": "b", "mixed_precision": "bf16"})
    kwargs = recipe.accelerator_kwargs(device="cpu", fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    policy = kwargs["fsdp_plugin"].mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert kwargs["mixed_precision"] == "no"  # accelerate would autocast on top otherwise


@pytest.mark.parametrize(
    ("recipe", "plugin_kwargs", "field"),
    [
        ({"auto_micro_batch": True}, {"fsdp_version": 2}, "`auto_micro_batch`"),
        ({}, {"fsdp_version": 1}, "`fsdp_version` is 1"),
    ],
)
def test_a_recipe_that_cannot_apply_under_the_plugin_says_why(recipe, plugin_kwargs, field):
    plugin = FullyShardedDataParallelPlugin(**plugin_kwargs)
    with pytest.raises(RecipeError, match=field):
        Recipe.from_dict({"name": "r", **recipe}).accelerator_kwargs(device="cpu", fsdp_plugin=plugin)


def test_fp16_is_refused_under_fsdp():
    assert any("`mixed_precision` is 'fp16'" in p for p in fsdp.recipe_problems(Recipe.from_dict({"mixed_precision": "fp16"})))


def test_strategies_set_resharding():
    assert fsdp.recipe_fsdp_plugin(CHECKPOINTED, "fsdp").reshard_after_forward is True
    assert fsdp.recipe_fsdp_plugin(CHECKPOINTED, "fsdp-grad-op").reshard_after_forward is False
    with pytest.raises(RecipeError, match="`strategy` is 'zero3'"):
        fsdp.recipe_fsdp_plugin(CHECKPOINTED, "zero3")


def _fsdp_args(tmp_path, **config):
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                             fsdp=True, fsdp_config={"version": 2, **config})


def test_trainer_arguments_carry_one_checkpoint_and_the_bf16_policy(tmp_path):
    recipe = CHECKPOINTED.replace(mixed_precision="bf16")
    new = recipe.training_arguments(_fsdp_args(tmp_path, activation_checkpointing=True))
    assert new.fsdp_plugin_args["activation_checkpointing"] is False
    assert new.fsdp_plugin_args["mixed_precision_policy"].param_dtype == torch.bfloat16
    assert new.bf16 is False and new.per_device_train_batch_size == 2


def test_trainer_fsdp1_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"`fsdp_config\['version'\]` is 1"):
        CHECKPOINTED.training_arguments(_fsdp_args(tmp_path, version=1))


def test_trainer_layers_named_for_wrapping(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    args = CHECKPOINTED.training_arguments(_fsdp_args(tmp_path))
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100))
    fsdp.wrap_layers(args, model)
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "BertLayer"


def test_accelerate_launch_use_fsdp_is_picked_up(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    kwargs = CHECKPOINTED.accelerator_kwargs(device="cpu")
    assert kwargs["fsdp_plugin"].fsdp_version == 2
    assert kwargs["fsdp_plugin"].activation_checkpointing is False


def test_a_layer_checkpointed_by_both_is_refused_before_the_first_step():
    from accelerate import Accelerator
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from transformers import BertConfig, BertForSequenceClassification

    import tfmem

    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100))
    CHECKPOINTED.prepare_model(model)
    assert fsdp.checkpointing_problems(model) == []
    # What accelerate's `fsdp2_apply_ac` does when the plugin keeps `activation_checkpointing=True`.
    model.bert.encoder.layer[1] = checkpoint_wrapper(model.bert.encoder.layer[1])
    assert fsdp.double_checkpointed_layers(model) == ["bert.encoder.layer.1"]
    loader = [{"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)}]
    with pytest.raises(RecipeError, match="checkpointed twice: `activation_checkpointing` is on"):
        next(tfmem.accumulation_windows(loader, Accelerator(cpu=True), model))
