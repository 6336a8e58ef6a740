"""The estimator's fake step gives a sequence-classification head the labels its loss reads.

A multi-label head's loss (BCEWithLogits) takes num_labels 0/1 floats per sample, a regression head's
(MSE) a float per output; the fake step once gave every head one int64 class number per sample, so an
estimate (and a plan) of such a model failed its step. The labels themselves are a few bytes: the check
is that the estimate runs and still matches a real step on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from _real_step import run_steps
from transformers import AutoModelForSequenceClassification, BertConfig

from tfmem.cli import main
from tfmem.estimate import estimate_memory
from tfmem.estimate.plan import plan
from tfmem.profiler.live_bytes import LiveBytes
from tfmem.recipe import Recipe

BATCH, SEQ = 8, 64
HEADS = [
    pytest.param(dict(num_labels=1), id="regression-by-num-labels-1"),
    pytest.param(dict(num_labels=1, problem_type="regression"), id="regression"),
    pytest.param(dict(num_labels=3, problem_type="regression"), id="regression-3-outputs"),
    pytest.param(dict(num_labels=5, problem_type="multi_label_classification"), id="multi-label"),
]


def head_config(**head) -> BertConfig:
    return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      vocab_size=500, max_position_embeddings=128, **head)


def real_labels(config: BertConfig) -> torch.Tensor:
    """Labels as a training set would give them (written here, not taken from tfmem)."""
    if config.problem_type == "multi_label_classification":
        return torch.randint(0, 2, (BATCH, config.num_labels)).float()
    return torch.rand(BATCH) if config.num_labels == 1 else torch.rand(BATCH, config.num_labels)


def measured_peak(config: BertConfig) -> int:
    """Two real CPU optimizer steps on a padded batch (as the estimate's default), counted by LiveBytes."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[::2, SEQ // 2:] = 0
    inputs = {"input_ids": torch.randint(0, 500, (BATCH, SEQ)), "attention_mask": mask, "labels": real_labels(config)}
    tracker = LiveBytes()
    tracker.track(model, opt, inputs)
    with tracker:
        run_steps(model, opt, inputs, Recipe(name="baseline"))
    return tracker.peak_bytes


@pytest.mark.parametrize("head", HEADS)
def test_cpu_estimate_of_each_head_runs_and_matches_a_real_step(head):
    predicted = estimate_memory(head_config(**head), None, BATCH, SEQ, device="cpu").peak_bytes
    measured = measured_peak(head_config(**head))
    # As close as the single-label head with a padded mask (test_estimate.py): both sides count storages exactly on a CPU.
    assert abs(predicted - measured) / measured < 0.001, (predicted, measured)


def test_plan_of_a_multi_label_model_searches_and_finds_a_recipe():
    config = head_config(num_labels=4, problem_type="multi_label_classification")
    base = estimate_memory(config, None, 8, 128, device="cuda")
    budget = base.reserved_bytes - base.activations_bytes // 2  # the baseline does not fit: others are tried
    result = plan(config, 8, 128, budget, "cuda", overhead_bytes=0)
    assert result.chosen is not None and result.chosen_estimate.peak_bytes <= budget


def test_cli_estimate_of_a_multi_label_model_folder(tmp_path, capsys):
    head_config(num_labels=4, problem_type="multi_label_classification").save_pretrained(tmp_path / "tags")
    assert main(["estimate", "--model", str(tmp_path / "tags"), "--batch-size", "4", "--seq-len", "32",
                 "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_bytes"] > 0
