"""`tfmem estimate --gpus N --strategy S` and `tfmem plan --gpus N`: one GPU's share of a sharded run.

Kept apart from estimate.py and plan.py, which only add the flags and call in here.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from tfmem.estimate.device import DeviceProfile

# The estimator (torch, transformers) is imported when a command runs, not for `--help` (see cli/estimate.py).
# Kept equal to tfmem.estimate.sharding.STRATEGIES (a test checks it).
STRATEGIES = ("ddp", "fsdp", "fsdp-grad-op")

WHAT = {
    "ddp": "every GPU holds the whole model, gradients and optimizer state, plus DDP's gradient buckets",
    "fsdp": "parameters, gradients and optimizer state sharded; each layer gathered for its forward and again for its backward",
    "fsdp-grad-op": "sharded like fsdp, but each layer stays gathered from its forward to its backward (less traffic, more memory)",
}


def add_estimate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="spread training over N GPUs and predict one GPU's peak (--batch-size is the global batch)")
    p.add_argument("--strategy", choices=STRATEGIES, default="fsdp",
                   help="with --gpus N > 1: ddp, fsdp (FULL_SHARD, default) or fsdp-grad-op (SHARD_GRAD_OP)")


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="plan for N GPUs: choose the strategy (ddp, fsdp, fsdp-grad-op) with the recipe; "
                        "--budget is per GPU and --batch-size the global batch")


def sharded_conflict(args: argparse.Namespace) -> str | None:
    """An option a sharded run (`--gpus N`) would silently ignore, or a batch it cannot split, as an error
    message; None when there is none. Call it only for a sharded run."""
    gpus = args.gpus
    if gpus >= 1 and args.batch_size % gpus:
        # Checked here, not left to the estimator's RecipeError: it is the batch, not a recipe, that is wrong.
        return (f"--batch-size {args.batch_size} does not divide by --gpus {gpus}: each GPU runs batch / gpus "
                f"samples; give a --batch-size that is a multiple of {gpus}.")
    # (attribute, flag, its default): the sharded planner lists one row per (strategy, combination) whatever
    # --keep says, does not measure, and estimates padded batches. (--allow-freeze and --allow-optimizer are
    # searched: see plan_sharded.)
    for name, flag, default in (("no_padding", "--no-padding", False), ("keep", "--keep", 1),
                                ("measure", "--measure", None)):
        value = getattr(args, name, default)
        if value != default:
            return (f"{flag} is not supported with --gpus {gpus} yet (the sharded estimate and plan would ignore "
                    f"it); drop {flag}, or plan for one GPU without --gpus.")
    return None


def run_estimate(args: argparse.Namespace, profile: DeviceProfile) -> int:
    from tfmem.cli.progress import status
    from tfmem.estimate.sharding import estimate_sharded
    from tfmem.profiler.units import format_bytes

    with status(f"Estimating for {args.gpus} GPUs"):
        est = estimate_sharded(args.model, args.recipe, args.batch_size, args.seq_len, args.gpus, args.strategy, profile)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    console = Console()
    console.print(f"[bold]{est.model}[/], recipe [bold]{est.recipe}[/], global batch {est.batch_size} over {est.gpus} GPUs "
                  f"({est.per_rank_batch_size} per GPU, micro-batch {est.micro_batch_size}) x seq {est.seq_len}, "
                  f"[bold]{est.strategy}[/], on {est.device}")
    table = Table(title="One GPU's peak", show_header=True)
    table.add_column("")
    table.add_column("bytes", justify="right")
    for label, value in (("parameters (shards + gathered layers)", est.parameters_bytes),
                         ("gradients", est.gradients_bytes), ("optimizer state", est.optimizer_state_bytes),
                         ("activations + communication buffers", est.activations_bytes),
                         ("  of which DDP buckets", est.communication_bytes),
                         ("cuBLAS workspaces", est.library_workspace_bytes)):
        if value or not label.startswith(("  of", "cuBLAS")):
            table.add_row(label, format_bytes(value))
    table.add_row("[bold]peak allocated per GPU[/]", f"[bold]{format_bytes(est.peak_bytes)}[/]")
    if est.reserved_bytes is not None:
        table.add_row("[bold]reserved per GPU[/] (the allocator's cache included)", f"[bold]{format_bytes(est.reserved_bytes)}[/]")
    console.print(table)
    console.print(f"{est.strategy}: {WHAT[est.strategy]}. {est.method}; {est.seconds:.1f} s.")
    return 0


def run_plan(args: argparse.Namespace, profile: DeviceProfile, budget: int, overhead: int) -> int:
    from tfmem.cli.progress import search_callback, status
    from tfmem.estimate.sharding import plan_sharded
    from tfmem.profiler.units import format_bytes

    with status(f"Planning for {args.gpus} GPUs") as update:
        result = plan_sharded(args.model, args.batch_size, args.seq_len, budget, args.gpus, profile, overhead_bytes=overhead,
                              allow_freeze=args.allow_freeze, allow_optimizer=_allowed_optimizers(args),
                              progress=search_callback(update))
    if args.output and result.chosen:
        result.chosen.recipe.to_yaml(args.output)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0 if result.chosen else 1
    console = Console()
    console.print(f"[bold]{result.model}[/], global batch {result.batch_size} x seq {result.seq_len} over {result.gpus} GPUs, "
                  f"budget {format_bytes(result.budget_bytes)} per GPU on {result.device}")
    cuda = profile.type == "cuda"  # there a rank's reserved bytes are what must fit, as on one GPU
    table = Table(title="Strategy and recipe that fit, fastest first" if result.fitting else "Nothing fits")
    # On CUDA the column is what must fit, the reserved bytes (the Chosen line and --json give the peak too): a
    # column more would leave the recipe no room in 80 columns.
    for col in ("#", "strategy", "recipe", "micro", "reserved" if cuda else "peak / GPU", "headroom", "time"):
        table.add_column(col, justify="left" if col in ("strategy", "recipe") else "right", no_wrap=col != "recipe")
    from tfmem.cli.plan import headroom_text

    for i, c in enumerate(result.fitting, 1):
        mark = "~" if c.extrapolated else ""
        table.add_row(str(i), c.strategy, c.recipe.summary(), str(c.estimate.micro_batch_size),
                      mark + format_bytes(c.estimate.reserved_bytes if cuda else c.estimate.peak_bytes),
                      mark + headroom_text(c), f"{c.relative_time:.2f}")
    console.print(table)
    if any(c.extrapolated for c in result.fitting):
        console.print("~: extrapolated from 2- and 3-layer copies of the model (and one with a frozen layer more "
                      "when freezing; a few seconds each); the chosen row is estimated at full depth.")
    for note in _learning_notes(args):
        console.print(note)
    if cuda:
        console.print("reserved: predicted peak per GPU with the caching allocator's cache; headroom: budget - reserved "
                      "- overhead (the CUDA context), as for one GPU.")
    if result.chosen is None:
        c = result.closest
        console.print(f"[bold red]Nothing fits in {format_bytes(result.budget_bytes)} per GPU on {result.gpus} GPUs.[/]"
                      + (f" Closest: {c.strategy}, {c.recipe.summary()}, needs {format_bytes(c.needed_bytes)}." if c else "")
                      + " Try a shorter --seq-len, a smaller --batch-size"
                      + ("" if args.allow_freeze else ", --allow-freeze N")
                      + ", or more GPUs.")
        # No --allow-optimizer hint (the single-GPU planner has one): lighter optimizers run under DDP only,
        # where a rank keeps the whole model, gradients and buckets, more than FSDP's AdamW shards already tried.
        return 1
    c = result.chosen
    reserved = f" ({format_bytes(c.estimate.reserved_bytes)} reserved)" if c.estimate.reserved_bytes is not None else ""
    console.print(f"Chosen: [bold]{c.strategy}[/] with [bold]{c.recipe.summary()}[/], micro-batch "
                  f"{c.estimate.micro_batch_size} per GPU: predicted peak {format_bytes(c.estimate.peak_bytes)} per GPU"
                  f"{reserved}, headroom {headroom_text(c)}. {c.strategy}: {WHAT[c.strategy]}.")
    console.print(_launch_hint(c.strategy, result.gpus))
    if args.output:
        console.print(f"Wrote {args.output}; load it with Recipe.from_yaml({args.output!r}).")
    console.print(f"Planned in {result.seconds:.1f} s. time: per sample relative to fp32 without techniques on one GPU; "
                  "fsdp x1.1 and fsdp-grad-op x1.05 over ddp for communication (documented defaults, not measured).")
    return 0


def _allowed_optimizers(args: argparse.Namespace) -> list[str]:
    return [n.strip() for n in getattr(args, "allow_optimizer", "").split(",") if n.strip()]


def _learning_notes(args: argparse.Namespace) -> list[str]:
    """What --allow-freeze / --allow-optimizer mean on N GPUs, printed when they are given."""
    notes = []
    if args.allow_freeze:
        notes.append(f"--allow-freeze {args.allow_freeze} (changes what is learned): tried under every strategy, ranked "
                     "after the recipes that freeze nothing; FSDP2 shards per parameter, so frozen and trainable "
                     "parameters may share a unit (frozen: gathered for compute, no gradient, no optimizer state).")
    if [n for n in _allowed_optimizers(args) if n != "adamw"]:
        notes.append("--allow-optimizer (changes what is learned): tried under ddp only, ranked after AdamW; under "
                     "FSDP these optimizers fail at their first step on sharded (DTensor) parameters.")
    return notes


def suggest_gpus(console: Console, args: argparse.Namespace, profile: DeviceProfile, budget: int, overhead: int) -> None:
    """After a single-GPU plan found nothing: say how many GPUs (sharded with FSDP) would fit."""
    from tfmem.cli.progress import search_callback, status
    from tfmem.estimate.sharding import gpus_needed
    from tfmem.profiler.units import format_bytes

    with status("Checking whether more GPUs would fit") as update:
        result = gpus_needed(args.model, args.batch_size, args.seq_len, budget, profile, overhead_bytes=overhead,
                             progress=search_callback(update))
    unit = "GPUs" if profile.type == "cuda" else "processes"  # a CPU run is sharded over processes
    if result is None or result.chosen is None:
        console.print(f"Sharding does not rescue it either: no recipe fits under FSDP on 2, 4 or 8 {unit} of this size.")
        return
    c = result.chosen
    console.print(f"[bold]More {unit} would:[/] on {result.gpus} {unit} of this size, [bold]{c.strategy}[/] with "
                  f"{c.recipe.summary()} needs {format_bytes(c.needed_bytes)} per "
                  f"{unit[:-1] if unit == 'GPUs' else 'process'} (see `tfmem plan --gpus {result.gpus}`).")


def _launch_hint(strategy: str, gpus: int) -> str:
    if strategy == "ddp":
        return f"Launch: accelerate launch --num_processes {gpus} train.py (DDP)."
    reshard = "true" if strategy == "fsdp" else "false"
    return (f"Launch: accelerate launch --num_processes {gpus} --use_fsdp --fsdp_version 2 "
            f"--fsdp_reshard_after_forward {reshard} train.py, or Trainer(fsdp=True, fsdp_config={{'version': 2, "
            f"'reshard_after_forward': {reshard.capitalize()}}}) with recipe.apply(trainer).")
