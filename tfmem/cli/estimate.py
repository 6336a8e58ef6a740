"""`tfmem estimate`: predict the peak memory of a training step before training.

The estimator (torch, transformers) is imported in `run`, not with this module: `tfmem estimate --help`
builds this parser and needs only the GPU table (tfmem/estimate/device.py, no torch).
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from tfmem.cli import sharding
from tfmem.cli.dataset import add_dataset_argument, dataset_conflict, estimate_with_dataset, phase_sentence
from tfmem.estimate.device import GPUS, device_profile
from tfmem.zoo import DEFAULT_MODEL


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """--device / --gpu / --gpu-capability / --attention, shared with `tfmem plan`."""
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="the device training will run on (default cuda)")
    p.add_argument("--gpu", help=f"a GPU by name, for its memory and compute capability: {', '.join(GPUS)}")
    p.add_argument("--gpu-capability", metavar="X.Y", help="CUDA compute capability from 3.0 to 12.x, e.g. 7.5 (T4), "
                                                            "8.0 (A100) or 9.0 (H100)")
    p.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                   help="attention implementation when the model's config names none (default sdpa); a config "
                        "with attn_implementation set keeps its own")


def add_padding_argument(p: argparse.ArgumentParser) -> None:
    """--no-padding for `tfmem plan`, worded as `tfmem estimate`'s (tests/test_plan.py checks they match)."""
    p.add_argument("--no-padding", action="store_true",
                   help="every sample fills --seq-len (packed or truncated text): the attention mask is all ones, "
                        "transformers drops it, and 16-bit attention runs the flash kernel. Default: batches "
                        "padded to --seq-len, as tfmem profile's are")


def profile_from_args(args: argparse.Namespace):
    """The target device of `tfmem estimate` / `tfmem plan`.

    Raises:
        ValueError: `--device cpu` together with `--gpu` or `--gpu-capability` (which describe a GPU).
    """
    if args.device == "cpu" and (args.gpu or args.gpu_capability):
        given = (("--gpu", args.gpu), ("--gpu-capability", args.gpu_capability))
        gpu_flags = " and ".join(f"{flag} {value}" for flag, value in given if value)
        raise ValueError(f"--device cpu cannot be combined with {gpu_flags}; drop {gpu_flags} to target "
                         "the CPU, or drop --device cpu to target the GPU.")
    return device_profile("cuda" if args.gpu else args.device, gpu=args.gpu, capability=args.gpu_capability,
                          attention=args.attention)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("estimate", help="predict the peak memory of a training step, without a GPU",
                              description="Predict the peak memory of one training step of a model under a recipe by "
                                          "running it on fake tensors; nothing is allocated.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a known architecture name or a model directory (default {DEFAULT_MODEL})")
    p.add_argument("--recipe", default="baseline", help="a shipped recipe name, a recipe YAML, or 'baseline' (default)")
    p.add_argument("--batch-size", type=int, required=True, help="effective batch size (split by the recipe's accumulation)")
    p.add_argument("--seq-len", type=int, help="tokens per sample (required without --dataset; with it, where rows are truncated)")
    add_dataset_argument(p)
    add_device_arguments(p)
    add_padding_argument(p)
    sharding.add_estimate_arguments(p)
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tfmem.estimate.estimator import estimate_memory
    from tfmem.profiler.units import format_bytes

    if problem := dataset_conflict(args) or (sharding.sharded_conflict(args) if getattr(args, "gpus", 1) != 1 else None):
        print(f"tfmem estimate: error: {problem}", file=sys.stderr)
        return 2
    if args.dataset:
        return estimate_with_dataset(args)
    if args.seq_len is None:
        print("tfmem estimate: error: --seq-len is required (or --dataset FILE to estimate for a dataset's lengths).", file=sys.stderr)
        return 2
    try:
        profile = profile_from_args(args)
        if getattr(args, "gpus", 1) != 1:
            return sharding.run_estimate(args, profile)
        from tfmem.cli.progress import status

        with status("Estimating"):
            est = estimate_memory(args.model, args.recipe, args.batch_size, args.seq_len, profile,
                                  padded=not args.no_padding)
    except ValueError as e:  # bad sizes, model or device names, or a RecipeError: one line, exit 2
        print(f"tfmem estimate: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    console = Console()
    console.print(f"[bold]{est.model}[/], recipe [bold]{est.recipe}[/], batch {est.batch_size} "
                  f"(micro-batch {est.micro_batch_size}) x seq {est.seq_len} on {est.device}")
    table = Table(show_header=True)
    table.add_column("")
    table.add_column("bytes", justify="right")
    for label, value in (("parameters", est.parameters_bytes), ("gradients", est.gradients_bytes),
                         ("optimizer state", est.optimizer_state_bytes), ("activations", est.activations_bytes),
                         ("cuBLAS workspaces", est.library_workspace_bytes)):
        if value or label != "cuBLAS workspaces":  # none on a CPU
            table.add_row(label, format_bytes(value))
    table.add_row("[bold]peak allocated[/]", f"[bold]{format_bytes(est.peak_bytes)}[/]")
    if est.reserved_bytes is not None:
        table.add_row("peak reserved (allocator cache)", format_bytes(est.reserved_bytes))
    console.print(table)
    top = sorted(est.per_module.items(), key=lambda kv: -kv[1])[:5]
    console.print("Activations kept per module (largest): " + ", ".join(f"{n} {format_bytes(v)}" for n, v in top))
    console.print(f"Peak during {est.peak_phase}; {est.method}; {est.seconds:.1f} s. "
                  + ("Add the CUDA context (~0.3-0.5 GiB) for what nvidia-smi shows." if est.reserved_bytes is not None else ""))
    console.print(phase_sentence(est.peak_phase))
    return 0
