"""The results table of `tfmem profile`, laid out for the terminal's width, and the lines printed under it.

Imports only rich with this module (the row formatting comes from tfmem.profiler.report when a table
is drawn), so `tfmem profile --help` stays free of torch.
"""

from __future__ import annotations

from rich.table import Table

_NOTE_MIN = 20  # a note column narrower than this reads worse than notes under the table
# Columns given up, in this order, when the table is wider than the terminal (results.json has them all).
_DROP_WHEN_NARROW = ("tokens/s", "padding", "peak reserved", "peak in", "samples/s")


def results_table(rows: list[dict], title: str, width: int) -> tuple[Table, list[str]]:
    """The results table laid out for `width` columns, and the lines to print under it.

    No cell is broken inside a word: figures and names never wrap, headers wrap only at spaces, notes go
    under the table when a note column would be too narrow, and at the narrowest widths the least
    needed columns are left out (and the lines below say which).
    """
    from tfmem.profiler.report import table_columns, table_rows

    names = table_columns(rows)
    cells = table_rows(rows)
    columns = {name: [c[i] for c in cells] for i, name in enumerate(names)}
    notes = columns.pop("note")

    def span(cols: dict[str, list[str]], wrap_headers: bool, extra: int = 0) -> int:
        widths = [max([len(v) for v in values] + [max(len(w) for w in name.split()) if wrap_headers else len(name)])
                  for name, values in cols.items()]
        return sum(widths) + 3 * len(widths) + 1 + extra

    longest_note = max((len(n) for n in notes), default=0)
    note_width = 3 + max(len("note"), min(longest_note, _NOTE_MIN))
    wrap = span(columns, False, note_width) > width
    inline_notes = span(columns, wrap, note_width) <= width
    dropped: list[str] = []
    for name in _DROP_WHEN_NARROW:
        if inline_notes or span(columns, True) <= width or name not in columns:
            continue
        columns.pop(name)
        dropped.append(name)
        wrap = True
    table = Table(title=title)
    for name, values in columns.items():
        header = name.replace(" ", "\n") if wrap else name
        table.add_column(header, justify="left" if name in ("recipe", "status") else "right", no_wrap=True,
                         min_width=max([len(v) for v in values] + [max(len(w) for w in name.split())]))
    if inline_notes:
        table.add_column("note", overflow="fold", ratio=1, min_width=min(max(longest_note, 4), _NOTE_MIN))
    recipes = columns["recipe"]
    statuses = columns["status"]
    for i in range(len(recipes)):
        row = [values[i] for values in columns.values()] + ([notes[i]] if inline_notes else [])
        table.add_row(*row, style=None if statuses[i] == "ok" else "red")
    below = [] if inline_notes else [f"note, {recipe}: {note}" for recipe, note in zip(recipes, notes) if note]
    if dropped:
        below.append(f"Left out at this width: {', '.join(dropped)} (all figures are in results.json).")
    return table, below


def no_headline_reason(rows: list[dict]) -> str:
    """Why there is no headline ratio, by what the rows say (a baseline row is present)."""
    from tfmem.profiler.sweep import BASELINE

    base = next((r for r in rows if r["recipe"] == BASELINE.name), None)
    if base is None or base["status"] != "ok":
        return "No ratios: the baseline row did not run (see its status); compare the peaks directly."
    others = [r for r in rows if r is not base]
    if not any(r["status"] == "ok" for r in others):
        return "No ratios: no recipe other than the baseline ran (see their status and notes)."
    return "No ratios: the rows that ran have no peak-memory figures (use --memory-steps 1 or more)."
