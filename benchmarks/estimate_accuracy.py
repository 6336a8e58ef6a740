"""How close is `tfmem.estimate_memory` to a measured peak? Predicted vs measured for a matrix of configs.

    python benchmarks/estimate_accuracy.py                 # CPU: the profiler's exact live-tensor peak
    python benchmarks/estimate_accuracy.py --device cuda   # GPU: torch.cuda.max_memory_allocated

Each configuration (model x recipe x sequence length) is predicted on fake tensors for the target
device, then trained for two real optimizer steps under `tfmem.profiler.Profiler` (the measurement is
the profiler's, not the estimator's: on CPU its LiveBytes window over real tensors, on CUDA the
allocator's peak statistics). Prints a table; the last line is the largest relative error.
"""

from __future__ import annotations

import argparse
import time

import torch

from tfmem.estimate import estimate_memory
from tfmem.profiler.batches import micro_batches, synthetic_samples
from tfmem.profiler.session import Profiler
from tfmem.recipe import Recipe
from tfmem.techniques.precision import autocast_dtype
from tfmem.zoo import build_model, model_config

# (model, recipe, seq_len) at batch 16: sizes where activations are most of the peak, as in real
# fine-tuning, so the table tests the activation accounting and not only weights and optimizer state.
CONFIGS = [
    ("bert-tiny", "baseline", 512), ("bert-tiny", "checkpointing", 512), ("bert-tiny", "bf16", 256),
    ("tfmem-tiny-bert", "baseline", 256), ("tfmem-tiny-bert", "accumulate-4", 512), ("tfmem-tiny-bert", "low-memory", 512),
    ("bert-mini", "baseline", 256), ("bert-mini", "checkpointing", 512), ("bert-mini", "bf16", 256),
    ("bert-mini", "low-memory", 512),
    ("bert-small", "baseline", 128), ("bert-small", "checkpointing", 256), ("bert-small", "accumulate-4", 256),
]
BATCH = 16


def measure(name: str, recipe: Recipe, seq_len: int, device: str) -> int:
    torch.manual_seed(0)
    model, _ = build_model(name)
    recipe.prepare_model(model)
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  fused=True if device == "cuda" else None)
    micro = BATCH // recipe.gradient_accumulation_steps
    batches = micro_batches(synthetic_samples(2 * BATCH, seq_len, model.config.vocab_size), micro, pad_to=seq_len)
    cast = autocast_dtype(recipe.mixed_precision)
    profiler = Profiler(model, optimizer, device=device, memory_steps=2, warmup_steps=0)
    steps = recipe.gradient_accumulation_steps
    for step in range(2):
        with profiler.step():
            for batch in batches[step * steps:(step + 1) * steps]:
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device, dtype=cast or torch.bfloat16, enabled=cast is not None):
                    loss = model(**batch).loss
                loss.backward()
                del loss, batch
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return int(profiler.metrics()["tfmem/peak_allocated_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here; run without it to compare against the CPU profiler.")
    if args.device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        target = f"cuda:{major}.{minor}"
    rows = []
    print(f"{'model':16} {'recipe':14} {'seq':>4} {'predicted MiB':>14} {'measured MiB':>13} {'error':>8} "
          f"{'activations':>11} {'est s':>6}")
    for name, recipe_name, seq_len in CONFIGS:
        recipe = Recipe(name="baseline") if recipe_name == "baseline" else Recipe.load(recipe_name)
        if args.device == "cpu" and recipe.mixed_precision == "fp16":
            continue
        t0 = time.perf_counter()
        if args.device == "cuda":
            from tfmem.estimate import device_profile
            profile = device_profile("cuda", capability=target.split(":")[1])
        else:
            profile = "cpu"
        est = estimate_memory(model_config(name), recipe, BATCH, seq_len, profile)
        predicted = est.peak_bytes
        seconds = time.perf_counter() - t0
        measured = measure(name, recipe, seq_len, args.device)
        error = (predicted - measured) / measured
        rows.append(error)
        print(f"{name:16} {recipe_name:14} {seq_len:>4} {predicted / 2**20:>14.2f} {measured / 2**20:>13.2f} {error:>+8.2%} "
              f"{est.activations_bytes / predicted:>11.0%} {seconds:>6.1f}")
    worst = max(rows, key=abs)
    print(f"largest error over {len(rows)} configurations ({args.device}, batch {BATCH}): {abs(worst):.2%}")


if __name__ == "__main__":
    main()
