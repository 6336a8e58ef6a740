"""Result rows of a sweep, on disk and for people: results.json, results.csv, a PNG chart, a headline.

`results.json` is a list of rows, one per recipe; other programs read these keys:

    recipe, status ("ok" | "oom" | "error"), peak_allocated_bytes, samples_per_second,
    tokens_per_second, device

and also: message, techniques, model, random_weights, batch_size, micro_batch_size,
gradient_accumulation_steps, seq_len (synthetic: every sample's padded length; with a dataset: its longest
sample after truncation), max_seq_len (the truncation limit), padding (how micro-batches were padded),
optimizer (the Trainer default the loop used, e.g. "adamw_torch_fused"), cpu_threads (CPU runs),
peak_reserved_bytes (CUDA), peak_rss_bytes,
peak_{parameters,gradients,optimizer_state,activations}_bytes, step_time_seconds, timed_steps, mfu (CUDA),
memory_ratio_to_baseline, speed_ratio_to_baseline, peak_phase ("forward" | "backward" | "optimizer": the
phase of the step that set the peak, see phases.py), padding_fraction (padded positions / all positions
of the micro-batches the row trained); with --dataset, dataset (the file's statistics: path, rows,
mean_tokens, p50_tokens, p99_tokens, max_tokens, truncate_at, truncated_rows; JSON only); for oom rows requested_bytes (the allocation that
failed), oom_live_bytes (CPU: live tensor bytes had it succeeded) and limit_bytes (with --max-memory).
Figures a row does not have (an `oom` row's throughput, say) are null in JSON and empty in CSV.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from tfmem.files import write_text_atomic
from tfmem.profiler.phases import PHASE_WORDS
from tfmem.profiler.units import format_bytes

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("recipe", "status", "peak_allocated_bytes", "samples_per_second", "tokens_per_second", "device")
CSV_COLUMNS = (
    "recipe", "status", "device", "model", "random_weights", "techniques", "batch_size", "micro_batch_size",
    "gradient_accumulation_steps", "seq_len", "max_seq_len", "padding", "optimizer", "cpu_threads",
    "peak_allocated_bytes", "memory_ratio_to_baseline",
    "peak_phase",
    "peak_reserved_bytes", "peak_rss_bytes", "peak_parameters_bytes", "peak_gradients_bytes",
    "peak_optimizer_state_bytes", "peak_activations_bytes", "step_time_seconds", "samples_per_second",
    "tokens_per_second", "speed_ratio_to_baseline", "padding_fraction", "timed_steps", "mfu", "requested_bytes", "oom_live_bytes", "limit_bytes", "message",
)
BASELINE_NAME = "baseline"
HEADLINE_RECIPE = "low-memory"


def normalise(row: dict[str, Any]) -> dict[str, Any]:
    """The row with every CSV column present (None where it has no value), known columns first."""
    out = {k: row.get(k) for k in CSV_COLUMNS}
    out.update({k: v for k, v in row.items() if k not in out})
    return out


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Set memory and speed ratios to the baseline row (in place), when the baseline ran."""
    base = next((r for r in rows if r.get("recipe") == BASELINE_NAME and r.get("status") == "ok"), None)
    for row in rows:
        row["memory_ratio_to_baseline"] = _ratio(row.get("peak_allocated_bytes"), base and base.get("peak_allocated_bytes"))
        row["speed_ratio_to_baseline"] = _ratio(row.get("samples_per_second"), base and base.get("samples_per_second"))


def _ratio(value, reference) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


class RowWriter:
    """Writes all rows so far to `results.json` and `results.csv` in `folder`, after each row.

    Each file is replaced atomically (a temporary file renamed over it), so an interrupted sweep leaves
    the files as they were after the last finished row, never half-written.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def json_path(self) -> Path:
        return self.folder / "results.json"

    @property
    def csv_path(self) -> Path:
        return self.folder / "results.csv"

    def write(self, rows: list[dict[str, Any]]) -> None:
        rows = [normalise(r) for r in rows]
        write_text_atomic(self.json_path, json.dumps(rows, indent=2) + "\n")
        write_text_atomic(self.csv_path, to_csv(rows))


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in normalise(row).items()})
    return buffer.getvalue()


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Headers for `table_rows`: a reserved-memory column only when some row has the figure (CUDA)."""
    reserved = ["peak reserved"] if any(r.get("peak_reserved_bytes") for r in rows) else []
    return ["recipe", "status", "peak memory", *reserved, "vs baseline", "peak in", "samples/s", "tokens/s", "padding", "note"]


