"""Mixed precision: a capability check before training, and fp16's skipped steps keep the LR schedule."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler

from tfmem import Recipe, RecipeError
from tfmem.techniques.precision import precision_problems


def test_fp16_on_cpu_is_refused_with_a_suggestion():
    with pytest.raises(RecipeError, match=r"fp16 but training runs on the CPU.*30x slower.*use `mixed_precision: bf16`"):
        Recipe.load("fp16").accelerator_kwargs(device="cpu")


def test_bf16_on_cpu_is_accepted():
    assert Recipe.load("bf16").accelerator_kwargs(device="cpu") == {"gradient_accumulation_steps": 1, "mixed_precision": "bf16"}


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
    """The mechanism both adapters use, in the order transformers 5 runs it: backward of the scaled loss,
    then the gradients unscaled (`accelerator.clip_grad_norm_`, which the Trainer calls even with
    `max_grad_norm=0`), then the optimizer step and the scheduler. The overflow comes from the forward
    pass, before anything is unscaled, as a real fp16 overflow does: the GradScaler must skip that step,
    leave the weights alone, and the scheduler wrapped by accelerate must wait for it.
    Runs on the CPU with torch's CPU GradScaler (accelerate gives a CPU fp16 run no scaler at all, so a
    Trainer cannot show it here); the CUDA test below runs the real Trainer, plain and with the recipe."""
    Accelerator(cpu=True)  # accelerate's wrappers read its process state
    layer = torch.nn.Linear(2, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optimizer = AcceleratedOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), device_placement=False, scaler=scaler)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda step: 1.0 / (step + 1))
    scheduler = AcceleratedScheduler(schedule, optimizer, step_with_optimizer=True, split_batches=True)

    def step(overflow):
        output = layer(torch.ones(1, 2))
        if overflow:  # what an fp16 activation past 65504 gives: inf in the forward pass
            output = output * float("inf")
        scaler.scale(output.sum()).backward()
        scaler.unscale_(optimizer.optimizer)  # as accelerator.clip_grad_norm_ does, before the step
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    step(overflow=False)
    assert not optimizer.step_was_skipped and schedule.last_epoch == 1
    before = [p.detach().clone() for p in layer.parameters()]
    scale = scaler.get_scale()
    step(overflow=True)
    assert optimizer.step_was_skipped
    assert schedule.last_epoch == 1 and optimizer.param_groups[0]["lr"] == 0.5
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters())), "a skipped step changed the weights"
    assert scaler.get_scale() < scale, "the loss scale must back off after an overflow"
    step(overflow=False)
    assert not optimizer.step_was_skipped
    assert schedule.last_epoch == 2 and optimizer.param_groups[0]["lr"] == pytest.approx(1 / 3)
    assert not all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


@pytest.mark.cuda
def test_real_gpu_precision_check_matches_its_capability():
    capability = torch.cuda.get_device_capability(0)
    problems = precision_problems("bf16", "cuda:0")
    assert (problems == []) == (capability >= (8, 0))
    assert precision_problems("fp16", "cuda:0") == []


def _fp16_run_with_an_overflow(tmp_path, with_recipe: bool, overflow_step: int = 2, steps: int = 4) -> dict:
    """A real Trainer fp16 run whose `overflow_step`-th forward pass makes the logits inf (before any
    unscaling, as a real overflow); what each optimizer step did, and the schedule."""
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    forwards = {"n": 0}

    def overflow(module, inputs, output):
        if module.training:
            forwards["n"] += 1
            if forwards["n"] == overflow_step:
                return output * float("inf")
        return output

    model.classifier.register_forward_hook(overflow)
    # A plain list: the GPU machines may lack `datasets`.
    data = [{"input_ids": torch.tensor([1, 2, 3, 4]), "attention_mask": torch.ones(4, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(4 * steps)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, report_to=[],
                             learning_rate=1e-3, lr_scheduler_type="linear", save_strategy="no", fp16=not with_recipe,
                             disable_tqdm=True)
    record = {"skipped": [], "changed": [], "scales": []}

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            record["before"] = [p.detach().clone() for p in model.parameters()]

        def on_step_end(self, args, state, control, model=None, **kwargs):
            record["skipped"].append(trainer.accelerator.optimizer_step_was_skipped)
            record["changed"].append(any(not torch.equal(a, b) for a, b in zip(record["before"], model.parameters())))
            record["scales"].append(trainer.accelerator.scaler.get_scale())

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Watch()])
    if with_recipe:
        Recipe.load("fp16").apply(trainer)
    trainer.train()
    record["schedule_steps"] = trainer.lr_scheduler.last_epoch
    record["mixed_precision"] = trainer.accelerator.mixed_precision
    return record


@pytest.mark.cuda
def test_real_trainer_fp16_skipped_step_keeps_the_schedule_with_and_without_the_recipe(tmp_path):
    plain = _fp16_run_with_an_overflow(tmp_path / "plain", with_recipe=False)
    recipe = _fp16_run_with_an_overflow(tmp_path / "recipe", with_recipe=True)
    for run in (plain, recipe):
        assert run["mixed_precision"] == "fp16"
        assert run["skipped"] == [False, True, False, False], "the overflowing step (the 2nd) is the one skipped"
        assert run["changed"] == [True, False, True, True], "the skipped step left every weight as it was"
        assert run["scales"][1] == run["scales"][0] / 2, "the loss scale backed off after the overflow"
        assert run["schedule_steps"] == 3, "4 optimizer steps, one skipped: the schedule advanced 3 times"
    assert plain["skipped"] == recipe["skipped"] and plain["schedule_steps"] == recipe["schedule_steps"]


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
