"""Does the planner's `SpeedModel` predict how much slower (or faster) each recipe trains? Measured vs predicted.

    python benchmarks/speed_model.py                       # CPU, bert-mini, batch 16 x 128, 1 thread: ~1.5 min
    python benchmarks/speed_model.py --device cuda --model bert-base-uncased --batch-size 32 --seq-len 512

`tfmem.estimate.speed.SpeedModel` ranks recipes by a relative time per sample (1.0 = the baseline at the
same effective batch) built from documented defaults, not from measurements. This trains each recipe with
the profiler's own sweep (`tfmem.profiler.sweep.run_sweep`, the engine of `tfmem profile`: fresh model per
recipe, the accelerate loop, synchronised clocks, warm-up steps untimed), with no memory window (on CPU it
would slow the steps it watches, and it is not needed here), and compares the measured time per sample,
relative to the baseline's, with the model's prediction.

Each recipe runs `--rounds` times, in turn, and keeps its best round (highest samples/s): on a machine
shared with other work, the least-disturbed round is the closest to the recipe's own cost. A recipe the
device cannot run natively (`precision_problems`: fp16 on CPU, bf16 below compute capability 8.0) is shown
as skipped. Prints a table, the predicted and measured orders, and last the largest ratio error.
"""

from __future__ import annotations

import argparse
import time

import torch

from tfmem.estimate.device import device_profile
from tfmem.estimate.fake_step import num_layers_of
from tfmem.estimate.speed import SpeedModel
from tfmem.profiler.sweep import BASELINE, SweepSpec, run_sweep
from tfmem.recipe import Recipe
from tfmem.zoo import model_config

RECIPES = ("checkpointing", "accumulate-4", "bf16", "low-memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert-mini")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=16, help="effective batch per optimizer step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per recipe and round")
    parser.add_argument("--rounds", type=int, default=3, help="sweeps over all recipes; each keeps its best")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads on CPU; 0 keeps PyTorch's default")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="compared with the baseline")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here; run with --device cpu.")
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)  # 1: fewer thread hand-offs, steadier times on a shared machine
    if args.device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        profile = device_profile("cuda", capability=f"{major}.{minor}")
        where = f"cuda {torch.cuda.get_device_name()}"
    else:
        profile = device_profile("cpu")
        where = f"cpu, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}"

    recipes = [BASELINE] + [Recipe.load(name) for name in args.recipes]
    spec = SweepSpec(model=args.model, recipes=tuple(recipes), batch_size=args.batch_size, seq_len=args.seq_len,
                     steps=args.steps, warmup_steps=1, memory_steps=0, device=args.device)
    t0 = time.perf_counter()
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for row in run_sweep(spec):
            kept = best.get(row["recipe"])
            if kept is None or (row.get("samples_per_second") or 0) > (kept.get("samples_per_second") or 0):
                best[row["recipe"]] = row
    seconds = time.perf_counter() - t0

    base = best[BASELINE.name]
    if base["status"] != "ok":
        raise SystemExit(f"the baseline did not run ({base['status']}: {base['message']}); nothing to compare with.")
    layers = num_layers_of(model_config(args.model))
    model = SpeedModel()
    print(f"{args.model}, batch {args.batch_size} x {args.seq_len}, {where}, "
          f"best of {args.rounds} rounds x {args.steps} steps")
    print(f"{'recipe':14} {'micro':>5} {'samples/s':>10} {'measured':>9} {'predicted':>10} {'error':>8}")
    measured: dict[str, float] = {}
    predicted: dict[str, float] = {}
    for recipe in recipes:
        row = best[recipe.name]
        if row["status"] != "ok":
            print(f"{recipe.name:14} skipped ({row['status']}): {row['message']}")
            continue
        measured[recipe.name] = base["samples_per_second"] / row["samples_per_second"]  # time per sample, relative
        predicted[recipe.name] = model.relative_time(recipe, layers, args.batch_size, args.seq_len, profile)
        error = predicted[recipe.name] / measured[recipe.name] - 1
        print(f"{recipe.name:14} {row['micro_batch_size']:>5} {row['samples_per_second']:>10.1f} "
              f"{measured[recipe.name]:>8.2f}x {predicted[recipe.name]:>9.2f}x {error:>+8.0%}")

    def order(times: dict[str, float]) -> str:
        return " < ".join(sorted(times, key=lambda name: (times[name], name)))

    wrong = [(a, b) for a in measured for b in measured
             if measured[a] < measured[b] and predicted[a] > predicted[b]]
    print(f"measured order (fastest first):  {order(measured)}")
    print(f"predicted order (fastest first): {order(predicted)}")
    print(f"pairs the model orders the wrong way round (measured faster < slower): "
          f"{', '.join(f'{a} < {b}' for a, b in wrong) or 'none'} (ties in the prediction not counted)")
    print(f"({len(recipes)} recipes x {args.rounds} rounds took {seconds:.0f} s)")
    compared = [n for n in measured if n != BASELINE.name]
    if not compared:
        raise SystemExit("no recipe besides the baseline ran; nothing to compare.")
    worst = max((abs(predicted[n] / measured[n] - 1), n) for n in compared)
    print(f"speed model: largest ratio error {worst[0]:.0%} ({worst[1]}; {args.device}, {args.model}, "
          f"batch {args.batch_size} x {args.seq_len})")


if __name__ == "__main__":
    main()
