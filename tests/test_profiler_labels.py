"""The profiler's labels are what each sequence-classification head's loss reads (tfmem/profiler/batches.py):
class numbers, regression targets, multi-label 0/1 targets; a label is never bent into another kind."""

from __future__ import annotations

import json

import pytest
import torch

from tfmem.profiler.batches import DatasetError, dataset_samples, label_kind, micro_batches, synthetic_samples
from tfmem.profiler.sweep import SweepSpec, run_sweep

HEADS = [  # (num_labels, config_overrides), as SweepSpec takes them
    (2, {}),  # single-label classification: transformers' default for integer labels
    (1, {}),  # one output: transformers reads it as regression
    (2, {"problem_type": "regression"}),
    (3, {"problem_type": "multi_label_classification"}),
]


@pytest.mark.parametrize(("num_labels", "overrides"), HEADS)
def test_every_head_the_profiler_builds_trains_on_its_synthetic_labels(tiny_model_dir, num_labels, overrides):
    rows = run_sweep(SweepSpec(model=tiny_model_dir, batch_size=4, seq_len=16, steps=1, warmup_steps=0, memory_steps=1,
                               device="cpu", num_labels=num_labels, config_overrides=overrides))
    assert [(r["status"], r["message"]) for r in rows] == [("ok", "")]


def test_synthetic_labels_have_the_shape_and_dtype_of_each_head():
    def labels(num_labels, problem_type=None):
        samples = synthetic_samples(8, 16, 100, num_labels=num_labels, problem_type=problem_type)
        return micro_batches(samples, 8, pad_to=16)[0]["labels"]

    single = labels(3)
    assert single.dtype == torch.long and single.shape == (8,) and set(single.tolist()) <= {0, 1, 2}
    regression = labels(1)
    assert regression.dtype == torch.float32 and regression.shape == (8,) and len(set(regression.tolist())) == 8
    assert labels(2, "regression").shape == (8, 2)
    multi = labels(4, "multi_label_classification")
    assert multi.dtype == torch.float32 and multi.shape == (8, 4) and set(multi.flatten().tolist()) == {0.0, 1.0}


def read(tmp_path, labels, num_labels, problem_type=None):
    # Reading a file goes through `datasets`, which the GPU machines may lack: skip there, not fail.
    pytest.importorskip("datasets", reason="the GPU machines may lack `datasets`")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i}", "label": y}) + "\n" for i, y in enumerate(labels)))

    def tokenizer(texts, truncation, max_length):  # what dataset_samples needs of one: ids per text
        return {"input_ids": [[1, 2, 3] for _ in texts]}

    samples = dataset_samples(path, tokenizer, len(labels), 8, num_labels, problem_type=problem_type)
    return [s.label for s in samples]


def test_a_files_labels_are_read_as_the_head_reads_them(tmp_path):
    # Single-label: a class past the head's wraps round; -100, which the loss skips, stays.
    assert read(tmp_path, [0, 1, 5, -1, -100], 2) == [0, 1, 1, 1, -100]
    # Regression: the numbers themselves (they were cut to whole numbers and wrapped to 0).
    assert read(tmp_path, [3.7, 0.25, "1.5"], 1) == [3.7, 0.25, 1.5]
    assert read(tmp_path, [[0.5, 2.0]], 2, "regression") == [(0.5, 2.0)]
    # Multi-label: one 0/1 per class, or one class number for a target with only it on.
    multi = "multi_label_classification"
    assert read(tmp_path, [[1, 0, 1], [0, 0, 0]], 3, multi) == [(1.0, 0.0, 1.0), (0.0, 0.0, 0.0)]
    assert read(tmp_path, [2], 3, multi) == [(0.0, 0.0, 1.0)]


@pytest.mark.parametrize(("labels", "num_labels", "problem_type", "message"), [
    (["high"], 1, None, "label 'high' is not a number, which a regression head"),
    ([1.5], 2, "regression", r"is not 2 numbers \(one per output\)"),
    ([[1, 0]], 3, "multi_label_classification", "is not 3 values of 0 or 1"),
    ([[1, 2, 0]], 3, "multi_label_classification", "is not 3 values of 0 or 1"),
    (["cat"], 2, None, r"label 'cat' is not a class number \(0 to 1\)"),
])
def test_a_label_the_head_cannot_read_is_refused_naming_it(tmp_path, labels, num_labels, problem_type, message):
    with pytest.raises(DatasetError, match=message):
        read(tmp_path, labels, num_labels, problem_type)


def test_an_unknown_problem_type_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="`problem_type` 'ranking' is not one transformers knows; use"):
        label_kind(2, "ranking")
