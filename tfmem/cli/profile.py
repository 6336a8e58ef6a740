"""`tfmem profile`: which recipe fits, and what it costs in speed, measured on a few training steps.

torch, transformers and the profiler are imported inside the functions that run the profile, not
with this module: `tfmem profile --help` builds this parser and should answer at once (the model
names it lists come from tfmem.zoo, which imports transformers only to build a model).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from tfmem.cli.dataset import dataset_line, phase_notes
from tfmem.cli.profile_table import no_headline_reason, results_table
from tfmem.errors import RecipeError
from tfmem.zoo import DEFAULT_MODEL, _packaged_minilm, known_model_names, resolve

if TYPE_CHECKING:
    from tfmem.profiler.sweep import SweepSpec

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
                   help=f"a local Hugging Face model directory or a known architecture ({', '.join(_model_names())}); "
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
                   help="PyTorch CPU threads for a CPU run (default 0: auto, the cores left idle by other work, by the "
                        "1-minute load average, at least 1: on a busy machine extra threads wait on each other and the "
                        "speed column stops meaning anything); peak memory does not depend on it")
    p.add_argument("--no-baseline", action="store_true", help="do not add the baseline (no techniques) row")
    p.set_defaults(run=run)


def _model_names() -> list[str]:
    """Model names for --help: the known architectures, and the packaged MiniLM when it is installed."""
    names = known_model_names()
    return names + ["all-MiniLM-L6-v2"] if _packaged_minilm() is not None else names


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

    from tfmem.profiler.output_lock import OutputLocked, output_lock

    device = spec.torch_device
    try:
        with output_lock(args.output):
            return _run(args, spec, config, source, device, console, dataset)
    except OutputLocked as e:
        print(f"tfmem profile: error: {e}", file=sys.stderr)
        return 2


def _run(args, spec: SweepSpec, config, source, device, console: Console, dataset: str | None) -> int:
    from tfmem.profiler.report import headline, write_chart
    from tfmem.profiler.sweep import trainer_defaults
    from tfmem.profiler.units import format_bytes

    console.print(f"Model: {source.describe()}")
    if note := _new_weights_note(source, config, spec.num_labels):
        console.print(note)
    data = f"dataset {spec.dataset} (dynamic padding, at most {spec.seq_len} tokens)" if spec.dataset else \
        f"sequence length {spec.seq_len}, synthetic batches"
    console.print(
        f"Device: {device}; effective batch {spec.batch_size}, {data}; "
        f"{spec.memory_steps} memory step(s), {spec.warmup_steps} warm-up, {spec.steps} timed step(s) per recipe"
        + (f"; memory limit {format_bytes(spec.max_memory_bytes)}" if spec.max_memory_bytes else "")
    )
    if dataset:
        console.print(dataset)
    if device.type == "cpu":
        console.print(f"CPU threads: {spec.threads} ({args.threads_reason})")
        cores, load = _cores_and_load()
        if load >= cores:
            console.print(f"This machine is busy (load average {load:.1f} on {cores} cores): samples/s are lower and "
                          "vary from run to run; the ratios between rows hold better than the absolute figures.")
    console.print(f"Training loop: each recipe in a fresh process; {trainer_defaults().describe()}")
    started = time.perf_counter()
    try:
        rows = _sweep_with_progress(spec, args.output, console)
    except RecipeError:
        raise
    except ValueError as e:  # the model or dataset cannot be used: found before anything ran
        print(f"tfmem profile: error: {e}", file=sys.stderr)
        return 2

    title = f"tfmem profile: {source.name} on {device}, effective batch {spec.batch_size}"
    table, below = results_table(rows, title, console.width)
    console.print(table)
    for line in below:
        console.print(line)
    if device.type == "cpu":
        console.print("Peak memory on CPU: the exact peak of live tensor bytes (parameters included); "
                      "peak_rss_bytes in results.json is the process's resident memory.")
    else:
        console.print("Peak memory: PyTorch's peak allocated bytes; peak reserved is what the caching allocator "
                      "held from the GPU, the figure that must fit in its memory.")
    output = Path(args.output)
    data_title = f"dataset {Path(spec.dataset).name}" if spec.dataset else f"synthetic, {spec.seq_len} tokens"
    chart = write_chart(rows, output / "results.png",
                        title=f"{source.name} on {device}, batch {spec.batch_size}, {data_title}")
    files = ", ".join(str(p) for p in (output / "results.json", output / "results.csv", chart) if p is not None)
    console.print(f"Wrote {files} ({time.perf_counter() - started:.0f} s)")
    for line in phase_notes(rows):
        console.print(line)
    if line := headline(rows):
        console.print(line, style="bold")
    elif not args.no_baseline:
        console.print(no_headline_reason(rows))
    return 0


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


def _sweep_with_progress(spec: SweepSpec, output: str, console: Console) -> list[dict]:
    """Run the sweep with a progress bar on a terminal, or one line per recipe when stdout is a log."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tfmem.profiler.sweep import run_sweep
    from tfmem.profiler.units import format_bytes

    recipes = spec.all_recipes()
    if not console.is_terminal:
        started = time.perf_counter()

        def log_line(kind: str, info: dict) -> None:
            if kind == "row":
                figures = ", ".join(x for x in (
                    f"peak {format_bytes(info['peak_allocated_bytes'])}" if info.get("peak_allocated_bytes") else "",
                    f"{info['samples_per_second']:,.1f} samples/s" if info.get("samples_per_second") else "",
                ) if x)
                print(f"[{info['index'] + 1}/{info['total']}] {info['recipe']}: {info['status']}"
                      + (f", {figures}" if figures else "") + f" ({time.perf_counter() - started:.0f} s)", flush=True)

        return run_sweep(spec, output_dir=output, on_event=log_line)
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


