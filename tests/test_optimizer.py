"""`optimizer: adamw | adamw-8bit | adafactor`: the Trainer builds it from its own `optim`, an accelerate loop
from `recipe.create_optimizer`, and an optimizer that cannot run is refused before anything trains."""

from __future__ import annotations

import sys

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
from transformers.optimization import Adafactor

from tfmem import Recipe, RecipeError
from tfmem.techniques import optimizer as optimizer_module

Dataset = pytest.importorskip("datasets", reason="the GPU machines may lack `datasets`").Dataset


def needs_bitsandbytes():
    return pytest.importorskip("bitsandbytes", reason="adamw-8bit needs `pip install tfmem[8bit]`")


@pytest.fixture(autouse=True)
def _no_stale_bitsandbytes_overrides():
    """bitsandbytes keys its process-wide per-parameter overrides by id() and by (group, index); the
    Trainer registers every embedding there, and a later test's parameter 0 would silently go 32-bit."""
    yield
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is not None:
        manager = sys.modules["bitsandbytes"].optim.GlobalOptimManager.get_instance()
        manager.pid2config.clear()
        manager.index2config.clear()


def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=128,
                                                    max_position_embeddings=32))


def dataset(n=16, seq=8):
    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({
        "input_ids": torch.randint(1, 64, (n, seq), generator=g).tolist(),
        "attention_mask": [[1] * seq] * n,
        "labels": torch.randint(0, 2, (n,), generator=g).tolist(),
    })


def make_trainer(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=8,
                  max_steps=1, save_strategy="no", logging_strategy="no", disable_tqdm=True, learning_rate=1e-3)
    kwargs.update(overrides)
    return Trainer(model=tiny_bert(), args=TrainingArguments(**kwargs), train_dataset=dataset())


def recipe(name: str, **more) -> Recipe:
    return Recipe.from_dict({"name": f"opt-{name}", "optimizer": name, **more})


@pytest.mark.parametrize("typo, meant", [("adamw8bit", "adamw-8bit"), ("adamw_8bit", "adamw-8bit"),
                                          ("AdamW-8bit", "adamw-8bit"), ("adafacter", "adafactor")])
def test_a_misspelt_optimizer_gets_a_suggestion(typo, meant):
    with pytest.raises(RecipeError, match=rf"`optimizer` must be one of adamw, adamw-8bit, adafactor; got '{typo}'\. "
                                          rf"Did you mean `{meant}`\?"):
        Recipe.from_dict({"optimizer": typo})


def test_the_default_leaves_the_trainers_adamw(tmp_path):
    trainer = make_trainer(tmp_path)
    default_optim = trainer.args.optim
    Recipe.from_dict({"name": "plain"}).apply(trainer)
    assert trainer.args.optim == default_optim
    assert type(trainer.create_optimizer()) is torch.optim.AdamW


def test_adafactor_recipe_makes_the_trainer_build_adafactor_without_a_first_moment(tmp_path):
    trainer = make_trainer(tmp_path)
    recipe("adafactor").apply(trainer)
    assert trainer.args.optim == "adafactor"
    trainer.train()
    assert type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer) is Adafactor
    weight = trainer.model.bert.encoder.layer[0].intermediate.dense.weight  # 128 x 64
    state = trainer.optimizer.state[weight]
    assert set(state) >= {"exp_avg_sq_row", "exp_avg_sq_col"} and "exp_avg" not in state
    assert state["exp_avg_sq_row"].shape == (128,) and state["exp_avg_sq_col"].shape == (64,)


def test_adamw_8bit_recipe_makes_the_trainer_build_bitsandbytes_8bit_adamw(tmp_path):
    bnb = needs_bitsandbytes()
    trainer = make_trainer(tmp_path)
    recipe("adamw-8bit").apply(trainer)
    assert trainer.args.optim == "adamw_bnb_8bit"
    trainer.train()  # a real 8-bit step (bitsandbytes has CPU kernels from 0.45 on)
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(inner, bnb.optim.AdamW)
    big = trainer.model.bert.encoder.layer[0].intermediate.dense.weight  # 8192 elements: 8-bit state
    small = trainer.model.bert.encoder.layer[0].intermediate.dense.bias  # 128: kept in 32-bit
    assert trainer.optimizer.state[big]["state1"].dtype == torch.uint8
    assert trainer.optimizer.state[big]["state2"].dtype == torch.uint8
    assert trainer.optimizer.state[small]["state1"].dtype == torch.float32
    # 64 x 64 = 4096 elements would be 8-bit, but the Trainer keeps embeddings in 32-bit.
    embeddings = trainer.model.bert.embeddings.word_embeddings.weight
    assert trainer.optimizer.state[embeddings]["state1"].dtype == torch.float32


