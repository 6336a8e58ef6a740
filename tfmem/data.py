"""A local text dataset as training will see it: read, tokenized, its lengths and what padding them costs.

Shared by `tfmem profile --dataset` (which trains on it) and `tfmem estimate/plan --dataset` (which
estimate for it), so both read the same rows the same way:

- `load_table(path)`: a csv/json/jsonl/parquet file with a text column and a label column, checked,
  with errors that name the file and the fix.
- `load_tokenizer(model)`: the model's own (fast) tokenizer, from its directory.
- `token_lengths(texts, tokenizer)`: tokens per row with the special tokens, not truncated.
- `DatasetStats`: rows and mean / p50 / p99 / max tokens, for headers and results.json.
- `padding_fraction(batches)`: padded positions / all positions of a list of padded micro-batches.
- `padded_batches(lengths, micro, order)`: under dynamic padding (each micro-batch padded to its longest
  row), the padded length of every micro-batch of an epoch, in file order, a random order or sorted
  by length; the estimator estimates for the longest of them.

Percentiles are nearest-rank: p99 is the shortest length that at least 99% of the rows fit in, so
"truncate at p99" cuts at most 1% of the rows.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
LABEL_COLUMNS = ("label", "labels")
_LOADERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
ORDERS = ("file", "random", "sorted")


class DatasetError(ValueError):
    """A `--dataset` file cannot be used: the message names the file, what is wrong and the fix."""


@dataclass(frozen=True)
class Table:
    """The rows of a dataset file: its texts, and its labels (None where it has no label column)."""

    path: Path
    texts: list[str]
    labels: list[Any] | None
    text_column: str
    label_column: str | None

    def __len__(self) -> int:
        return len(self.texts)


def load_table(path: str | Path, *, need_labels: bool = True) -> Table:
    """Read a local .csv/.json/.jsonl/.parquet file with a text column (and a label column).

    Args:
        path: the file.
        need_labels: refuse a file without a label column (training needs one; estimating does not).

    Raises:
        FileNotFoundError: no such file.
        DatasetError: an unknown file type, an empty file, no text (or label) column, or no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--dataset {str(path)!r} does not exist; give a local .csv, .json, .jsonl or .parquet file.")
    kind = _LOADERS.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(f"--dataset {str(path)!r}: unknown file type {path.suffix!r}; use .csv, .json, .jsonl or .parquet.")
    if path.stat().st_size == 0:
        raise DatasetError(f"--dataset {str(path)!r} is empty (0 bytes); give a file with a header and at least one row.")
    import datasets
    from datasets.utils import logging as datasets_logging

    shown = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()  # the CLI draws its own progress bar
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except ValueError as e:
        # An empty file gives datasets' 'Instruction "train" corresponds to no data!', which names
        # neither the file nor the problem.
        if "corresponds to no data" in str(e):
            raise DatasetError(f"--dataset {str(path)!r} has no rows; give a file with a header and at least one row.") from None
        raise
    finally:
        if shown:
            datasets_logging.enable_progress_bar()
    text_col = next((c for c in TEXT_COLUMNS if c in table.column_names), None)
    label_col = next((c for c in LABEL_COLUMNS if c in table.column_names), None)
    if text_col is None or (need_labels and label_col is None):
        wanted = f"a text column ({' or '.join(TEXT_COLUMNS)})"
        if need_labels:
            wanted += f" and a label column ({' or '.join(LABEL_COLUMNS)})"
        raise DatasetError(f"--dataset {str(path)!r} has columns {table.column_names}; it needs {wanted}.")
    if len(table) == 0:
        raise DatasetError(f"--dataset {str(path)!r} has no rows.")
    texts = list(table[text_col])
    for i, text in enumerate(texts):
        # A number, a list or a null read as text would train on "5", "['a', 'b']" or "None" (b7profile).
        if not isinstance(text, str):
            raise DatasetError(
                f"--dataset {str(path)!r} row {i + 1}: `{text_col}` is {_kind(text)}, not text; "
                f"every `{text_col}` must be a string."
            )
    labels = list(table[label_col]) if label_col is not None else None
    return Table(path, texts, labels, text_col, label_col)