def auto_threads(cores: int | None = None, load: float | None = None) -> tuple[int, str]:
    """CPU threads for the rows, and why: the cores the 1-minute load average leaves idle, at least 1.

    On a busy machine OpenMP threads wait on each other (a 2-core machine with other work measured
    `low-memory` 11.5x slower than the baseline with 2 threads, 1.4x with 1), so the speed column would
    measure the contention rather than the recipe.

    Example:
        >>> auto_threads(cores=2, load=2.7)
        (1, 'auto: load average 2.7 on 2 cores; --threads N to choose')
        >>> auto_threads(cores=8, load=0.2)[0]
        8
    """
    if cores is None or load is None:
        measured_cores, measured_load = _cores_and_load()
        cores = measured_cores if cores is None else cores
        load = measured_load if load is None else load
    threads = max(1, min(cores, math.floor(cores - load + 0.5)))
    return threads, f"auto: load average {load:.1f} on {cores} cores; --threads N to choose"


def _cores_and_load() -> tuple[int, float]:
    """The cores this process may use and the 1-minute load average (0 where the system has none)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average on this system: assume idle
        load = 0.0
    return cores, load


def _new_weights_note(source, config, num_labels: int | None) -> str:
    """Once, in tfmem's words, which weights the local checkpoint lacks (transformers' LOAD REPORT, which
    each row's process keeps quiet): usually just the new classification head, as in any fine-tuning."""
    if source.path is None or source.random_weights:
        return ""
    try:
        from safetensors import safe_open

        files = sorted(Path(source.path).glob("*.safetensors"))
        if not files:
            return ""
        stored: set[str] = set()
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                stored.update(f.keys())
        import torch
        from transformers import AutoModelForSequenceClassification

        if num_labels is not None:
            config.num_labels = num_labels
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
        prefix = f"{model.base_model_prefix}."
        have = {k.removeprefix(prefix) for k in stored}
        missing = [k for k in model.state_dict() if k.removeprefix(prefix) not in have]
    except Exception:  # noqa: BLE001 - a note only: never stop the profile for it
        return ""
    if not missing:
        return ""
    heads = sorted({k.rsplit(".", 1)[0] for k in missing})
    what = "classifier head" if all(h.startswith("classifier") for h in heads) else ", ".join(heads)
    return (f"Newly initialised (not in the checkpoint): the {what} ({len(missing)} tensors), as in any "
            "fine-tuning; every row starts from the same initialisation.")


def _spec(args: argparse.Namespace) -> SweepSpec:
    from tfmem.profiler.sweep import BASELINE, SweepSpec
    from tfmem.profiler.units import parse_bytes
    from tfmem.recipe import Recipe
    from tfmem.shipped import shipped_recipe_names

    if args.threads < 0:
        raise ValueError(f"--threads must be 0 (auto) or a number of threads, got {args.threads}.")
    if args.threads > 0:
        threads, args.threads_reason = args.threads, "--threads"
    else:
        threads, args.threads_reason = auto_threads()
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
        threads=threads,
    )
