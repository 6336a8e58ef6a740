"""Mixed precision: a capability check before training, and fp16's skipped steps keep the LR schedule."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler

from tfmem import Recipe, RecipeError
from tfmem.techniques import precision
from tfmem.techniques.precision import precision_problems


def test_fp16_on_cpu_is_refused_with_a_suggestion():
    with pytest.raises(RecipeError, match=r"fp16 but training runs on the CPU.*30x slower.*use `mixed_precision: bf16`"):
        Recipe.load("fp16").accelerator_kwargs(device="cpu")


def test_bf16_on_cpu_is_accepted():
    assert Recipe.load("bf16").accelerator_kwargs(device="cpu") == {"gradient_accumulation_steps": 1, "mixed_precision": "bf16"}


@pytest.fixture
def fake_gpu(monkeypatch):
    """Stand in a GPU of a given compute capability: what cannot exist here is the GPU, not the check."""

    def install(capability, name):
        monkeypatch.setattr(precision, "cuda_capability", lambda device: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return install


def test_bf16_is_refused_below_compute_capability_8_even_though_torch_says_supported(fake_gpu, monkeypatch):
    fake_gpu((7, 5), "Tesla T4")
    # What torch answers on a T4 (emulated bf16): the check must not trust it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    problems = precision_problems("bf16", "cuda:0")
    assert len(problems) == 1
    assert "Tesla T4 has compute capability 7.5" in problems[0]
    assert "Use `mixed_precision: fp16`" in problems[0]


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0)])
def test_bf16_is_accepted_from_ampere_on(fake_gpu, capability):
    fake_gpu(capability, "Some GPU")
    assert precision_problems("bf16", "cuda:0") == []


def test_fp16_is_accepted_on_any_gpu(fake_gpu):
    fake_gpu((7, 0), "Tesla V100")
    assert precision_problems("fp16", "cuda") == []


def test_skipped_fp16_step_does_not_advance_the_lr_schedule():
    """The mechanism both adapters use: a GradScaler step with inf gradients is skipped, and the
    scheduler wrapped by accelerate waits for it (no learning-rate step is lost or taken early).
    Runs on the CPU with torch's CPU GradScaler; the CUDA variant below runs the real Trainer."""
    Accelerator(cpu=True)  # accelerate's wrappers read its process state
    layer = torch.nn.Linear(2, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optimizer = AcceleratedOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), device_placement=False, scaler=scaler)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda step: 1.0 / (step + 1))
    scheduler = AcceleratedScheduler(schedule, optimizer, step_with_optimizer=True, split_batches=True)

    def step(poison):
        scaler.scale(layer(torch.ones(1, 2)).sum()).backward()
        if poison:  # an fp16 overflow, as it reaches the optimizer
            next(layer.parameters()).grad.fill_(float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    before = [p.detach().clone() for p in layer.parameters()]
    step(poison=True)
    assert optimizer.step_was_skipped
    assert schedule.last_epoch == 0 and optimizer.param_groups[0]["lr"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert scaler.get_scale() < 2.0**8, "the loss scale must back off after an overflow"
    step(poison=False)
    assert not optimizer.step_was_skipped
    assert schedule.last_epoch == 1 and optimizer.param_groups[0]["lr"] == 0.5


@pytest.mark.cuda
def test_real_gpu_precision_check_matches_its_capability():
    capability = torch.cuda.get_device_capability(0)
    problems = precision_problems("bf16", "cuda:0")
    assert (problems == []) == (capability >= (8, 0))
    assert precision_problems("fp16", "cuda:0") == []


@pytest.mark.cuda
def test_real_trainer_fp16_skipped_step_keeps_the_schedule(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    poisoned = {"done": False}

    class PoisonFirstStep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not poisoned["done"]:
                next(model.parameters()).grad.fill_(float("inf"))
                poisoned["done"] = True

    # A plain list: the GPU machines may lack `datasets`.
    data = [{"input_ids": torch.tensor([1, 2, 3, 4]), "attention_mask": torch.ones(4, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, report_to=[],
                             learning_rate=1e-3, lr_scheduler_type="linear", max_grad_norm=0.0, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[PoisonFirstStep()])
    Recipe.load("fp16").apply(trainer)
    trainer.train()
    assert trainer.lr_scheduler.last_epoch == 2, "3 optimizer steps, the first skipped: the schedule advanced twice"


@pytest.mark.parametrize("word", ["no", "off", "false", "OFF"])
def test_yaml_false_precision_says_yaml_read_a_boolean_and_how_to_quote(word, tmp_path):
    # PyYAML (YAML 1.1) reads a bare no, off and false as False: the message must not claim the user wrote `no`.
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\nmixed_precision: {word}\n")
    with pytest.raises(RecipeError, match=r'is False \(YAML reads a bare `off` or `false`, and a bare `no` as a boolean\); '
                                          r'write `mixed_precision: "no"` \(quoted\)'):
        Recipe.from_yaml(path)


@pytest.mark.parametrize("word", ["yes", "on", "true"])
def test_yaml_true_precision_says_yaml_read_a_boolean(word, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\nmixed_precision: {word}\n")
    with pytest.raises(RecipeError, match=r"is True \(YAML reads a bare `yes`, `on` or `true` as a boolean\); "
                                          r"write `mixed_precision: bf16` or `fp16`"):
        Recipe.from_yaml(path)
