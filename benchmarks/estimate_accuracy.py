"""How close is `tfmem.estimate_memory` to a real `transformers.Trainer`? Predicted vs measured peak memory.

    python benchmarks/estimate_accuracy.py                  # CPU: small models, the Trainer under LiveBytes
    python benchmarks/estimate_accuracy.py --device cuda    # GPU: + bert-base / bert-large at 512, every recipe
    python benchmarks/estimate_accuracy.py --quick          # two tiny configurations (a dry run of the script)
    python benchmarks/estimate_accuracy.py --padded         # batches padded to seq_len (a mask with zeros)

Each configuration (model x recipe x sequence length x batch) is first predicted on fake tensors for the
target device (this machine's GPU capability and SM count on CUDA), then trained for a few optimizer steps
by a real `transformers.Trainer` with the recipe applied by `Recipe.apply(trainer)` and the Trainer's own
default optimizer (fused AdamW with torch >= 2.8) and gradient clipping. The measurement is independent
of the estimator: on CUDA `torch.cuda.max_memory_allocated()` over the run (its steady-state steps have
the optimizer state; cuBLAS workspaces of earlier rows stay allocated, and are part of the figure); on a
CPU, which keeps no peak statistics, the profiler's `LiveBytes` over the whole `trainer.train()` (the
model and every tensor storage the run creates, exactly; not the dataset, which a GPU run keeps on the host). Samples fill `seq_len` unless `--padded` (the mask is then all ones, which
transformers drops: the estimate is told `padded=False`).

Prints a table; the last line is the largest relative error. On one H200 the CUDA run takes about
3 minutes (27 configurations; bert-large fp32 at batch 32 peaks near 29 GiB).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import os
import tempfile
import time
import warnings
from dataclasses import replace

import torch

from tfmem.estimate import device_profile, estimate_memory
from tfmem.profiler.live_bytes import LiveBytes
from tfmem.recipe import Recipe
from tfmem.shipped import shipped_recipe_names
from tfmem.zoo import model_config

# Every estimate runs its fake steps: the "est s" column times them, not a read of the estimate cache.
os.environ.setdefault("TFMEM_CACHE", "0")

# (model, recipe, seq_len, batch). Small models at batch 16, where activations are most of the peak, as in
# real fine-tuning; on CUDA also bert-base and bert-large at 512 tokens with every shipped recipe.
SMALL = [
    ("bert-tiny", "baseline", 512, 16), ("bert-tiny", "checkpointing", 512, 16), ("bert-tiny", "bf16", 256, 16),
    ("tfmem-tiny-bert", "baseline", 256, 16), ("tfmem-tiny-bert", "accumulate-4", 512, 16),
    ("tfmem-tiny-bert", "low-memory", 512, 16),
    ("bert-mini", "baseline", 256, 16), ("bert-mini", "checkpointing", 512, 16), ("bert-mini", "bf16", 256, 16),
    ("bert-mini", "low-memory", 512, 16),
    ("bert-small", "baseline", 128, 16), ("bert-small", "checkpointing", 256, 16), ("bert-small", "accumulate-4", 256, 16),
]
QUICK = [("bert-tiny", "baseline", 64, 4), ("tfmem-tiny-bert", "low-memory", 64, 4)]
REALISTIC_MODELS = ("bert-base-uncased", "bert-large-uncased")
REALISTIC_BATCH = 32  # bert-large fp32 without techniques: ~29 GiB


def configurations(device: str, quick: bool) -> list[tuple[str, str, int, int]]:
    if quick:
        return QUICK
    rows = list(SMALL)
    if device == "cuda":
        recipes = ["baseline", *shipped_recipe_names()]
        rows += [(m, r, 512, REALISTIC_BATCH) for m in REALISTIC_MODELS for r in recipes]
    if device == "cpu":
        rows = [row for row in rows if _recipe(row[1]).mixed_precision != "fp16"]  # fp16 is refused on CPU
    return rows


def _recipe(name: str) -> Recipe:
    return Recipe(name="baseline") if name == "baseline" else Recipe.load(name)


class _Samples(torch.utils.data.Dataset):
    """`count` samples of `seq_len` random tokens; padded ones keep a random half-to-full length."""

    def __init__(self, count: int, seq_len: int, vocab: int, padded: bool) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (count, seq_len), generator=g)
        self.mask = torch.ones((count, seq_len), dtype=torch.long)
        if padded:
            for row, n in enumerate(torch.randint(seq_len // 2, seq_len, (count,), generator=g)):
                self.mask[row, n:] = 0
                self.ids[row, n:] = 0
        self.labels = torch.randint(0, 2, (count,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def measure(name: str, recipe: Recipe, seq_len: int, batch: int, device: str, padded: bool, steps: int) -> dict:
    """Train `steps` optimizer steps with a real Trainer; the peak allocated bytes (and reserved on CUDA)."""
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    leftover = torch.cuda.memory_allocated() if device == "cuda" else 0  # earlier rows' (workspaces only, if clean)
    torch.manual_seed(0)
    config = model_config(name)
    with torch.device(device):  # initialise on the device: bert-large's random init is slow on a CPU
        model = AutoModelForSequenceClassification.from_config(config)
    data = _Samples(batch * steps, seq_len, config.vocab_size, padded)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, report_to=[],
                                 save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                 use_cpu=device == "cpu", dataloader_num_workers=0, learning_rate=1e-5)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        recipe.apply(trainer)
        optimizer_name = getattr(trainer.args.optim, "value", str(trainer.args.optim))
        quiet = contextlib.redirect_stdout(io.StringIO())  # the Trainer prints its run summary
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with quiet:
                trainer.train()
            torch.cuda.synchronize()
            result = {"peak": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
                      "leftover": leftover}
        else:
            # The dataset's tensors exist before training and are not training memory (on a GPU they stay
            # in host memory): count the model and what the run creates (batches, gradients, state, ...).
            tracker = LiveBytes(track_inputs=False)
            tracker.track(trainer.model)
            with tracker, quiet:
                trainer.train()
            result = {"peak": tracker.peak_bytes, "reserved": None, "leftover": 0}
    result["optimizer"] = optimizer_name
    del trainer, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def target_profile(device: str):
    """The estimator's description of this machine's device (on CUDA with its own SM count, which sizes the
    reduction kernels' buffers: see tfmem.estimate.kernels)."""
    if device == "cpu":
        return device_profile("cpu")
    major, minor = torch.cuda.get_device_capability()
    props = torch.cuda.get_device_properties(0)
    return replace(device_profile("cuda", capability=f"{major}.{minor}"), name=props.name,
                   multiprocessors=props.multi_processor_count, memory_bytes=props.total_memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="two tiny configurations: check the script runs")
    parser.add_argument("--padded", action="store_true", help="pad samples to seq_len (attention mask with zeros)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (default 3)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here; run without it to compare against the CPU Trainer.")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("tfmem").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    profile = target_profile(args.device)
    rows = configurations(args.device, args.quick)
    started = time.perf_counter()
    print(f"target: {profile.describe()}; {'padded' if args.padded else 'full-length'} samples, "
          f"{args.steps} Trainer steps per row, torch {torch.__version__}")
    header = (f"{'model':18} {'recipe':14} {'seq':>4} {'batch':>5} {'predicted MiB':>14} {'measured MiB':>13} "
              f"{'error':>8} {'peak phase':>22} {'est s':>6}")
    if args.device == "cuda":
        header += f" {'pred. reserved':>14} {'reserved':>9}"
    print(header)
    errors = []
    optimizers = set()
    for name, recipe_name, seq_len, batch in rows:
        recipe = _recipe(recipe_name)
        t0 = time.perf_counter()
        est = estimate_memory(model_config(name), recipe, batch, seq_len, profile, padded=args.padded)
        seconds = time.perf_counter() - t0
        got = measure(name, recipe, seq_len, batch, args.device, args.padded, args.steps)
        optimizers.add(got["optimizer"])
        error = (est.peak_bytes - got["peak"]) / got["peak"]
        errors.append((abs(error), error, name, recipe_name, seq_len, batch))
        line = (f"{name:18} {recipe_name:14} {seq_len:>4} {batch:>5} {est.peak_bytes / 2**20:>14.2f} "
                f"{got['peak'] / 2**20:>13.2f} {error:>+8.2%} {est.peak_phase:>22} {seconds:>6.1f}")
        if args.device == "cuda":
            line += f" {est.reserved_bytes / 2**20:>14.0f} {got['reserved'] / 2**20:>9.0f}"
            if got["leftover"] > profile.library_workspace_bytes:
                line += f"  (started with {got['leftover'] / 2**20:.0f} MiB allocated)"
        print(line, flush=True)
    worst = max(errors)
    print(f"Trainer optimizer: {', '.join(sorted(optimizers))}; {time.perf_counter() - started:.0f} s in all")
    print(f"largest error over {len(errors)} configurations ({args.device}, {profile.name}): {worst[0]:.2%} "
          f"({worst[2]} {worst[3]} {worst[4]} x {worst[5]}, {worst[1]:+.2%})")


if __name__ == "__main__":
    main()
