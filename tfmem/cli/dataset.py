"""The CLI's dataset and peak-phase lines, shared by `tfmem profile`, `tfmem estimate` and `tfmem plan`.

- `tfmem profile --dataset`: the file's statistics in the header (`dataset_line`), and under the table
  which phase set each row's peak and what that means (`phase_notes`).
- `tfmem estimate --dataset` / `tfmem plan --dataset`: estimate for the longest padded batch the file
  will give (tfmem/estimate/for_dataset.py), say what was assumed, the padding waste, and what
  truncating at the p99 length would change.

The profiler and the estimator (torch) are imported inside the functions: `add_dataset_argument` is
part of `tfmem estimate --help` and `tfmem plan --help`, which should answer without them.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console


def add_dataset_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", metavar="FILE",
                   help="a local .csv/.json/.jsonl/.parquet file with a text column: tokenize it with the model's "
                        "tokenizer and estimate for the longest padded batch training on it will meet (--seq-len, "
                        "if given, is where rows are truncated; default the model's limit)")


def dataset_line(spec) -> str | None:
    """The profile header's dataset line: the file's statistics (None without --dataset).

    Raises:
        ValueError, FileNotFoundError: the file or the model's tokenizer cannot be used.
    """
    if not spec.dataset:
        return None
    from tfmem.data import model_dataset_stats

    stats, _ = model_dataset_stats(spec.dataset, spec.model, spec.seq_len)
    return f"Dataset {spec.dataset}: {stats.describe()} (dynamic padding: each micro-batch padded to its longest row)"


def dataset_conflict(args: argparse.Namespace) -> str | None:
    """An option that `--dataset` would silently ignore, as an error message; None when there is none."""
    if not getattr(args, "dataset", None):
        return None
    if getattr(args, "no_padding", False):
        return ("--no-padding does not apply with --dataset: dataset batches are padded to their longest row "
                "(dynamic padding); drop --no-padding, or use --seq-len without --dataset for packed text.")
    if (getattr(args, "gpus", None) or 1) > 1:
        return ("--gpus with --dataset is not supported yet: plan or estimate per GPU with --seq-len set to the "
                "dataset's longest row (tfmem estimate --dataset prints it), or drop --dataset.")
    return None


def phase_sentence(phase: str | None, activation_share: float | None = None) -> str:
    """'Peak in the optimizer step: ...' for a step phase or an estimator window name."""
    from tfmem.profiler.phases import PHASE_WORDS, explain, step_phase

    coarse = step_phase(phase) if phase else None
    if coarse is None:
        return "The phase of the peak is unknown."
    text = explain(coarse, activation_share)
    return f"Peak in the {PHASE_WORDS[coarse]}" + text[text.index(":"):] + "."


def phase_notes(rows: list[dict]) -> list[str]:
    """Under the profile table: for each phase that set some row's peak, which rows and what it means."""
    from tfmem.profiler.phases import STATES_DOMINATE_BELOW

    by_phase: dict[tuple[str, float | None], list[str]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("peak_phase"):
            share = _activation_share(r)
            # Rows whose peak the model states set share one sentence, whatever their exact share.
            key = (r["peak_phase"], share if share is not None and share < STATES_DOMINATE_BELOW else None)
            by_phase.setdefault(key, []).append(r["recipe"])
    lines = []
    for (phase, share), names in by_phase.items():
        if share is not None:  # the largest share among the rows grouped here
            share = max(_activation_share(r) or 0.0 for r in rows if r.get("recipe") in names)
        sentence = phase_sentence(phase, share)
        who = "every row" if len(names) == len(rows) else ", ".join(names)
        lines.append(f"{who}: {sentence[0].lower()}{sentence[1:]}")
    return lines


def _activation_share(row: dict) -> float | None:
    peak, activations = row.get("peak_allocated_bytes"), row.get("peak_activations_bytes")
    if not peak or activations is None:
        return None
    return activations / peak


def estimate_with_dataset(args: argparse.Namespace) -> int:
    """`tfmem estimate --dataset FILE`."""
    from tfmem.cli.estimate import profile_from_args
    from tfmem.estimate.for_dataset import estimate_for_dataset
    from tfmem.profiler.units import format_bytes

    try:
        profile = profile_from_args(args)
        from tfmem.cli.progress import status

        with status("Estimating"):
            result = estimate_for_dataset(args.model, args.recipe, args.batch_size, args.dataset, profile,
                                          truncate_at=args.seq_len)
    except ValueError as e:
        print(f"tfmem estimate: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    console = Console()
    est, shape = result.estimate, result.shape
    console.print(f"[bold]{est.model}[/], recipe [bold]{est.recipe}[/], batch {est.batch_size} "
                  f"(micro-batch {est.micro_batch_size}) on {est.device}")
    console.print(f"Dataset {args.dataset}: {shape.stats.describe()}")
    console.print(f"Assumed {shape.assumption()}.")
    console.print(f"Predicted peak: [bold]{format_bytes(est.peak_bytes)}[/] allocated"
                  + (f", {format_bytes(est.reserved_bytes)} reserved" if est.reserved_bytes is not None else "")
                  + f" (parameters {format_bytes(est.parameters_bytes)}, gradients {format_bytes(est.gradients_bytes)}, "
                    f"optimizer state {format_bytes(est.optimizer_state_bytes)}, activations {format_bytes(est.activations_bytes)}).")
    if result.budget_bytes is not None:
        fits = result.fits(est)
        console.print(f"{'Fits' if fits else 'Does not fit'} in {format_bytes(result.budget_bytes)}: needs "
                      f"{format_bytes(result.needed_bytes(est))}"
                      + (f" with {format_bytes(result.overhead_bytes)} for the CUDA context." if result.overhead_bytes else "."))
    console.print(phase_sentence(est.peak_phase))
    if note := result.p99_note():
        console.print(note)
    return 0


def plan_with_dataset(args: argparse.Namespace, budget: int, overhead: int | None, profile) -> int:
    """`tfmem plan --dataset FILE`: the plan for the longest padded batch; returns 1 when nothing fits."""
    from tfmem.cli.progress import search_callback, status
    from tfmem.estimate.for_dataset import plan_for_dataset
    from tfmem.profiler.units import format_bytes

    # Two searches when the p99 length is shorter than the longest row: the count starts again for the second.
    with status("Planning") as update:
        result = plan_for_dataset(args.model, args.batch_size, args.dataset, budget, profile, truncate_at=args.seq_len,
                                  allow_freeze=args.allow_freeze, overhead_bytes=overhead,
                                  progress=search_callback(update))
    chosen = result.plan.chosen
    if args.output and chosen:
        chosen.recipe.to_yaml(args.output)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0 if chosen else 1
    console = Console()
    shape = result.shape
    console.print(f"[bold]{result.plan.model}[/], batch {args.batch_size}, budget {format_bytes(budget)} on {result.plan.device}")
    console.print(f"Dataset {args.dataset}: {shape.stats.describe()}")
    console.print(f"Assumed {shape.assumption()}.")
    if chosen is None:
        c = result.plan.closest
        console.print(f"[bold red]Nothing fits in {format_bytes(budget)} at {shape.seq_len} tokens.[/]"
                      + (f" Closest: {c.recipe.summary()} needs {format_bytes(c.needed_bytes)}." if c else ""))
    else:
        est = result.plan.chosen_estimate or chosen.estimate
        console.print(f"Chosen: [bold]{chosen.recipe.summary()}[/], micro-batch {est.micro_batch_size}: predicted peak "
                      f"{format_bytes(est.peak_bytes)} allocated at {shape.seq_len} tokens, headroom "
                      f"{format_bytes(chosen.headroom_bytes)}.")
        console.print(phase_sentence(est.peak_phase))
        if args.output:
            console.print(f"Wrote {args.output}; load it with Recipe.from_yaml({args.output!r}).")
    if note := result.p99_note():
        console.print(note)
    return 0 if chosen else 1
