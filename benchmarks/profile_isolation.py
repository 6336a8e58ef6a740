"""Are `tfmem profile` rows reproducible, and do they match a real Trainer run of the same recipe?

For each recipe (default: low-memory and checkpointing) the peak allocated bytes measured

- alone, first in a sweep, with 1 timed step;
- last, after mixed-precision rows (fp16 on CUDA, bf16 on CPU: the rows whose models leaked into the
  next row on the H200 before rows were isolated), with 3 timed steps;
- through the CLI (`tfmem profile`, a baseline row first, 2 timed steps);
- by a real `transformers.Trainer` run of the recipe (its default optimizer, `recipe.apply`), measured by
  `MemoryProfilerCallback` over the same memory window, in a process of its own.

Prints a table and ends with the headline: the largest spread between the three profile figures of a
recipe (goal: at most 1%) and the largest difference from the Trainer (goal: at most 3%). On CPU the
figures are exact live tensor bytes; on CUDA `torch.cuda.max_memory_allocated`.

    python benchmarks/profile_isolation.py                                  # CPU: tfmem-tiny-bert 16x128
    python benchmarks/profile_isolation.py --device cuda                    # bert-base-uncased 32x512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def trainer_peak(model: str, recipe_name: str, batch_size: int, seq_len: int, device: str, memory_steps: int) -> int:
    """Peak of a real Trainer run (run in this process: call it from a fresh one)."""
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from tfmem import Recipe
    from tfmem.profiler.batches import micro_batches, synthetic_samples
    from tfmem.profiler.callback import MemoryProfilerCallback
    from tfmem.zoo import build_model, resolve

    hf_logging.set_verbosity_error()
    config, _ = resolve(model)
    samples = synthetic_samples(batch_size * memory_steps, seq_len, config.vocab_size, seed=0)
    data = [{k: v[0] for k, v in b.items()} for b in micro_batches(samples, 1, pad_to=seq_len)]
    torch.manual_seed(0)
    net, _ = build_model(model)
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(output_dir=folder, per_device_train_batch_size=batch_size, max_steps=memory_steps,
                                 report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                 use_cpu=device == "cpu", dataloader_drop_last=True)
        trainer = Trainer(model=net, args=args, train_dataset=data)
        Recipe.load(recipe_name).apply(trainer)
        callback = MemoryProfilerCallback.attach(trainer, memory_steps=memory_steps, warmup_steps=0)
        trainer.train()
        return int(callback.profiler.metrics(prefix="")["peak_allocated_bytes"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--recipe", nargs="+", default=["low-memory", "checkpointing"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (peaks do not depend on it)")
    parser.add_argument("--trainer-only", metavar="RECIPE", help=argparse.SUPPRESS)  # the Trainer's own process
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    model = args.model or ("bert-base-uncased" if cuda else "tfmem-tiny-bert")
    batch = args.batch_size or (32 if cuda else 16)
    seq_len = args.seq_len or (512 if cuda else 128)
    memory_steps = 2
    if args.trainer_only:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(trainer_peak(model, args.trainer_only, batch, seq_len, args.device, memory_steps)))
        return 0

    from tfmem import Recipe
    from tfmem.cli import main as cli
    from tfmem.profiler.sweep import SweepSpec, run_sweep, trainer_defaults
    from tfmem.profiler.units import format_bytes

    def sweep(names, steps, baseline):
        spec = SweepSpec(model=model, recipes=tuple(Recipe.load(n) for n in names), batch_size=batch,
                         seq_len=seq_len, steps=steps, memory_steps=memory_steps, device=args.device,
                         include_baseline=baseline, threads=args.threads)
        return {r["recipe"]: r["peak_allocated_bytes"] for r in run_sweep(spec)}

    mixed = "fp16" if cuda else "bf16"
    alone = sweep(list(reversed(args.recipe)), steps=1, baseline=False)
    after = sweep([mixed, *[r for r in args.recipe if r != mixed]], steps=3, baseline=True)
    with tempfile.TemporaryDirectory() as folder:
        code = cli(["profile", "--model", model, "--recipe", *args.recipe, "--batch-size", str(batch), "--seq-len",
                    str(seq_len), "--steps", "2", "--memory-steps", str(memory_steps), "--device", args.device,
                    "--threads", str(args.threads), "--output", folder])
        if code != 0:
            print(f"tfmem profile exited with {code}")
            return 1
        via_cli = {r["recipe"]: r["peak_allocated_bytes"] for r in json.loads((Path(folder) / "results.json").read_text())}
    trainer = {}
    for name in args.recipe:
        done = subprocess.run([sys.executable, __file__, "--trainer-only", name, "--device", args.device, "--model", model,
                               "--batch-size", str(batch), "--seq-len", str(seq_len), "--threads", str(args.threads)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:])
            return 1
        trainer[name] = int(done.stdout.strip().splitlines()[-1])

    print(f"\n{model} on {args.device}, batch {batch} x {seq_len}; profile loop: {trainer_defaults().describe()}")
    print(f"{'recipe':<15}{'alone, 1 step':>15}{f'after {mixed}, 3':>15}{'CLI, 2 steps':>15}{'Trainer':>15}"
          f"{'spread':>9}{'vs Trainer':>12}")
    worst_spread = worst_trainer = 0.0
    for name in args.recipe:
        peaks = [alone[name], after[name], via_cli[name]]
        if any(p is None for p in peaks):
            print(f"{name:<15} did not run in every sweep: {peaks}")
            return 1
        spread = (max(peaks) - min(peaks)) / min(peaks) * 100
        versus = max(abs(p - trainer[name]) for p in peaks) / trainer[name] * 100
        worst_spread, worst_trainer = max(worst_spread, spread), max(worst_trainer, versus)
        print(f"{name:<15}" + "".join(f"{format_bytes(p):>15}" for p in (*peaks, trainer[name]))
              + f"{spread:>8.2f}%{versus:>11.2f}%")
    print(f"largest spread across orders, steps and CLI: {worst_spread:.2f}% (goal <= 1%); "
          f"largest difference from a real Trainer: {worst_trainer:.2f}% (goal <= 3%)")
    return 0 if worst_spread <= 1 and worst_trainer <= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
