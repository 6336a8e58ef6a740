"""`tfmem profile`: which recipe fits, and what it costs in speed, measured on a few training steps."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tfmem.cli.dataset import dataset_line, phase_notes
from tfmem.errors import RecipeError
from tfmem.profiler.report import headline, table_columns, table_rows, write_chart
from tfmem.profiler.sweep import BASELINE, SweepSpec, run_sweep
from tfmem.profiler.units import format_bytes, parse_bytes
from tfmem.recipe import Recipe
from tfmem.shipped import shipped_recipe_names
from tfmem.zoo import DEFAULT_MODEL, known_model_names, resolve

DEFAULT_OUTPUT = "tfmem-results"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "profile",
        help="measure peak memory and speed of a few training steps under each recipe",
        description=(
            "Train a few steps of a model under each recipe (and a baseline) and measure peak memory, "
            "samples/s and tokens/s. With no arguments: the built-in tiny BERT, every shipped recipe, "
            "synthetic batches, on this machine's GPU or CPU."
        ),
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a local Hugging Face model directory or a known architecture ({', '.join(known_model_names())}); "
                        f"default {DEFAULT_MODEL}. Without local weights it is built from its configuration with random weights.")
    p.add_argument("--recipe", nargs="+", metavar="RECIPE",
                   help="shipped recipe names or YAML files (default: every shipped recipe); a baseline row "
                        "without techniques is always added first, unless --no-baseline")
    p.add_argument("--batch-size", type=int, default=16,
                   help="effective batch per optimizer step, the same for every recipe (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample at most (default 128)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per recipe (default 3)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--memory-steps", type=int, default=2,
                   help="steps in the memory window; on CPU they run apart from the timed ones (default 2: the "
                        "second step is the first with the optimizer state already allocated)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when present, else CPU)")
    p.add_argument("--dataset", help="a local .csv/.json/.jsonl/.parquet file with text and label columns, "
                                     "tokenized with the model's tokenizer (default: synthetic batches)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="a memory limit such as 200MiB or 6GiB: recipes above it are reported as oom "
                        "(CPU: a limit on live tensor bytes; CUDA: the process's share of the GPU)")
    p.add_argument("--output", default=DEFAULT_OUTPUT,
                   help=f"folder for results.json, results.csv and results.png (default ./{DEFAULT_OUTPUT})")
    p.add_argument("--threads", type=int, default=0,
                   help="PyTorch CPU threads for a CPU run (default 0: PyTorch's default, one per core). On a machine "
                        "busy with other work, 1 gives steadier timings (OpenMP threads otherwise wait on each other); "
                        "peak memory does not depend on it")
    p.add_argument("--no-baseline", action="store_true", help="do not add the baseline (no techniques) row")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    if not console.is_terminal:  # piped or captured: no width to fit, so do not wrap the table at 80
        console = Console(width=160)
    try:
        spec = _spec(args)
        config, source = resolve(spec.model)
        spec.check_model(config, source.name)
        _check_output(args.output)
        dataset = dataset_line(spec)
    except RecipeError:
        raise  # the entry point prints it
    except ValueError as e:  # bad arguments: one line saying what to fix
        print(f"tfmem profile: error: {e}", file=sys.stderr)
        return 2

    device = spec.torch_device
    threads = torch.get_num_threads()
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    console.print(f"Model: {source.describe()}")
    console.print(
        f"Device: {device}; effective batch {spec.batch_size}, sequence length {spec.seq_len}, "
        f"{'dataset ' + spec.dataset if spec.dataset else 'synthetic batches'}; "
        f"{spec.memory_steps} memory step(s), {spec.warmup_steps} warm-up, {spec.steps} timed step(s) per recipe"
        + (f"; {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else "")
        + (f"; memory limit {format_bytes(spec.max_memory_bytes)}" if spec.max_memory_bytes else "")
    )
    if dataset:
        console.print(dataset)
    started = time.perf_counter()
    try:
        rows = _sweep_with_progress(spec, args.output)
    except RecipeError:
        raise
    except ValueError as e:  # the model or dataset cannot be used: found before anything ran
        print(f"tfmem profile: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)

    table = Table(title=f"tfmem profile: {source.name} on {device}, effective batch {spec.batch_size}")
    for name in table_columns(rows):
        table.add_column(name, justify="left" if name in ("recipe", "status", "note") else "right", overflow="fold")
    for cells in table_rows(rows):
        table.add_row(*cells, style=None if cells[1] == "ok" else "red")
    console.print(table)
    if device.type == "cpu":
        console.print("Peak memory on CPU: the exact peak of live tensor bytes (parameters included); "
                      "peak_rss_bytes in results.json is the process's resident memory.")
    else:
        console.print("Peak memory: PyTorch's peak allocated bytes; peak reserved is what the caching allocator "
                      "held from the GPU, the figure that must fit in its memory.")
    output = Path(args.output)
    chart = write_chart(rows, output / "results.png", title=f"{source.name} on {device}, batch {spec.batch_size}")
    files = ", ".join(str(p) for p in (output / "results.json", output / "results.csv", chart) if p is not None)
    console.print(f"Wrote {files} ({time.perf_counter() - started:.0f} s)")
    for line in phase_notes(rows):
        console.print(line)
    if line := headline(rows):
        console.print(line, style="bold")
    elif not args.no_baseline:
        console.print(_no_headline_reason(rows))
    return 0


def _no_headline_reason(rows: list[dict]) -> str:
    """Why there is no headline ratio, by what the rows say (a baseline row is present)."""
    base = next((r for r in rows if r["recipe"] == BASELINE.name), None)
    if base is None or base["status"] != "ok":
        return "No ratios: the baseline row did not run (see its status); compare the peaks directly."
    others = [r for r in rows if r is not base]
    if not any(r["status"] == "ok" for r in others):
        return "No ratios: no recipe other than the baseline ran (see their status and notes)."
    return "No ratios: the rows that ran have no peak-memory figures (use --memory-steps 1 or more)."


def _check_output(output: str) -> None:
    """Refuse an --output folder that cannot be created or written, before any recipe trains."""
    folder = Path(output)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".tfmem-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"--output {output!r} cannot be written ({e.strerror or e}); give a folder you can create and write to."
        ) from None


def _sweep_with_progress(spec: SweepSpec, output: str) -> list[dict]:
    recipes = spec.all_recipes()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    ) as progress:
        task = progress.add_task("profiling", total=len(recipes) * spec.total_steps())

        def on_event(kind: str, info: dict) -> None:
            if kind == "start":
                progress.update(task, description=f"{info['recipe']} ({info['index'] + 1}/{info['total']})",
                                completed=info["index"] * info["steps"])
            elif kind == "step":
                progress.advance(task)

        return run_sweep(spec, output_dir=output, on_event=on_event)


def _spec(args: argparse.Namespace) -> SweepSpec:
    if args.threads < 0:
        raise ValueError(f"--threads must be 0 (PyTorch's default) or a number of threads, got {args.threads}.")
    names = args.recipe or shipped_recipe_names()
    # "baseline" names the reference row the sweep adds anyway; listing it just keeps it.
    recipes = tuple(Recipe.load(n) for n in names if n != BASELINE.name)
    max_memory = parse_bytes(args.max_memory, field="--max-memory") if args.max_memory else None
    return SweepSpec(
        model=args.model,
        recipes=recipes,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        memory_steps=args.memory_steps,
        device=args.device,
        dataset=args.dataset,
        max_memory_bytes=max_memory,
        include_baseline=not args.no_baseline,
    )