def _kind(value: Any) -> str:
    """How a non-text value reads in a message: `null`, `a number (5)`, `a list (['a', 'b'])`."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    shown = repr(value)
    return f"{kinds.get(type(value), type(value).__name__)} ({shown if len(shown) <= 40 else shown[:39] + '…'})"


def load_tokenizer(model: str):
    """The tokenizer of `model` (a model directory, or a name `tfmem.zoo` resolves to one).

    Raises:
        DatasetError: the model has no tokenizer files (a name built from its configuration only).
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_folder(model))


def tokenizer_folder(model: str) -> Path:
    """The directory holding `model`'s tokenizer files.

    Raises:
        DatasetError: the model has none (a name built from its configuration only).
    """
    from tfmem.zoo import resolve

    _, source = resolve(model)
    folder = source.path or (Path(model) if Path(model).is_dir() else None)
    if folder is None or not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise DatasetError(
            f"--dataset needs the model's tokenizer, but --model {model!r} has no tokenizer files; "
            "point --model at a Hugging Face model directory that has them (tokenizer.json or vocab.txt)."
        )
    return folder


def token_lengths(texts: Sequence[str], tokenizer) -> list[int]:
    """Tokens per text as the model sees them (special tokens included), before any truncation."""
    if not texts:
        return []
    # verbose=False: rows longer than the model are what we are here to count, not to warn about.
    encoded = tokenizer(list(texts), truncation=False, verbose=False)
    return [len(ids) for ids in encoded["input_ids"]]


