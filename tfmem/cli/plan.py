"""`tfmem plan`: the fastest recipe that fits a memory budget, written as a recipe YAML."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from tfmem.cli.dataset import add_dataset_argument, phase_sentence, plan_with_dataset
from tfmem.cli.estimate import add_device_arguments, profile_from_args
from tfmem.estimate.device import DeviceProfile
from tfmem.estimate.plan import Candidate, plan
from tfmem.estimate.speed import SpeedModel
from tfmem.profiler.units import SizeError, format_bytes, parse_bytes
from tfmem.zoo import DEFAULT_MODEL


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="find the fastest recipe whose predicted peak fits a memory budget",
                              description="Search accumulation, checkpointing, mixed precision (and, if allowed, "
                                          "freezing) for the fastest recipe that fits, keeping the effective batch.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a known architecture name or a model directory (default {DEFAULT_MODEL})")
    p.add_argument("--batch-size", type=int, required=True, help="effective batch size, kept by every recipe")
    p.add_argument("--seq-len", type=int, help="tokens per sample (required without --dataset; with it, where rows are truncated)")
    add_dataset_argument(p)
    p.add_argument("--budget", help="memory available, e.g. 8GiB; default the --gpu's memory")
    p.add_argument("--overhead", default=None, help="memory outside PyTorch's allocator (CUDA context); default 0.5GiB on CUDA, 0 on CPU")
    p.add_argument("--allow-freeze", type=int, default=0, metavar="N",
                   help="also try freezing the embeddings and first N layers (changes what is learned; default never)")
    add_device_arguments(p)
    p.add_argument("--output", "-o", metavar="PATH", help="write the chosen recipe here as YAML (loads with Recipe.from_yaml)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        profile = profile_from_args(args)
        if args.budget is None and profile.memory_bytes is None:
            print("tfmem plan: error: --budget is required unless --gpu names a card (e.g. --budget 8GiB or --gpu t4).",
                  file=sys.stderr)
            return 2
        budget = parse_bytes(args.budget, field="--budget") if args.budget else profile.memory_bytes
        overhead = parse_bytes(args.overhead, field="--overhead") if args.overhead not in (None, "0") else (0 if args.overhead == "0" else None)
        if args.dataset:
            return plan_with_dataset(args, budget, overhead, profile)
        if args.seq_len is None:
            raise ValueError("--seq-len is required (or --dataset FILE to plan for a dataset's lengths).")
        result = plan(args.model, args.batch_size, args.seq_len, budget, profile, allow_freeze=args.allow_freeze,
                      overhead_bytes=overhead)
    except SizeError as e:
        print(f"tfmem plan: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if type(e).__name__ == "RecipeError":
            raise
        print(f"tfmem plan: error: {e}", file=sys.stderr)
        return 2
    if args.output and result.chosen:
        result.chosen.recipe.to_yaml(args.output)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0 if result.chosen else 1
    console = Console()
    console.print(f"[bold]{result.model}[/], batch {result.batch_size} x seq {result.seq_len}, budget "
                  f"{format_bytes(result.budget_bytes)} on {result.device} "
                  f"({format_bytes(result.overhead_bytes)} kept for the CUDA context)" if result.overhead_bytes else
                  f"[bold]{result.model}[/], batch {result.batch_size} x seq {result.seq_len}, budget "
                  f"{format_bytes(result.budget_bytes)} on {result.device}")
    if profile.type == "cuda" and profile.capability is None:
        # bf16 is searched only where the card has it; without a card named we cannot know.
        console.print("No --gpu or --gpu-capability given: assuming bf16 is available (compute capability 8.0+). "
                      "On a V100, T4 or RTX 20xx pass --gpu (e.g. --gpu t4) to plan with fp16 instead.")
    table = Table(title="Recipes that fit, fastest first" if result.fitting else "Nothing fits")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("recipe")
    for col in ("micro", "peak", "reserved", "headroom", "time"):
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    for i, c in enumerate(result.fitting, 1):
        _row(table, str(i), c)
    for c in result.not_fitting[:4]:
        _row(table, "-", c, style="dim")
    console.print(table)
    console.print("micro: micro-batch size; peak: predicted peak allocated; reserved: with the allocator's cache; "
                  "headroom: budget - reserved - overhead; time: per sample, relative to fp32 without techniques "
                  "(1.00): " + _speed_note(profile))
    if result.chosen is None:
        c = result.closest
        console.print(f"[bold red]Nothing fits in {format_bytes(result.budget_bytes)}.[/]" + (
            f" Closest: {c.recipe.summary()} (micro-batch {c.estimate.micro_batch_size}) needs "
            f"{format_bytes(c.needed_bytes)}, {format_bytes(-c.headroom_bytes)} over. Try a shorter --seq-len, "
            f"a smaller --batch-size" + ("" if args.allow_freeze else ", --allow-freeze N")
            + (", or a larger --budget if the machine has the memory." if profile.type == "cpu" else ", or a larger GPU.")
            if c else ""))
        return 1
    est = result.chosen_estimate or result.chosen.estimate
    console.print(f"Chosen: [bold]{result.chosen.recipe.summary()}[/], micro-batch {est.micro_batch_size}: predicted peak "
                  f"{format_bytes(est.peak_bytes)} allocated ({est.method}), headroom {format_bytes(result.chosen.headroom_bytes)}.")
    console.print(phase_sentence(est.peak_phase))
    if args.output:
        console.print(f"Wrote {args.output}; load it with Recipe.from_yaml({args.output!r}).")
    console.print(f"Planned in {result.seconds:.1f} s ({result.estimates_run} estimates).")
    return 0


def _row(table: Table, rank: str, c: Candidate, style: str | None = None) -> None:
    table.add_row(rank, c.recipe.summary(), str(c.estimate.micro_batch_size), format_bytes(c.estimate.peak_bytes),
                  format_bytes(c.estimate.reserved_bytes), format_bytes(c.headroom_bytes), f"{c.relative_time:.2f}",
                  style=style)


def _speed_note(profile: DeviceProfile) -> str:
    """The speed model's constants for `profile`'s device type, so the ranking says what it rests on."""
    m = SpeedModel()
    checkpointing = f"checkpointing +{m.recompute_units:.0f} forward per layer (~+33%)"
    if profile.type == "cpu":
        # Only these two CPU constants were measured; the checkpointing cost is the same default as on GPUs.
        return (f"bf16 x{m.cpu_bf16_factor} and a fixed cost of ~{m.cpu_overhead_tokens} tokens per micro-batch, measured "
                f"on a 2-core EPYC with benchmarks/speed_model.py; {checkpointing}, a documented default "
                "(see tfmem/estimate/speed.py).")
    return (f"{checkpointing}, 16-bit x{m.mixed_precision_factor} on tensor-core GPUs, each micro-batch costs "
            f"~{m.overhead_tokens} tokens of fixed overhead (documented defaults, see tfmem/estimate/speed.py).")
