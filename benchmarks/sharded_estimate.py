"""How close is `tfmem estimate --gpus N --strategy S` to one rank's measured peak? CPU, 2 processes (gloo).

    python benchmarks/sharded_estimate.py

Each configuration (strategy x recipe) is predicted by `tfmem.estimate.sharding.estimate_sharded` (a fake
step over a fake process group for FSDP; the single-GPU estimate plus DDP's buckets for DDP), then
trained for real: two processes launched with accelerate's `debug_launcher` (gloo), the model prepared
by `accelerate.prepare` (DDP, or FSDP2 through the plugin tfmem adjusts for the recipe), two optimizer
steps with accelerate's `accumulate`, and each rank's second step counted by the profiler's `LiveBytes`
(live tensor bytes; DTensors as their local shards). Measured is the larger of the two ranks' peaks.
Prints a table; the last line is the largest relative error. The lighter optimizers (adafactor, adamw-8bit)
run under DDP only (FSDP2 cannot step them: the estimate refuses them there).

accelerate does not shard on a CPU (it sets up DDP there and ignores the plugin), so the worker selects
its FSDP path after building the Accelerator (and again after `prepare`, which resets it);
`accelerator.prepare` then shards with its own code and `accumulate` turns gradient sync off.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch
from accelerate.launchers import debug_launcher
from transformers import BertConfig

from tfmem.estimate.sharding import estimate_sharded
from tfmem.recipe import Recipe

GPUS, BATCH, SEQ = 2, 16, 64
RECIPES = {
    "baseline": {"name": "baseline"},
    "accumulate-2+ckpt": {"name": "accumulate-2+ckpt", "gradient_accumulation_steps": 2, "gradient_checkpointing": True},
    "freeze-2+bf16": {"name": "freeze-2+bf16", "freeze": {"embeddings": True, "layers": 2}, "mixed_precision": "bf16"},
    # Lighter optimizers: DDP only. Under FSDP2 both fail at their first step on DTensor parameters, and the
    # estimate refuses them (tfmem.adapters.fsdp.recipe_problems).
    "adafactor": {"name": "adafactor", "optimizer": "adafactor"},
    "adamw-8bit": {"name": "adamw-8bit", "optimizer": "adamw-8bit"},
}
STRATEGIES = ("ddp", "fsdp", "fsdp-grad-op")


def config() -> BertConfig:
    return BertConfig(vocab_size=4000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=512, max_position_embeddings=128, num_labels=2)


def _worker(out_path: str, strategy: str, recipe_data: dict) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from transformers import AutoModelForSequenceClassification

    from tfmem.adapters.fsdp import recipe_fsdp_plugin
    from tfmem.estimate.fake_step import _batch
    from tfmem.profiler.live_bytes import LiveBytes

    torch.manual_seed(0)
    torch.set_num_threads(1)
    recipe = Recipe.from_dict(recipe_data)
    plugin = None
    if strategy != "ddp":
        plugin = recipe_fsdp_plugin(recipe, strategy, auto_wrap_policy="transformer_based_wrap",
                                    transformer_cls_names_to_wrap=["BertLayer"])
    kwargs = recipe.accelerator_kwargs(device="cpu", fsdp_plugin=plugin)
    accelerator = Accelerator(**kwargs)

    def select_fsdp() -> None:
        if plugin is not None:
            accelerator.state.distributed_type = DistributedType.FSDP
            accelerator.state.fsdp_plugin = kwargs["fsdp_plugin"]

    select_fsdp()
    model = AutoModelForSequenceClassification.from_config(config(), attn_implementation="sdpa")
    recipe.prepare_model(model)
    model.train()
    if recipe.optimizer.name == "adamw":
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    else:  # the recipe's, as the Trainer builds it (8-bit: embeddings' state in 32-bit)
        from tfmem.techniques.optimizer import build_optimizer

        optimizer = build_optimizer(recipe.optimizer, model, lr=1e-5)
    steps = recipe.gradient_accumulation_steps
    batch = _batch(model, config(), BATCH // GPUS // steps, SEQ)
    model, optimizer = accelerator.prepare(model, optimizer)
    select_fsdp()  # `prepare` puts MULTI_CPU back; `accumulate` needs FSDP to turn gradient sync off
    tracker = None
    for step in range(2):
        if step == 1:
            tracker = LiveBytes()
            tracker.track(model, optimizer, batch)
            tracker.__enter__()
        for _ in range(steps):
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    tracker.__exit__(None, None, None)
    peaks: list = [None] * GPUS
    dist.all_gather_object(peaks, [tracker.peak_bytes, tracker.peak_breakdown])
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(peaks, f)


def measure(strategy: str, recipe_data: dict) -> tuple[int, list]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peaks.json")
        debug_launcher(_worker, args=(out, strategy, recipe_data), num_processes=GPUS)
        with open(out) as f:
            peaks = json.load(f)
    return max(p[0] for p in peaks), peaks


def main() -> None:
    print(f"bert (hidden 128, 4 layers, vocab 4000), global batch {BATCH}, seq {SEQ}, {GPUS} processes (gloo, CPU)")
    print(f"{'strategy':<13} {'recipe':<18} {'predicted MiB':>13} {'measured MiB':>12} {'error':>7}  {'seconds':>7}")
    worst = 0.0
    from tfmem.techniques.optimizer import optimizer_problems

    for strategy in STRATEGIES:
        for name, data in RECIPES.items():
            t0 = time.perf_counter()
            recipe = Recipe.from_dict(data)
            if recipe.optimizer.name != "adamw" and (strategy != "ddp" or optimizer_problems(recipe.optimizer, "cpu")):
                continue  # refused under FSDP; adamw-8bit also needs bitsandbytes' CPU kernels
            est = estimate_sharded(config(), recipe, BATCH, SEQ, gpus=GPUS, strategy=strategy, device="cpu")
            measured, peaks = measure(strategy, data)
            error = (est.peak_bytes - measured) / measured
            worst = max(worst, abs(error))
            print(f"{strategy:<13} {name:<18} {est.peak_bytes / 2**20:>13.2f} {measured / 2**20:>12.2f} "
                  f"{error:>+7.2%}  {time.perf_counter() - t0:>7.1f}", flush=True)
            if "-v" in sys.argv:
                print("   predicted", est.to_dict(), "\n   measured", peaks, flush=True)
    print(f"largest error: {worst:.2%}")


if __name__ == "__main__":
    main()