def percentile(values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile: the smallest value that at least `q`% of `values` are at or below.

    Example:
        >>> percentile(list(range(1, 101)), 99), percentile([5, 1, 9], 50)
        (99, 5)
    """
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class DatasetStats:
    """Token lengths of a dataset's rows (special tokens included, before truncation).

    Attributes:
        path: the file.
        rows: rows in the file.
        mean_tokens, p50_tokens, p99_tokens, max_tokens: of the rows' lengths (nearest-rank percentiles).
        truncate_at: the length rows are cut to in training (--seq-len or the model's limit), or None.
        truncated_rows: rows longer than `truncate_at`.
    """

    path: str
    rows: int
    mean_tokens: float
    p50_tokens: int
    p99_tokens: int
    max_tokens: int
    truncate_at: int | None = None
    truncated_rows: int = 0

    @classmethod
    def of(cls, lengths: Sequence[int], path: str | Path = "", truncate_at: int | None = None) -> DatasetStats:
        """Statistics of `lengths`.

        Example:
            >>> s = DatasetStats.of([10, 12, 14, 200], truncate_at=128)
            >>> s.rows, s.mean_tokens, s.p50_tokens, s.p99_tokens, s.max_tokens, s.truncated_rows
            (4, 59.0, 12, 200, 200, 1)
        """
        if not lengths:
            raise DatasetError(f"--dataset {str(path)!r} has no rows.")
        return cls(
            path=str(path),
            rows=len(lengths),
            mean_tokens=round(sum(lengths) / len(lengths), 2),
            p50_tokens=percentile(lengths, 50),
            p99_tokens=percentile(lengths, 99),
            max_tokens=max(lengths),
            truncate_at=truncate_at,
            truncated_rows=sum(n > truncate_at for n in lengths) if truncate_at else 0,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for people, e.g. "1,000 rows; tokens per row: mean 13.1, p50 12, p99 31, max 45"."""
        line = (f"{self.rows:,} rows; tokens per row: mean {self.mean_tokens:.1f}, p50 {self.p50_tokens}, "
                f"p99 {self.p99_tokens}, max {self.max_tokens}")
        if self.truncate_at and self.truncated_rows:
            line += f"; {self.truncated_rows:,} row(s) longer than {self.truncate_at} are truncated"
        return line


def dataset_stats(path: str | Path, tokenizer, truncate_at: int | None = None) -> tuple[DatasetStats, list[int]]:
    """Read and tokenize `path` with `tokenizer`; its statistics and every row's token count."""
    table = load_table(path, need_labels=False)
    lengths = token_lengths(table.texts, tokenizer)
    return DatasetStats.of(lengths, path, truncate_at), lengths


def model_dataset_stats(path: str | Path, model: str, truncate_at: int | None = None) -> tuple[DatasetStats, list[int]]:
    """`dataset_stats` with `model`'s tokenizer; remembered for an unchanged file (the CLI's header and
    the sweep's rows ask for the same figures)."""
    path = Path(path)
    tokenizer_folder(model)  # a model without a tokenizer is the first thing to fix
    if not path.is_file():
        load_table(path)  # raises, naming the file
    info = path.stat()
    stats, lengths = _cached_stats(str(path.resolve()), info.st_mtime_ns, info.st_size, model, truncate_at)
    return replace(stats, path=str(path)), list(lengths)


@functools.lru_cache(maxsize=4)
def _cached_stats(path: str, _mtime: int, _size: int, model: str, truncate_at: int | None) -> tuple[DatasetStats, tuple[int, ...]]:
    stats, lengths = dataset_stats(path, load_tokenizer(model), truncate_at)
    return stats, tuple(lengths)


def padding_fraction(batches: Iterable[Any]) -> float | None:
    """Padded positions / all positions of micro-batches; None when there are no positions.

    Args:
        batches: dicts with an `attention_mask` (1 for real tokens, 0 for padding), or sequences of the
            real lengths of one micro-batch's rows (each row padded to the longest of its micro-batch).

    Example:
        >>> padding_fraction([[2, 4], [3, 3]])     # 2 of 14 positions are padding
        0.14285714285714285
    """
    real = positions = 0
    for batch in batches:
        if isinstance(batch, Mapping):
            mask = batch["attention_mask"]
            positions += mask.numel()
            real += int(mask.sum())
        else:
            lengths = list(batch)
            if lengths:
                positions += len(lengths) * max(lengths)
                real += sum(lengths)
    return (positions - real) / positions if positions else None


def padded_batches(lengths: Sequence[int], micro_batch_size: int, order: str = "random", *,
                   truncate_at: int | None = None, seed: int = 0) -> list[list[int]]:
    """The real lengths of each micro-batch of one epoch over rows of `lengths` (dynamic padding).

    Args:
        lengths: tokens per row.
        micro_batch_size: rows per forward/backward.
        order: "file" (rows as they are), "random" (shuffled with `seed`, as a DataLoader with
            shuffle=True), "sorted" (longest first: length-grouped batches at their tightest).
        truncate_at: rows are cut to this many tokens first.

    Example:
        >>> padded_batches([3, 9, 4, 8], 2, "sorted")
        [[9, 8], [4, 3]]
    """
    if order not in ORDERS:
        raise ValueError(f"`order` must be one of {', '.join(ORDERS)}, got {order!r}.")
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"`micro_batch_size` must be a positive whole number, got {micro_batch_size!r}.")
    rows = [min(n, truncate_at) if truncate_at else n for n in lengths]
    if order == "random":
        random.Random(seed).shuffle(rows)
    elif order == "sorted":
        rows.sort(reverse=True)
    return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


@dataclass(frozen=True)
class Padding:
    """What dynamic padding costs for one dataset and micro-batch size, in each order of the rows.

    Attributes:
        micro_batch_size: rows per micro-batch.
        longest_tokens: the padded length of the longest micro-batch of an epoch: whatever the order,
            some micro-batch holds the longest (truncated) row, so this is the shape the peak is for.
        fraction_by_order: padding fraction of one epoch in "file", "random" (seeded) and "sorted" order.
    """

    micro_batch_size: int
    longest_tokens: int
    fraction_by_order: dict[str, float]

    @classmethod
    def of(cls, lengths: Sequence[int], micro_batch_size: int, truncate_at: int | None = None, seed: int = 0) -> Padding:
        fractions = {
            order: padding_fraction(padded_batches(lengths, micro_batch_size, order, truncate_at=truncate_at, seed=seed))
            for order in ORDERS
        }
        longest = max(min(n, truncate_at) if truncate_at else n for n in lengths)
        return cls(micro_batch_size, longest, {k: round(v or 0.0, 4) for k, v in fractions.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
