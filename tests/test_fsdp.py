"""Recipes under FSDP2 in a real two-process launch (gloo on the CPU), through accelerate and the Trainer.

Each run checks the weight step against a single-process full-batch SGD step in float64, with
accumulation, checkpointing and freezing on together; that frozen parameters come out bit-identical
(and got no gradient and no optimizer state); and that every rank's peak is logged.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from accelerate.launchers import debug_launcher

LR = 0.5
RECIPE = {"name": "fsdp-test", "gradient_accumulation_steps": 2, "gradient_checkpointing": True,
          "freeze": {"embeddings": True, "layers": 1}}


def _accelerate_worker(out_path: str, strategy: str) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from _fsdp import force_fsdp, full_parameters, sgd_reference_step
    from _grad_check import N_SAMPLES, collate, make_model, make_samples, reference_gradient, relative_error
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    import tfmem
    from tfmem import Recipe
    from tfmem.adapters.fsdp import STRATEGIES, double_checkpointed_layers
    from tfmem.profiler.session import Profiler

    torch.set_num_threads(1)
    task = "classification"
    model, samples = make_model(task), make_samples(task)
    recipe = Recipe.from_dict(RECIPE)
    # The user asks FSDP for activation checkpointing too: tfmem must keep one checkpoint per layer.
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=STRATEGIES[strategy],
                                            activation_checkpointing=True, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["BertLayer"])
    kwargs = recipe.accelerator_kwargs(device="cpu", fsdp_plugin=plugin)
    accelerator = Accelerator(**kwargs)
    force_fsdp(accelerator, kwargs["fsdp_plugin"])
    recipe.prepare_model(model)
    reference = make_model(task)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    rows = [{k: samples[k][i] for k in samples} for i in range(N_SAMPLES)]
    loader = torch.utils.data.DataLoader(rows, batch_size=3, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    profiler = Profiler(model, optimizer, memory_steps=1, warmup_steps=0)
    errors, seen, grads_seen, early_sync = [], [], set(), []
    windows = iter(tfmem.accumulation_windows(loader, accelerator, model))
    done = False
    while not done:
        with profiler.step():
            for window in windows:
                seen.append(window.batch.pop("idx"))
                with accelerator.accumulate(model):
                    outputs = model(**window.batch)
                    accelerator.backward(tfmem.exact_loss(model, outputs, window, accelerator))
                    if not accelerator.sync_gradients:  # no reduce-scatter yet: sharded grads still unset
                        early_sync.append(any(p.grad is not None for p in model.parameters()))
                    if accelerator.sync_gradients:
                        before = full_parameters(model)
                        grads_seen |= {n for n, p in model.named_parameters() if p.grad is not None}
                        optimizer.step()
                        optimizer.zero_grad()
                        after = full_parameters(model)
                        everyone = accelerator.gather(torch.cat(seen)).tolist()
                        want = reference_gradient(reference, samples, everyone)
                        want = {n: g for n, g in want.items() if n in trainable}
                        reference = sgd_reference_step(reference, want, LR)
                        errors.append(relative_error({n: after[n] - before[n] for n in trainable},
                                                     {n: -LR * g for n, g in want.items()}))
                        seen = []
                        break
            else:
                done = True
    profiler.close()
    metrics = profiler.metrics()
    after = full_parameters(model)
    state_params = {id(p) for p in optimizer.optimizer.state} if hasattr(optimizer, "optimizer") else set()
    result = {
        "errors": errors,
        "processes": accelerator.num_processes,
        "sharded": type(model).__name__.startswith("FSDP"),
        "frozen_identical": all(torch.equal(after[n], t) for n, t in frozen_before.items()),
        "n_frozen": len(frozen_before),
        "grads_only_trainable": grads_seen == trainable,
        "early_sync": early_sync,
        "double_checkpointed": double_checkpointed_layers(model),
        "optimizer_params": sum(len(g["params"]) for g in optimizer.param_groups),
        "n_trainable": len(trainable),
        "state_params": len(state_params),
        "metrics": {k: v for k, v in metrics.items() if "peak" in k},
    }
    result["bf16"] = _bf16_step(recipe)
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(result, f)


def _bf16_step(recipe) -> dict:
    """One step under the recipe's bf16 policy (fully_shard directly: accelerate allows one FSDP2 model)."""
    from _grad_check import collate, make_model, make_samples
    from torch.distributed.fsdp import fully_shard

    from tfmem.adapters.fsdp import mixed_precision_policy

    recipe = recipe.replace(mixed_precision="bf16")
    model = make_model("classification").float()
    recipe.prepare_model(model)
    policy = mixed_precision_policy(recipe)
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    samples = make_samples("classification")
    batch = collate([{k: samples[k][i] for k in ("input_ids", "attention_mask", "labels")} for i in range(4)])
    out = model(**batch)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return {
        "logits_dtype": str(out.logits.dtype),
        "shard_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "grad_dtypes": sorted({str(g.dtype) for g in grads}),
        "finite": bool(all(torch.isfinite(g.to_local()).all() for g in grads)),
    }


