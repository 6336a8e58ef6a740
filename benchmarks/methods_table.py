"""What each memory method saves, alone and combined, on one real model and one dataset: `tfmem profile`
itself, one thread, printed as the README's "What each method saves" table, ending with a headline line.

    PYTHONPATH=. python benchmarks/methods_table.py              # ~7 minutes on one busy CPU thread
    PYTHONPATH=. python benchmarks/methods_table.py --batch-size 16 --output /tmp/methods

Model: the packaged pretrained all-MiniLM-L6-v2 (22.7M parameters, 6 layers). Data:
benchmarks/data/long_reviews.csv (1,000 reviews of 16 to ~250 tokens, skewed: `make_long_reviews.py`),
long enough that activations matter and short enough that the optimizer's state shows too. Every row is
the same effective batch on the same samples, each recipe in a fresh process (what `tfmem profile` does).

Two runs of `tfmem profile`:
1. `--dataset long_reviews.csv` with the one-method recipes (shipped ones, and benchmarks/recipes/*.yaml)
   and the combined `low-memory` / `lean-optimizer`; its baseline (fp32 AdamW, dynamic padding) is the
   reference of every ratio.
2. the baseline alone on synthetic batches padded to `--seq-len` (what a fixed `padding="max_length"`
   setup trains on): the row "padded to N (no dynamic padding)". Padded positions cost the same memory
   and compute whatever the text, so this is the same model paying for full-length batches.

fp16 and tf32 are not run: tfmem refuses both on a CPU (fp16 autocast is ~30x slower there; TF32 is a
GPU tensor-core mode). Speeds on a shared CPU vary from run to run; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "long_reviews.csv"
MODEL = "all-MiniLM-L6-v2"

# (recipe given to --recipe, label, what it changes, does it change what is learned)
METHODS = [
    ("accumulate-4", "gradient accumulation x4", "4 micro-batches per optimizer step", "no"),
    ("checkpointing", "gradient checkpointing", "layer activations recomputed in backward", "no"),
    ("bf16", "mixed precision (bf16)", "bf16 autocast, fp32 weights and optimizer", "no (rounding)"),
    ("recipes/freeze-early.yaml", "freeze embeddings + 3 layers", "no gradients/state for the frozen half", "yes"),
    ("recipes/adamw-8bit.yaml", "8-bit AdamW", "moments in 1 byte (embeddings 32-bit)", "slightly"),
    ("recipes/adafactor.yaml", "Adafactor", "factored 2nd moment, no 1st moment", "yes"),
    ("recipes/group-by-length.yaml", "length-grouped batches", "batches of similar length", "order only"),
    ("low-memory", "combined: low-memory", "accumulate x4 + checkpointing + bf16", "no"),
    ("lean-optimizer", "combined: lean-optimizer", "low-memory + 8-bit AdamW + grouping", "slightly"),
]


def profile(args: argparse.Namespace, out: Path, recipes: list[str], dataset: bool) -> list[dict]:
    """Run `tfmem profile` and return its rows (results.json)."""
    cmd = [sys.executable, "-m", "tfmem", "profile", "--model", MODEL, "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--threads", "1", "--output", str(out), "--recipe", *recipes]
    if dataset:
        cmd += ["--dataset", str(DATA)]
    print("$", " ".join(Path(c).name if c == sys.executable else c for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=HERE.parent)
    return json.loads((out / "results.json").read_text())


def mib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8, help="effective batch (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="truncation, and the fixed padding of the padded row")
    p.add_argument("--steps", type=int, default=10,
                   help="timed steps per row (default 10: with dynamic padding a row's speed depends on which "
                        "batches it timed; more steps, less of that)")
    p.add_argument("--output", default=None, help="folder for both runs' results (default: a temporary one)")
    p.add_argument("--reuse", action="store_true", help="print the table from --output's results, training nothing")
    args = p.parse_args()
    root = Path(args.output or tempfile.mkdtemp(prefix="tfmem-methods-"))
    started = time.monotonic()
    recipes = [str(HERE / r) if r.startswith("recipes/") else r for r, *_ in METHODS]
    if args.reuse:
        rows = json.loads((root / "dataset" / "results.json").read_text())
        padded = json.loads((root / "padded" / "results.json").read_text())[0]
    else:
        rows = profile(args, root / "dataset", recipes, dataset=True)
        padded = profile(args, root / "padded", ["baseline"], dataset=False)[0]

    base = rows[0]
    # The padded row trained synthetic batches; its padding on this file is what padding every row to
    # --seq-len wastes here (padded positions cost the same whatever the text).
    from tfmem.data import model_dataset_stats

    _, lengths = model_dataset_stats(DATA, MODEL)
    file_padding = 1 - sum(min(n, args.seq_len) for n in lengths) / (len(lengths) * args.seq_len)
    assert base["recipe"] == "baseline", base["recipe"]
    table = [("baseline", "fp32, AdamW, micro-batch = batch, dynamic padding", base, "—")]
    table += [(label, change, row, learns) for (_, label, change, learns), row in zip(METHODS, rows[1:])]
    table.insert(8, (f"no dynamic padding (padded to {args.seq_len})", "every batch padded to --seq-len", padded, "no"))

    print()
    print(f"all-MiniLM-L6-v2 (pretrained), {DATA.name}: {base['dataset']['rows']:,} rows, tokens mean "
          f"{base['dataset']['mean_tokens']:.0f}, p50 {base['dataset']['p50_tokens']}, p99 "
          f"{base['dataset']['p99_tokens']}, max {base['dataset']['max_tokens']}; effective batch {args.batch_size}, "
          f"at most {args.seq_len} tokens; CPU ({platform.processor() or platform.machine()}), 1 thread")
    print()
    print("| method | what it changes | peak | vs baseline | samples/s | vs baseline | padding | peak in | changes what is learned |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, change, row, learns in table:
        if row["status"] != "ok":
            print(f"| {label} | {change} | {row['status']}: {row.get('message', '')[:60]} | | | | | | {learns} |")
            continue
        mem = row["peak_allocated_bytes"] / base["peak_allocated_bytes"]
        speed = row["samples_per_second"] / base["samples_per_second"]
        pad = file_padding if row is padded else row.get("padding_fraction")
        print(f"| {label} | {change} | {mib(row['peak_allocated_bytes'])} | {mem:.2f}x | "
              f"{row['samples_per_second']:.1f} | {speed:.2f}x | {'' if pad is None else f'{pad:.0%}'} | "
              f"{row.get('peak_phase') or ''} | {learns} |")
    print()
    print("Not run here: fp16 (refused on CPU: fp16 autocast is ~30x slower than fp32 there) and tf32 (a GPU "
          "tensor-core mode, refused on CPU).")
    # A row's samples/s is over its timed steps only; grouping sends the longest windows to the memory
    # window, so its timed steps are shorter than the baseline's. Over a whole epoch, compute follows the
    # padded positions per row (every position is computed, padding or not):
    from tfmem.data import padded_batches

    def positions(micro: int, order: str) -> float:
        batches = padded_batches(lengths, micro, order, truncate_at=args.seq_len)
        return sum(len(b) * max(b) for b in batches) / len(lengths)

    shuffled, small, grouped = positions(args.batch_size, "random"), positions(args.batch_size // 4, "random"), \
        positions(args.batch_size, "sorted")
    print(f"One epoch of this file (all {len(lengths):,} rows, shuffled), positions computed per row: micro-batch "
          f"{args.batch_size} {shuffled:.0f}; micro-batch {args.batch_size // 4} (accumulation x4) {small:.0f} "
          f"({small / shuffled:.2f}x); grouped by length {grouped:.0f} ({grouped / shuffled:.2f}x); padded to "
          f"{args.seq_len} {args.seq_len} ({args.seq_len / shuffled:.2f}x).")
    ok = [(label, r) for label, _, r, _ in table[1:] if r["status"] == "ok"]
    ratio = {label: r["peak_allocated_bytes"] / base["peak_allocated_bytes"] for label, r in ok}
    lowest = min(ratio, key=ratio.get)
    single = {k: v for k, v in ratio.items() if not k.startswith(("combined", "no dynamic"))}
    best = sorted(single, key=single.get)[:3]
    print(f"headline: baseline peak {mib(base['peak_allocated_bytes'])}; lowest {lowest} {ratio[lowest]:.2f}x; "
          f"best single methods: " + ", ".join(f"{k} {single[k]:.2f}x" for k in best)
          + f"; padding every batch to {args.seq_len} instead of dynamically: "
          f"{padded['peak_allocated_bytes'] / base['peak_allocated_bytes']:.2f}x peak "
          f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
