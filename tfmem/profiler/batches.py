"""Training samples for profiling: synthetic token ids, or a local dataset file tokenized for real.

Every recipe in a sweep trains on the same samples, grouped into micro-batches of its own size, so
the effective batch and the work per optimizer step are equal across recipes.

- Synthetic: random token ids with a realistic attention mask (lengths drawn between half and all of
  `seq_len`, the rest padding), padded to `seq_len`, as a fixed-shape training setup pads.
- A dataset file (csv, json/jsonl, parquet) with a text column and a label column, tokenized with the
  model's own tokenizer, truncated to `seq_len` and padded to the longest sample of each micro-batch
  (dynamic padding), so the profile sees the real length distribution.

Labels are what the model's head reads. The profiler builds sequence-classification heads only
(`tfmem.zoo.build_model`), so a sample has one label, read as transformers' loss reads it
(`ForSequenceClassificationLoss`, see `label_kind`): a class number for single-label classification, a
number for regression, one 0/1 per class for multi-label classification. Memory and speed do not depend
on the values, but the shape and dtype must be what the head's loss takes, or the step fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Reading a dataset file is shared with `tfmem estimate --dataset`; the names stay importable from here.
from tfmem.data import LABEL_COLUMNS, TEXT_COLUMNS, DatasetError, load_table  # noqa: F401

logger = logging.getLogger(__name__)


SINGLE_LABEL, REGRESSION, MULTI_LABEL = "single_label_classification", "regression", "multi_label_classification"
IGNORE_INDEX = -100  # the label CrossEntropyLoss (and transformers' loss) skips


@dataclass(frozen=True)
class Sample:
    """One training example: token ids (unpadded) and its label: a class number (int), a regression target
    (float, or a tuple of num_labels floats), or a multi-label target (a tuple of num_labels 0.0/1.0)."""

    input_ids: torch.Tensor
    label: int | float | tuple[float, ...]


def label_kind(num_labels: int, problem_type: str | None = None) -> str:
    """How a sequence-classification head reads its labels, as transformers decides it for integer labels.

    A config's `problem_type` says it; without one, transformers takes one output (`num_labels` 1) for
    regression and integer labels for single-label classification.

    Example:
        >>> label_kind(2), label_kind(1), label_kind(5, "multi_label_classification")
        ('single_label_classification', 'regression', 'multi_label_classification')

    Raises:
        ValueError: `num_labels` below 1, or a `problem_type` transformers does not know.
    """
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"`num_labels` must be a positive whole number, got {num_labels!r}.")
    if problem_type is None:
        return REGRESSION if num_labels == 1 else SINGLE_LABEL
    if problem_type not in (SINGLE_LABEL, REGRESSION, MULTI_LABEL):
        raise ValueError(f"`problem_type` {problem_type!r} is not one transformers knows; use "
                         f"{SINGLE_LABEL!r}, {REGRESSION!r}, {MULTI_LABEL!r} or None.")
    return problem_type


def zero_labels(size: int, num_labels: int, problem_type: str | None = None) -> torch.Tensor:
    """Labels of value 0 for `size` samples, in the shape and dtype the head's loss takes (see `label_kind`):
    class numbers (int64, one per sample), regression targets (float32, one per sample for one output, else
    num_labels each) or multi-label targets (float32, num_labels each). `micro_batches` gives the same.

    For a step whose memory, not its values, matters (the estimator's fake step).

    Example:
        >>> [(tuple(y.shape), str(y.dtype)) for y in (zero_labels(4, 2), zero_labels(4, 1), zero_labels(4, 3, MULTI_LABEL))]
        [((4,), 'torch.int64'), ((4,), 'torch.float32'), ((4, 3), 'torch.float32')]
    """
    kind = label_kind(num_labels, problem_type)
    if kind == SINGLE_LABEL:
        return torch.zeros((size,), dtype=torch.long)
    return torch.zeros((size,) if kind == REGRESSION and num_labels == 1 else (size, num_labels))


def synthetic_samples(count: int, seq_len: int, vocab_size: int, num_labels: int = 2, seed: int = 0,
                      problem_type: str | None = None) -> list[Sample]:
    """`count` random samples of between seq_len/2 and seq_len real tokens, with random labels of the kind
    the head reads (see `label_kind`).

    Example:
        >>> s = synthetic_samples(4, 16, 100)
        >>> len(s), all(8 <= len(x.input_ids) <= 16 for x in s), type(s[0].label).__name__
        (4, True, 'int')
        >>> len(synthetic_samples(1, 16, 100, num_labels=3, problem_type="multi_label_classification")[0].label)
        3
    """
    kind = label_kind(num_labels, problem_type)
    generator = torch.Generator().manual_seed(seed)
    low_id = min(5, vocab_size - 1)  # stay clear of the special tokens at the start of BERT-like vocabularies
    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (count,), generator=generator)
    return [
        Sample(torch.randint(low_id, vocab_size, (int(n),), generator=generator), _random_label(kind, num_labels, generator))
        for n in lengths
    ]


def _random_label(kind: str, num_labels: int, generator: torch.Generator) -> int | float | tuple[float, ...]:
    if kind == SINGLE_LABEL:
        return int(torch.randint(0, num_labels, (1,), generator=generator))
    if kind == MULTI_LABEL:
        return tuple(float(x) for x in torch.randint(0, 2, (num_labels,), generator=generator))
    values = tuple(float(x) for x in torch.rand(num_labels, generator=generator))  # regression
    return values[0] if num_labels == 1 else values


def dataset_samples(
    path: str | Path,
    tokenizer,
    count: int,
    seq_len: int,
    num_labels: int = 2,
    *,
    batch_size: int | None = None,
    info: dict | None = None,
    problem_type: str | None = None,
) -> list[Sample]:
    """The first `count` rows of a local csv/json/parquet file (repeated when it has fewer), tokenized.

    The file is read by `tfmem.data.load_table`, as `tfmem estimate --dataset` reads it.

    Args:
        batch_size: the effective batch: a file with fewer rows than one batch is refused (its rows
            would be repeated inside every batch, which no real run does).
        info: filled with {"rows": rows in the file} when given.
        num_labels, problem_type: the head's, which say how a label is read (`label_kind`): a class number
            (one outside 0 to num_labels - 1 wraps round, as the head has only num_labels classes, except
            -100, which the loss skips as in training); a number for regression (num_labels of them for
            more than one output); for multi-label, num_labels 0/1 values, or one class number.

    Raises:
        FileNotFoundError: no such file.
        DatasetError: an unknown file type, no text or label column, no rows, a text that is not a
            string (see `load_table`), fewer rows than `batch_size`, or a label the head cannot read.
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
    kind = label_kind(num_labels, problem_type)
    rows = [i % len(table) for i in range(count)]
    encoded = tokenizer([table.texts[i] for i in rows], truncation=True, max_length=seq_len)
    labels = [_label(table.labels[i], kind, num_labels, path) for i in rows]
    return [Sample(torch.tensor(ids, dtype=torch.long), y) for ids, y in zip(encoded["input_ids"], labels)]


def _label(value: Any, kind: str, num_labels: int, path: Path) -> int | float | tuple[float, ...]:
    """A file's label as the head reads it (see `dataset_samples`)."""
    where = f"--dataset {str(path)!r}: label {value!r}"
    if kind == REGRESSION:
        values = _numbers(value)
        if values is None or len(values) != num_labels:
            count = "a number" if num_labels == 1 else f"{num_labels} numbers (one per output)"
            raise DatasetError(f"{where} is not {count}, which a regression head with num_labels {num_labels} reads.")
        return values[0] if num_labels == 1 else values
    if kind == MULTI_LABEL and isinstance(value, (list, tuple)):
        values = _numbers(value)
        if values is None or len(values) != num_labels or any(v not in (0.0, 1.0) for v in values):
            raise DatasetError(f"{where} is not {num_labels} values of 0 or 1 (one per class), which a multi-label "
                               "head reads; or give one class number.")
        return values
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{where} is not a class number (0 to {num_labels - 1}).") from None
    if kind == MULTI_LABEL:  # one class: the target with only it on
        return tuple(1.0 if c == label % num_labels else 0.0 for c in range(num_labels))
    return label if label == IGNORE_INDEX else label % num_labels


def _numbers(value: Any) -> tuple[float, ...] | None:
    """`value` (a number, or a list of numbers) as floats; None when it is not that."""
    items = value if isinstance(value, (list, tuple)) else [value]
    try:
        return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None


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