def _check(result: dict) -> None:
    assert result["processes"] == 2 and result["sharded"], result
    assert len(result["errors"]) >= 2
    assert max(result["errors"]) <= 1e-9, result["errors"]
    assert result["n_frozen"] > 0 and result["frozen_identical"], result
    assert result["grads_only_trainable"], result
    assert result["double_checkpointed"] == [], result
    assert result["optimizer_params"] == result["n_trainable"], result
    peaks = result["metrics"]
    assert peaks["tfmem/rank0/peak_allocated_bytes"] > 0 and peaks["tfmem/rank1/peak_allocated_bytes"] > 0, peaks


@pytest.mark.slow
def test_fsdp2_accelerate_step_equals_full_batch_step(tmp_path):
    out = tmp_path / "result.json"
    debug_launcher(_accelerate_worker, args=(str(out), "fsdp"), num_processes=2)
    result = json.loads(out.read_text())
    _check(result)
    # accumulate turned gradient sync off between micro-batches (FSDP2's `set_requires_gradient_sync`)
    assert result["early_sync"] and not any(result["early_sync"]), result["early_sync"]
    # bf16 by FSDP's policy: computed in bf16, fp32 shards and gradients (reduced in fp32).
    assert result["bf16"] == {"logits_dtype": "torch.bfloat16", "shard_dtypes": ["torch.float32"],
                              "grad_dtypes": ["torch.float32"], "finite": True}, result["bf16"]


def _trainer_worker(out_path: str, tmp_dir: str) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import torch.distributed as dist
    from _fsdp import fsdp_trainer_class, full_parameters, sgd_reference_step
    from _grad_check import N_SAMPLES, RecordingCollator, make_model, make_samples, reference_gradient, relative_error
    from transformers import TrainerCallback, TrainingArguments

    from tfmem import Recipe
    from tfmem.adapters.fsdp import double_checkpointed_layers
    from tfmem.profiler.callback import MemoryProfilerCallback

    torch.set_num_threads(1)
    task = "classification"
    model, samples = make_model(task), make_samples(task)
    initial = make_model(task)
    rows = [{k: samples[k][i] for k in samples} for i in range(N_SAMPLES)]
    args = TrainingArguments(
        output_dir=tmp_dir, per_device_train_batch_size=6, max_steps=2, learning_rate=LR, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, seed=0, remove_unused_columns=False, fsdp=True,
        # SHARD_GRAD_OP (the accelerate test covers FULL_SHARD); FSDP's own checkpointing asked for too.
        fsdp_config={"version": 2, "activation_checkpointing": True, "reshard_after_forward": False},
    )
    collator = RecordingCollator()
    trainer = fsdp_trainer_class()(model=model, args=args, train_dataset=rows, data_collator=collator)
    Recipe.from_dict(RECIPE).apply(trainer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    class Snapshots(TrainerCallback):
        def __init__(self):
            self.weights = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.weights.append(full_parameters(model))  # a collective: every rank runs this callback

    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    MemoryProfilerCallback.attach(trainer, memory_steps=1, warmup_steps=0)
    trainer.train()
    everyone: list = [None, None]
    dist.all_gather_object(everyone, collator.micro_batches)
    reference, before, errors = initial, full_parameters(initial), []
    for step, after in enumerate(snapshots.weights):
        window = [i for rank in everyone for mb in rank[2 * step: 2 * step + 2] for i in mb]
        want = {n: g for n, g in reference_gradient(reference, samples, window).items() if n in trainable}
        errors.append(relative_error({n: after[n] - before[n] for n in trainable}, {n: -LR * g for n, g in want.items()}))
        reference, before = sgd_reference_step(reference, want, LR), after
    final = snapshots.weights[-1]
    peaks = [row for row in trainer.state.log_history if "tfmem/rank1/peak_allocated_bytes" in row]
    result = {
        "errors": errors,
        "processes": trainer.args.world_size,
        "sharded": trainer.is_fsdp_enabled and type(trainer.model_wrapped).__name__.startswith("FSDP"),
        "frozen_identical": all(torch.equal(final[n], t) for n, t in frozen_before.items()),
        "n_frozen": len(frozen_before),
        "grads_only_trainable": True,
        "double_checkpointed": double_checkpointed_layers(trainer.model_wrapped),
        "optimizer_params": sum(len(g["params"]) for g in trainer.optimizer.param_groups),
        "n_trainable": len(trainable),
        "metrics": {k: v for k, v in (peaks[-1] if peaks else {}).items() if "peak" in k},
        "fsdp_activation_checkpointing": trainer.accelerator.state.fsdp_plugin.activation_checkpointing,
        "reshard_after_forward": trainer.accelerator.state.fsdp_plugin.reshard_after_forward,
    }
    if trainer.accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(result, f)


@pytest.mark.slow
def test_fsdp2_trainer_step_equals_full_batch_step(tmp_path):
    out = tmp_path / "result.json"
    debug_launcher(_trainer_worker, args=(str(out), str(tmp_path / "run")), num_processes=2)
    result = json.loads(out.read_text())
    _check(result)
    assert result["fsdp_activation_checkpointing"] is False  # tfmem's checkpoint, not FSDP's too
    assert result["reshard_after_forward"] is False
