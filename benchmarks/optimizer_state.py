"""Optimizer state of bert-base under each `optimizer:`, predicted (fake step) against a real step.

    python benchmarks/optimizer_state.py                  # CPU (bitsandbytes 0.45+ has CPU kernels)
    python benchmarks/optimizer_state.py --device cuda    # in benchmarks/gpu_checks.sh

For each optimizer: the estimator's optimizer-state bytes (`estimate_memory`, one fake step), the
bytes of the state a real optimizer holds after real steps of the model (every tensor in
`optimizer.state`, shared ones once), and the state relative to AdamW's. The real optimizer is the one
`recipe.create_optimizer(model)` builds: the class and arguments the Trainer uses, embeddings in 32-bit
for adamw-8bit as the Trainer registers them. Two more rows freeze the embeddings.
The last line is the headline: the largest prediction error.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification

from tfmem.estimate import estimate_memory
from tfmem.recipe import Recipe
from tfmem.zoo import model_config

CASES = [
    ("adamw", {}),
    ("adamw-8bit", {}),
    ("adamw", {"freeze": {"embeddings": True, "layers": 0}}),
    ("adamw-8bit", {"freeze": {"embeddings": True, "layers": 0}}),
    ("adafactor", {}),
]


def real_state_bytes(recipe: Recipe, model_name: str, device: str, batch: int, seq: int) -> tuple[int, int | None]:
    """(state bytes after two real steps, peak allocated on CUDA or None)."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(model_config(model_name), attn_implementation="sdpa").to(device)
    recipe.prepare_model(model)
    model.train()
    optimizer = recipe.create_optimizer(model, lr=1e-5)
    inputs = {"input_ids": torch.randint(0, 1000, (batch, seq), device=device),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
              "labels": torch.zeros(batch, dtype=torch.long, device=device)}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    del model, optimizer, inputs
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return sum(storages.values()), peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="bert-base-uncased")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    args = p.parse_args(argv)
    try:
        import bitsandbytes  # noqa: F401
        have_bnb = True
    except ImportError:
        have_bnb = False
    print(f"{args.model}, batch {args.batch_size} x {args.seq_len} tokens, device {args.device}, torch {torch.__version__}"
          + ("" if have_bnb else "; bitsandbytes not installed: adamw-8bit rows skipped"))
    print(f"{'optimizer':<28}{'predicted MiB':>14}{'real MiB':>10}{'error':>9}{'x AdamW':>9}{'peak pred/real MiB':>20}{'s':>6}")
    worst, adamw_bytes = 0.0, {}
    for name, extra in CASES:
        if name == "adamw-8bit" and not have_bnb:
            continue
        label = name + (" (frozen embeddings)" if extra else "")
        recipe = Recipe.from_dict({"name": f"opt-{name}", "optimizer": name, **extra})
        t0 = time.perf_counter()
        est = estimate_memory(args.model, recipe, args.batch_size, args.seq_len, args.device)
        real, peak = real_state_bytes(recipe, args.model, args.device, args.batch_size, args.seq_len)
        if name == "adamw":
            adamw_bytes[bool(extra)] = real  # the ratio is to AdamW with the same parameters trainable
        error = (est.optimizer_state_bytes - real) / real
        worst = max(worst, abs(error))
        peaks = f"{est.peak_bytes / 2**20:.0f}/{peak / 2**20:.0f}" if peak is not None else "-"
        ratio = f"{real / adamw_bytes[bool(extra)]:.3f}" if bool(extra) in adamw_bytes else "-"
        print(f"{label:<28}{est.optimizer_state_bytes / 2**20:>14.1f}{real / 2**20:>10.1f}{error:>+9.2%}{ratio:>9}"
              f"{peaks:>20}{time.perf_counter() - t0:>6.0f}", flush=True)
    print(f"largest optimizer-state prediction error: {worst:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
