"""The accelerate path under a real two-process launch (DDP over gloo on the CPU).

Each process sees its own micro-batches; `exact_loss` gathers the window's item count over both and
undoes DDP's averaging, so the synchronised gradient is the full-batch gradient over every sample
both processes saw in the window — for a masked LM, whose micro-batches differ in token counts.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from accelerate.launchers import debug_launcher

STEPS = 2


def _worker(out_path: str) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from _grad_check import N_SAMPLES, collate, make_model, make_samples, reference_gradient, relative_error
    from accelerate import Accelerator

    import tfmem
    from tfmem import Recipe

    model, samples = make_model("masked_lm"), make_samples("masked_lm")
    initial = make_model("masked_lm")
    recipe = Recipe.from_dict({"name": "ddp", "gradient_accumulation_steps": STEPS})
    accelerator = Accelerator(**recipe.accelerator_kwargs(device="cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    rows = [{k: samples[k][i] for k in samples} for i in range(N_SAMPLES)]
    loader = torch.utils.data.DataLoader(rows, batch_size=3, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    errors, seen = [], []
    for window in tfmem.accumulation_windows(loader, accelerator, model):
        seen.append(window.batch.pop("idx"))
        with accelerator.accumulate(model):
            outputs = model(**window.batch)
            accelerator.backward(tfmem.exact_loss(model, outputs, window, accelerator))
            if accelerator.sync_gradients:
                mine = torch.cat(seen)
                everyone = accelerator.gather(mine).tolist()  # the samples of this window on all processes
                grads = {n.removeprefix("module."): p.grad for n, p in model.named_parameters()}
                errors.append(relative_error(grads, reference_gradient(initial, samples, everyone)))
                seen = []
            optimizer.step()
            optimizer.zero_grad()
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump({"errors": errors, "processes": accelerator.num_processes}, f)


@pytest.mark.slow
def test_two_process_accumulated_gradient_equals_full_batch_gradient(tmp_path):
    out = tmp_path / "result.json"
    debug_launcher(_worker, args=(str(out),), num_processes=2)
    result = json.loads(out.read_text())
    assert result["processes"] == 2
    assert len(result["errors"]) >= 2
    assert max(result["errors"]) <= 1e-9, result
