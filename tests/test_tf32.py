"""`tf32: true`: refused where there are no TF32 tensor cores (before anything trains), set through the
Trainer's own argument, and set-then-restored around an accelerate loop."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from tfmem import Recipe, RecipeError
from tfmem.techniques.tf32 import tf32_matmul, tf32_problems

TF32 = {"name": "fast-fp32", "tf32": True}


def test_tf32_on_cpu_is_refused_naming_the_key():
    with pytest.raises(RecipeError, match=r"`tf32` is true but training runs on the CPU.*set `tf32: false`"):
        Recipe.from_dict(TF32).accelerator_kwargs(device="cpu")


def test_tf32_is_refused_below_compute_capability_8(fake_gpu):
    fake_gpu((7, 5), "Tesla T4")
    problems = tf32_problems(True, "cuda:0")
    assert len(problems) == 1
    assert problems[0].startswith("`tf32` is true but Tesla T4 has compute capability 7.5; TF32 needs 8.0")


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_tf32_is_accepted_from_ampere_on(fake_gpu, capability):
    fake_gpu(capability, "Some GPU")
    assert tf32_problems(True, "cuda:0") == []
    assert tf32_problems(False, "cpu") == []


def test_a_trainer_on_cpu_refuses_tf32_before_anything_changes(tmp_path):
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], tf32=False)
    trainer = Trainer(model=model, args=args)
    with pytest.raises(RecipeError) as error:
        Recipe.from_dict(TF32).apply(trainer)
    message = str(error.value)
    assert "`tf32` is true in the recipe but False in the TrainingArguments" in message
    assert "`tf32` is true but training runs on the CPU" in message
    assert trainer.args is args


def test_tf32_matmul_sets_and_restores_also_on_an_error():
    before = torch.backends.cuda.matmul.fp32_precision
    with tf32_matmul():
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == before
    with pytest.raises(ZeroDivisionError):
        with Recipe.from_dict(TF32).tf32_matmul():
            1 / 0
    assert torch.backends.cuda.matmul.fp32_precision == before
    with Recipe.from_dict({"name": "plain"}).tf32_matmul():
        assert torch.backends.cuda.matmul.fp32_precision == before, "tf32: false changes nothing"


@pytest.mark.cuda
def test_tf32_really_changes_fp32_matmuls_on_an_ampere_gpu():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("TF32 needs compute capability 8.0+")
    recipe = Recipe.from_dict(TF32)
    recipe.accelerator_kwargs(device="cuda")  # accepted
    a, b = torch.randn(1024, 1024, device="cuda"), torch.randn(1024, 1024, device="cuda")
    exact = (a.double() @ b.double()).float()
    ieee = (a @ b - exact).abs().max().item()
    with recipe.tf32_matmul():
        tf32 = (a @ b - exact).abs().max().item()
    after = (a @ b - exact).abs().max().item()
    assert tf32 > 10 * ieee, "TF32 keeps 10 mantissa bits: its products are visibly less exact"
    assert after == ieee, "the setting is restored"


@pytest.mark.cuda
def test_a_trainer_with_tf32_turns_it_on(tmp_path):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("TF32 needs compute capability 8.0+")
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    Recipe.from_dict(TF32).apply(trainer)
    assert trainer.args.tf32 is True
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" or torch.backends.fp32_precision == "tf32"


@pytest.mark.parametrize("key, value, expected", [("tf32", "yes", r"`tf32` must be bool, got 'yes'"),
                                                   ("group_by_length", 1, r"`group_by_length` must be bool, got 1"),
                                                   ("optimizer", 8, r"`optimizer` must be str, got 8")])
def test_the_new_keys_are_type_checked_with_the_others(key, value, expected):
    with pytest.raises(RecipeError, match=expected) as error:
        Recipe.from_dict({"name": "bad", key: value, "gradient_accumulation_steps": 0})
    assert len(error.value.problems) == 2, "reported together with the other problems"
