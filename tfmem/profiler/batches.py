"""Training samples for profiling: synthetic token ids, or a local dataset file tokenized for real.

Every recipe in a sweep trains on the same samples, grouped into micro-batches of its own size, so
the effective batch and the work per optimizer step are equal across recipes.

- Synthetic: random token ids with a realistic attention mask (lengths drawn between half and all of
  `seq_len`, the rest padding), padded to `seq_len`, as a fixed-shape training setup pads.
- A dataset file (csv, json/jsonl, parquet) with a text column and a label column, tokenized with the
  model's own tokenizer, truncated to `seq_len` and padded to the longest sample of each micro-batch
  (dynamic padding), so the profile sees the real length distribution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

# Reading a dataset file is shared with `tfmem estimate --dataset`; the names stay importable from here.
from tfmem.data import LABEL_COLUMNS, TEXT_COLUMNS, DatasetError, load_table  # noqa: F401

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One training example: token ids (unpadded) and a class label."""

    input_ids: torch.Tensor
    label: int


def synthetic_samples(count: int, seq_len: int, vocab_size: int, num_labels: int = 2, seed: int = 0) -> list[Sample]:
    """`count` random samples of between seq_len/2 and seq_len real tokens.

    Example:
        >>> s = synthetic_samples(4, 16, 100)
        >>> len(s), all(8 <= len(x.input_ids) <= 16 for x in s)
        (4, True)
    """
    generator = torch.Generator().manual_seed(seed)
    low_id = min(5, vocab_size - 1)  # stay clear of the special tokens at the start of BERT-like vocabularies
    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (count,), generator=generator)
    return [
        Sample(
            torch.randint(low_id, vocab_size, (int(n),), generator=generator),
            int(torch.randint(0, num_labels, (1,), generator=generator)),
        )
        for n in lengths
    ]


def dataset_samples(
    path: str | Path,
    tokenizer,
    count: int,
    seq_len: int,
    num_labels: int = 2,
    *,
    batch_size: int | None = None,
    info: dict | None = None,
) -> list[Sample]:
    """The first `count` rows of a local csv/json/parquet file (repeated when it has fewer), tokenized.

    The file is read by `tfmem.data.load_table`, as `tfmem estimate --dataset` reads it.

    Args:
        batch_size: the effective batch: a file with fewer rows than one batch is refused (its rows
            would be repeated inside every batch, which no real run does).
        info: filled with {"rows": rows in the file} when given.

    Raises:
        FileNotFoundError: no such file.
        DatasetError: an unknown file type, no text or label column, no rows, a text that is not a
            string (see `load_table`), or fewer rows than `batch_size`.
    """
    path = Path(path)
    table = load_table(path)
    if batch_size is not None and len(table) < batch_size:
        raise DatasetError(
            f"--dataset {str(path)!r} has {len(table)} row(s), fewer than one batch of --batch-size {batch_size}; "
            f"use --batch-size {len(table)} or less, or a file with at least {batch_size} rows."
        )
    if info is not None:
        info["rows"] = len(table)
    rows = [i % len(table) for i in range(count)]
    encoded = tokenizer([table.texts[i] for i in rows], truncation=True, max_length=seq_len)
    labels = [_label(table.labels[i], num_labels, path) for i in rows]
    return [Sample(torch.tensor(ids, dtype=torch.long), y) for ids, y in zip(encoded["input_ids"], labels)]


def _label(value, num_labels: int, path: Path) -> int:
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise DatasetError(f"--dataset {str(path)!r}: label {value!r} is not a class number (0 to {num_labels - 1}).") from None
    return label % num_labels


def micro_batches(samples: list[Sample], size: int, pad_to: int | None, pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """Group samples into micro-batches of `size`: padded to `pad_to`, or to each batch's longest sample.

    Example:
        >>> b = micro_batches(synthetic_samples(4, 16, 100), 2, pad_to=16)
        >>> len(b), tuple(b[0]["input_ids"].shape), b[0]["attention_mask"].dtype
        (2, (2, 16), torch.int64)
    """
    out = []
    for start in range(0, len(samples), size):
        group = samples[start : start + size]
        length = pad_to or max(len(s.input_ids) for s in group)
        ids = torch.full((len(group), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), length), dtype=torch.long)
        for row, sample in enumerate(group):
            n = min(len(sample.input_ids), length)
            ids[row, :n] = sample.input_ids[:n]
            mask[row, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([s.label for s in group])})
    return out