@pytest.mark.parametrize("user_optim, name", [("adafactor", "adamw-8bit"), ("sgd", "adafactor"), ("adamw_bnb_8bit", "adafactor")])
def test_an_optim_that_contradicts_the_recipe_is_an_error_and_nothing_changes(tmp_path, user_optim, name):
    trainer = make_trainer(tmp_path, optim=user_optim)
    args = trainer.args
    with pytest.raises(RecipeError, match=rf"`optimizer` is '{name}' in the recipe but the TrainingArguments ask for "
                                          rf"optim='{user_optim}'"):
        recipe(name).apply(trainer)
    assert trainer.args is args


def test_the_default_adamw_leaves_an_optim_the_user_chose(tmp_path):
    trainer = make_trainer(tmp_path, optim="sgd")
    Recipe.from_dict({"name": "plain", "gradient_accumulation_steps": 2}).apply(trainer)
    assert type(trainer.create_optimizer()) is torch.optim.SGD


def test_an_optim_that_agrees_with_the_recipe_is_accepted(tmp_path):
    trainer = make_trainer(tmp_path, optim="adafactor")
    recipe("adafactor").apply(trainer)
    assert type(trainer.create_optimizer()) is Adafactor


@pytest.fixture
def without_bitsandbytes(monkeypatch):
    # `import bitsandbytes` raises ImportError when its sys.modules entry is None: as on a machine without it.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)


def test_without_bitsandbytes_adamw_8bit_names_the_extra_before_anything_changes(tmp_path, without_bitsandbytes):
    trainer = make_trainer(tmp_path)
    args = trainer.args
    with pytest.raises(RecipeError, match=r"bitsandbytes is not installed; install the extra with `pip install tfmem\[8bit\]`"):
        recipe("adamw-8bit").apply(trainer)
    assert trainer.args is args
    with pytest.raises(RecipeError, match=r"pip install tfmem\[8bit\]"):
        recipe("adamw-8bit").accelerator_kwargs(device="cpu")
    with pytest.raises(RecipeError, match=r"pip install tfmem\[8bit\]"):
        recipe("adamw-8bit").create_optimizer(tiny_bert().parameters(), lr=1e-3)


def test_a_device_bitsandbytes_cannot_step_on_is_named(monkeypatch):
    needs_bitsandbytes()
    # The probe really runs: on this Linux machine an "mps" tensor cannot even be made, so the probe fails.
    optimizer_module._eight_bit_error.cache_clear()
    problems = optimizer_module.optimizer_problems(optimizer_module.OptimizerConfig("adamw-8bit"), "mps")
    assert len(problems) == 1
    assert "cannot run its 8-bit AdamW on the mps device" in problems[0]
    assert "train on a CUDA GPU, or use `optimizer: adafactor`" in problems[0]


