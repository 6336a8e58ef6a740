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
                                            activation_checkpointing=True)
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
    errors, seen, grads_seen = [], [], set()
    windows = iter(tfmem.accumulation_windows(loader, accelerator, model))
    done = False
    while not done:
        with profiler.step():
            for window in windows:
                seen.append(window.batch.pop("idx"))
                with accelerator.accumulate(model):
                    outputs = model(**window.batch)
                    accelerator.backward(tfmem.exact_loss(model, outputs, window, accelerator))
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
        "double_checkpointed": double_checkpointed_layers(model),
        "optimizer_params": sum(len(g["params"]) for g in optimizer.param_groups),
        "n_trainable": len(trainable),
        "state_params": len(state_params),
        "metrics": {k: v for k, v in metrics.items() if "peak" in k},
    }
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(result, f)


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
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp-grad-op"])
def test_fsdp2_accelerate_step_equals_full_batch_step(tmp_path, strategy):
    out = tmp_path / "result.json"
    debug_launcher(_accelerate_worker, args=(str(out), strategy), num_processes=2)
    result = json.loads(out.read_text())
    _check(result)
