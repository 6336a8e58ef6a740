"""`tfmem plan`: the fastest recipe that fits a memory budget, written as a recipe YAML.

The planner (torch, transformers: most of the command's start-up) is imported in `run`, not with this
module: `tfmem plan --help` builds this parser and should answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from tfmem.cli import sharding
from tfmem.cli.dataset import add_dataset_argument, dataset_conflict, phase_sentence, plan_with_dataset
from tfmem.cli.estimate import add_device_arguments, add_padding_argument, profile_from_args
from tfmem.cli.progress import search_callback, status
from tfmem.zoo import DEFAULT_MODEL

if TYPE_CHECKING:
    from tfmem.estimate.plan import Candidate


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="find the fastest recipe whose predicted peak fits a memory budget",
                              description="Search accumulation, checkpointing, mixed precision (and, if allowed, "
                                          "freezing) for the fastest recipe that fits, keeping the effective batch.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a known architecture name or a model directory (default {DEFAULT_MODEL})")
    p.add_argument("--batch-size", type=int, required=True, help="effective batch size, kept by every recipe")
    p.add_argument("--seq-len", type=int, help="tokens per sample (required without --dataset; with it, where rows are truncated)")
    add_dataset_argument(p)
    add_padding_argument(p)
    p.add_argument("--budget", help="memory available, e.g. 8GiB; default the --gpu's memory")
    p.add_argument("--overhead", default=None, help="memory outside PyTorch's allocator (CUDA context); default 0.5GiB on CUDA, 0 on CPU")
    p.add_argument("--allow-freeze", type=int, default=0, metavar="N",
                   help="also try freezing the embeddings and first N layers (changes what is learned; default never)")
    p.add_argument("--allow-optimizer", default="", metavar="NAMES",
                   help="also try lighter optimizers, comma-separated: adamw-8bit,adafactor (change what is learned; default never)")
    add_device_arguments(p)
    sharding.add_plan_arguments(p)
    p.add_argument("--output", "-o", metavar="PATH", help="write the chosen recipe here as YAML (loads with Recipe.from_yaml)")
    p.add_argument("--keep", type=int, default=1, metavar="N",
                   help="list the N fastest recipes that fit (default 1: the search stops at the fastest; each more "
                        "costs a few estimates)")
    p.add_argument("--measure", type=int, nargs="?", const=3, default=None, metavar="K",
                   help="on a machine with the target GPU: train the K fastest fitting recipes a few real steps each "
                        "(default 3), re-rank them by measured time and check their measured memory")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tfmem.estimate.plan import plan
    from tfmem.estimate.speed import speed_note
    from tfmem.profiler.units import SizeError, format_bytes, parse_bytes

    try:
        profile = profile_from_args(args)
        if args.budget is None and profile.memory_bytes is None:
            print("tfmem plan: error: --budget is required unless --gpu names a card (e.g. --budget 8GiB or --gpu t4).",
                  file=sys.stderr)
            return 2
        budget = parse_bytes(args.budget, field="--budget") if args.budget else profile.memory_bytes
        overhead = None if args.overhead is None else parse_bytes(args.overhead, field="--overhead", allow_zero=True)
        # Everything that can be refused is refused before the search (seconds to minutes) runs.
        problem = (_output_problem(args.output) or _positive("--batch-size", "batch_size", args.batch_size)
                   or (_positive("--seq-len", "seq_len", args.seq_len) if args.seq_len is not None else None)
                   or _positive("--keep", "keep", args.keep)
                   or (_positive("--measure", "measure", args.measure) if args.measure is not None else None)
                   or ("--measure and --dataset together are not supported yet; plan with --seq-len to measure."
                       if args.measure is not None and args.dataset else None)
                   or dataset_conflict(args)
                   or (sharding.sharded_conflict(args) if getattr(args, "gpus", None) else None))
        if problem:
            print(f"tfmem plan: error: {problem}", file=sys.stderr)
            return 2
        if args.measure is not None:
            from tfmem.estimate.measure import gpu_problem

            if profile.type != "cuda" or (why := gpu_problem(profile.capability)):
                why = "the plan is for a CPU" if profile.type != "cuda" else why
                print(f"tfmem plan: error: --measure needs the target GPU here ({why}); plan without --measure, "
                      "or run it on that machine.", file=sys.stderr)
                return 2
        if args.dataset:
            return plan_with_dataset(args, budget, overhead, profile)
        if args.seq_len is None:
            raise ValueError("--seq-len is required (or --dataset FILE to plan for a dataset's lengths).")
        if getattr(args, "gpus", None):
            cuda_overhead = 512 * 2**20 if profile.type == "cuda" else 0
            return sharding.run_plan(args, profile, budget, cuda_overhead if overhead is None else overhead)
        with status("Planning") as update:
            result = plan(args.model, args.batch_size, args.seq_len, budget, profile, allow_freeze=args.allow_freeze,
                          allow_optimizer=[n.strip() for n in args.allow_optimizer.split(",") if n.strip()],
                          overhead_bytes=overhead, keep=max(args.keep, args.measure or 0), padded=not args.no_padding,
                          progress=search_callback(update))
    except SizeError as e:
        print(f"tfmem plan: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"tfmem plan: error: {e}", file=sys.stderr)
        return 2
    measured = None
    if args.measure and result.fitting:
        from tfmem.estimate.measure import measure

        with status("Measuring") as update:
            measured = measure(result, args.measure, progress=None if update is None else lambda i, n, c: update(
                f"recipe {i} of {n} ({c.recipe.summary()}, micro {c.estimate.micro_batch_size})"))
    chosen = result.chosen
    if measured:  # measured beats predicted: when none fits measured, nothing is chosen (or written)
        chosen = measured[0].candidate if measured[0].fits else None
    if args.output and chosen:
        chosen.recipe.to_yaml(args.output)
    if args.json:
        data = result.to_dict()
        if measured is not None:
            data["measured"] = [m.to_dict() for m in measured]
            data["chosen_after_measuring"] = chosen.to_dict() if chosen else None
        print(json.dumps(data, indent=2))
        return 0 if chosen else 1
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
    cuda = profile.type == "cuda"
    table = Table(title="Recipes that fit, fastest first" if result.fitting else "Nothing fits")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("recipe")
    for col in ("micro", "peak", "reserved", "headroom", "time") + (("step",) if cuda else ()):
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    for i, c in enumerate(result.fitting, 1):
        _row(table, str(i), c, cuda)
    for c in result.not_fitting[:4]:
        _row(table, "-", c, cuda, style="dim")
    console.print(table)
    console.print("Searched fastest first by predicted speed; dim rows were tried and do not fit. "
                  "--keep N lists the N fastest that fit." if len(result.fitting) <= 1 else
                  "Searched fastest first by predicted speed; dim rows were tried and do not fit.")
    console.print("micro: micro-batch size; peak: predicted peak allocated; reserved: with the allocator's cache; "
                  "headroom: budget - reserved - overhead; time: per sample, relative to fp32 without techniques "
                  "(1.00)" + ("; step: predicted time per optimizer step" if cuda else "") + ". Speed model: "
                  + speed_note(profile))
    if measured is not None:
        _print_measured(console, measured, result.budget_bytes)
    if measured and chosen is None:
        needed = [m.needed_bytes for m in measured if m.needed_bytes is not None]
        console.print(f"[bold red]Nothing fits when measured:[/] none of the {len(measured)} recipes measured fits "
                      f"in {format_bytes(result.budget_bytes)}"
                      + (f" (the least needed {format_bytes(min(needed))})" if needed else "")
                      + "; nothing was written. Lower --budget by the excess and plan again, or measure more "
                        "recipes with a larger --measure K.")
        return 1
    if chosen is None:
        c = result.closest
        console.print(f"[bold red]Nothing fits in {format_bytes(result.budget_bytes)}.[/]" + (
            f" Closest: {c.recipe.summary()} (micro-batch {c.estimate.micro_batch_size}) needs "
            f"{format_bytes(c.needed_bytes)}, {format_bytes(-c.headroom_bytes)} over. Try a shorter --seq-len, "
            f"a smaller --batch-size" + ("" if args.allow_freeze else ", --allow-freeze N") + _optimizer_hint(args, profile, result)
            + (", or a larger --budget if the machine has the memory." if profile.type == "cpu" else ", or a larger GPU.")
            if c else ""))
        sharding.suggest_gpus(console, args, profile, budget, result.overhead_bytes)
        return 1
    est = chosen.estimate
    console.print(f"Chosen: [bold]{chosen.recipe.summary()}[/], micro-batch {est.micro_batch_size}: predicted peak "
                  f"{format_bytes(est.peak_bytes)} allocated ({est.method}), headroom {headroom_text(chosen)}.")
    console.print(phase_sentence(est.peak_phase))
    if args.output:
        console.print(f"Wrote {args.output}; load it with Recipe.from_yaml({args.output!r}).")
    console.print(f"Planned in {result.seconds:.1f} s ({result.estimates_run} estimates).")
    return 0


def headroom_text(c: Candidate) -> str:
    """The headroom as the table and the chosen line print it (one function, so they cannot disagree)."""
    from tfmem.profiler.units import format_bytes

    return format_bytes(c.headroom_bytes)


def _optimizer_hint(args: argparse.Namespace, profile, result) -> str:
    """", --allow-optimizer adamw-8bit (predicted to fit: ...)" when nothing fits, the user did not allow a
    lighter optimizer, and one would make the closest recipe fit; "" otherwise (a few seconds: one
    estimate per optimizer)."""
    from tfmem.estimate.plan import with_lighter_optimizers

    if args.allow_optimizer.strip():
        return ""
    with status("Checking lighter optimizers"):
        fits = [c for c in with_lighter_optimizers(args.model, result, profile) if c.fits]
    if not fits:
        return ""
    names = ",".join(c.recipe.optimizer.name for c in fits)
    best = fits[0]
    # The headroom, not the need: a need of "4.0 GiB" in a 4.0 GiB budget reads as not fitting after rounding.
    return (f", --allow-optimizer {names} (changes what is learned; {best.recipe.summary()} is predicted to leave "
            f"{headroom_text(best)} headroom)")


def _positive(flag: str, name: str, value: int) -> str | None:
    # The same words `tfmem estimate` uses for a bad --batch-size (estimate_memory's check).
    if value < 1:
        return f"`{name}` must be a positive whole number, got {value!r}."
    return None


def _output_problem(path: str | None) -> str | None:
    """Why `-o PATH` could not be written, checked before planning; None when it can."""
    if not path:
        return None
    target = Path(path)
    if target.is_dir():
        return f"--output {path!r} is a directory; give a file name, e.g. {str(target / 'planned.yaml')!r}."
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        return f"--output {path!r}: {str(parent)!r} {what}; choose a path in an existing directory."
    # Probe with a real file: permission bits say nothing for root, or for /proc-like file systems.
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".tfmem-probe-"):
            pass
    except OSError as e:
        return f"--output {path!r}: cannot write in {str(parent)!r} ({e.strerror or e}); choose a writable path."
    return None


def _print_measured(console: Console, measured, budget_bytes: int) -> None:
    from tfmem.profiler.units import format_bytes

    table = Table(title="Measured on this GPU, fastest first (re-ranked)")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("recipe")
    for col in ("micro", "step predicted", "step measured", "reserved predicted", "reserved measured", "fits"):
        table.add_column(col, justify="right", no_wrap=True)
    for i, m in enumerate(measured, 1):
        c = m.candidate
        table.add_row(str(i), c.recipe.summary(), str(c.estimate.micro_batch_size), _ms(c.step_seconds),
                      _ms(m.step_seconds) if m.error is None else m.error, format_bytes(c.estimate.reserved_bytes),
                      format_bytes(m.reserved_bytes), "yes" if m.fits else "no")
    console.print(table)
    console.print(f"Each trained a fresh model for a few real steps in its own process (the recipe's optimizer, "
                  f"gradients clipped at 1.0 as the Trainer does, synthetic batches padded as planned); fits: measured reserved + the CUDA context overhead within "
                  f"{format_bytes(budget_bytes)}.")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"


def _row(table: Table, rank: str, c: Candidate, cuda: bool, style: str | None = None) -> None:
    from tfmem.profiler.units import format_bytes

    table.add_row(rank, c.recipe.summary(), str(c.estimate.micro_batch_size), format_bytes(c.estimate.peak_bytes),
                  format_bytes(c.estimate.reserved_bytes), headroom_text(c), f"{c.relative_time:.2f}",
                  *((_ms(c.step_seconds),) if cuda else ()), style=style)