def table_rows(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Rows for the terminal table, matching `table_columns`: recipe, status, peak memory (allocated),
    peak reserved (CUDA), ratio to baseline, the phase that set the peak, samples/s, tokens/s, the padding
    fraction, note."""
    with_reserved = any(r.get("peak_reserved_bytes") for r in rows)
    out = []
    for r in rows:
        ratio = r.get("memory_ratio_to_baseline")
        note = _short(r.get("message") or "")
        if r.get("status") == "oom" and r.get("requested_bytes"):
            note = f"tried to allocate {format_bytes(r['requested_bytes'])}"
            if r.get("oom_live_bytes"):
                note += f", reaching {format_bytes(r['oom_live_bytes'])}"
            if r.get("limit_bytes"):
                note += f" (limit {format_bytes(r['limit_bytes'])})"
        out.append((
            r["recipe"],
            r["status"],
            format_bytes(r.get("peak_allocated_bytes")),
            *([format_bytes(r.get("peak_reserved_bytes"))] if with_reserved else []),
            f"{ratio:.2f}x" if ratio is not None else "-",
            PHASE_WORDS.get(r.get("peak_phase") or "", "-").replace(" pass", ""),
            _num(r.get("samples_per_second")),
            _num(r.get("tokens_per_second"), 0),
            "-" if r.get("padding_fraction") is None else f"{r['padding_fraction']:.0%}",
            note,
        ))
    return out


def _short(message: str, limit: int = 70) -> str:
    """The first clause of a message, for a table cell (results.json keeps all of it)."""
    for stop in ("; ", ", where", ". "):
        if stop in message:
            message = message.split(stop)[0]
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def headline(rows: list[dict[str, Any]]) -> str | None:
    """One line comparing the low-memory recipe (or else the lowest-peak one) with the baseline.

    Example: "low-memory: peak 61.2 MiB = 0.38x baseline (162.0 MiB); 1.9x slower"
    """
    base = next((r for r in rows if r.get("recipe") == BASELINE_NAME and r.get("status") == "ok"), None)
    ok = [r for r in rows if r.get("status") == "ok" and r is not base and r.get("peak_allocated_bytes")]
    if base is None or not ok:
        return None
    pick = next((r for r in ok if r["recipe"] == HEADLINE_RECIPE), None) or min(ok, key=lambda r: r["peak_allocated_bytes"])
    line = (
        f"{pick['recipe']}: peak {format_bytes(pick['peak_allocated_bytes'])} = "
        f"{pick['peak_allocated_bytes'] / base['peak_allocated_bytes']:.2f}x baseline ({format_bytes(base['peak_allocated_bytes'])})"
    )
    if pick.get("samples_per_second") and base.get("samples_per_second"):
        speed = base["samples_per_second"] / pick["samples_per_second"]
        line += f"; {speed:.1f}x slower" if speed >= 1 else f"; {1 / speed:.1f}x faster"
    return line


def write_chart(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """A PNG with two bar charts: peak memory (MiB) and samples/s per recipe; failed rows are marked.

    Returns the path, or None when no row has figures.
    """
    if not any(r.get("peak_allocated_bytes") for r in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    names = [r["recipe"] for r in rows]
    peaks = [(r.get("peak_allocated_bytes") or 0) / 2**20 for r in rows]
    speeds = [r.get("samples_per_second") or 0 for r in rows]
    colors = ["tab:gray" if r["recipe"] == BASELINE_NAME else "tab:blue" if r["status"] == "ok" else "tab:red" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 2))
    ax1.barh(names, peaks, color=colors)
    ax1.set_xlabel("peak memory (MiB)")
    ax2.barh(names, speeds, color=colors)
    ax2.set_xlabel("samples / s")
    ax2.set_yticklabels([])
    for ax, values in ((ax1, peaks), (ax2, speeds)):
        ax.invert_yaxis()
        for i, (row, value) in enumerate(zip(rows, values)):
            if row["status"] != "ok":
                ax.text(0, i, f" {row['status']}", va="center", color="tab:red")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