def accelerate_loop(name: str, steps: int = 8, freeze_embeddings: bool = True, pass_model: bool = False):
    """A real accelerate loop with the recipe's optimizer; the losses it saw."""
    r = recipe(name, **{"freeze": {"embeddings": freeze_embeddings, "layers": 0}})
    accelerator = Accelerator(**r.accelerator_kwargs(device="cpu"))
    model = r.prepare_model(tiny_bert())
    optimizer = r.create_optimizer(model if pass_model else model.parameters(), lr=1e-3)
    data = dataset(n=8).with_format("torch")
    loader = DataLoader(data, batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    batch = next(iter(loader))
    for _ in range(steps):  # fit one batch: the loss must fall with any working optimizer
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, optimizer, losses


@pytest.mark.parametrize("name", ["adamw", "adafactor", "adamw-8bit"])
def test_create_optimizer_trains_in_an_accelerate_loop_and_skips_frozen_parameters(name):
    if name == "adamw-8bit":
        needs_bitsandbytes()
    model, optimizer, losses = accelerate_loop(name)
    assert losses[-1] < losses[0] * 0.9, losses
    expected = {"adamw": "AdamW", "adafactor": "Adafactor", "adamw-8bit": "AdamW"}[name]
    assert type(optimizer.optimizer).__name__ == expected
    embeddings = model.bert.embeddings.word_embeddings.weight
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(embeddings) not in held, "frozen parameters must not be in the optimizer (no state for them)"
    if name == "adamw-8bit":
        weight = model.bert.encoder.layer[0].intermediate.dense.weight
        assert optimizer.state[weight]["state1"].dtype == torch.uint8


def test_create_optimizer_given_the_model_keeps_embeddings_in_32_bit_as_the_trainer_does():
    needs_bitsandbytes()
    model, optimizer, _ = accelerate_loop("adamw-8bit", steps=1, freeze_embeddings=False, pass_model=True)
    embeddings = model.bert.embeddings.word_embeddings.weight  # 4096 elements
    assert optimizer.state[embeddings]["state1"].dtype == torch.float32
    assert optimizer.state[model.bert.encoder.layer[0].intermediate.dense.weight]["state1"].dtype == torch.uint8


def test_create_optimizer_leaves_the_overrides_another_optimizer_registered_alone():
    """A Trainer registers its embeddings with bitsandbytes' process-wide manager when it builds the
    optimizer, and they take effect at its first step: building a second 8-bit optimizer in between must
    not wipe them (the first model's embeddings would silently get 8-bit state)."""
    bnb = needs_bitsandbytes()
    first = tiny_bert()
    first_opt = bnb.optim.AdamW(first.parameters(), lr=1e-3, optim_bits=8, is_paged=False)
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.register_module_override(first.bert.embeddings.word_embeddings, "weight", {"optim_bits": 32})
    try:
        recipe("adamw-8bit").create_optimizer(tiny_bert(), lr=1e-3)  # a second model, in between
        for p in first.parameters():
            p.grad = torch.zeros_like(p)
        first_opt.step()
        assert first_opt.state[first.bert.embeddings.word_embeddings.weight]["state1"].dtype == torch.float32
    finally:
        manager.module_weight_config_triple.clear()


def test_the_8bit_probe_is_not_fooled_by_overrides_a_trainer_left_behind(tmp_path):
    needs_bitsandbytes()
    trainer = make_trainer(tmp_path)
    recipe("adamw-8bit").apply(trainer)
    trainer.train()  # registers the embeddings as 32-bit at (group 0, index 0), process-wide
    optimizer_module._eight_bit_error.cache_clear()
    assert optimizer_module.optimizer_problems(optimizer_module.OptimizerConfig("adamw-8bit"), "cpu") == []


@pytest.mark.cuda
def test_adamw_8bit_runs_on_the_gpu_with_8bit_state():
    needs_bitsandbytes()
    r = recipe("adamw-8bit")
    assert r.accelerator_kwargs(device="cuda")["mixed_precision"] == "no"  # accepted on this device
    model = tiny_bert().cuda()
    optimizer = r.create_optimizer(model, lr=1e-3)
    batch = {k: torch.tensor(v).cuda() for k, v in dataset(n=8)[:8].items()}
    model(**batch).loss.backward()
    optimizer.step()
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    assert optimizer.state[weight]["state1"].dtype == torch.uint8


def test_checking_adamw_8bit_does_not_print_bitsandbytes_4bit_kernel_warning():
    """bitsandbytes' CPU backend logs a warning about a 4-bit kernel on import; tfmem never uses it."""
    pytest.importorskip("bitsandbytes")
    import subprocess

    code = ("import logging; logging.basicConfig(level=logging.WARNING)\n"
            "from tfmem.techniques.optimizer import OptimizerConfig, optimizer_problems\n"
            "print(optimizer_problems(OptimizerConfig('adamw-8bit'), 'cpu'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert "gemm_4bit_forward" not in done.stderr
