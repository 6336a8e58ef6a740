"""What applying a recipe did is visible in one line without configuring logging; freezing every layer warns."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from tfmem import Recipe, RecipeError
from tfmem.prepare import prepare
from tfmem.techniques.accumulation import micro_batch_size
from tfmem.techniques.freezing import FreezeConfig, freeze_summary


def bert(layers=4):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=32))


def trainer(tmp_path, model=None, batch=16):
    # Skip, rather than fail, where `datasets` is missing (the GPU machines); the other tests here still run.
    Dataset = pytest.importorskip("datasets", reason="the GPU machines may lack `datasets`").Dataset
    data = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 16, "attention_mask": [[1] * 4] * 16, "labels": [0, 1] * 8})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=batch,
                             max_steps=1, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    return Trainer(model=model or bert(), args=args, train_dataset=data)


RECIPE = Recipe.from_dict({"name": "low-mem", "gradient_accumulation_steps": 4, "gradient_checkpointing": True,
                           "mixed_precision": "bf16", "freeze": {"embeddings": True, "layers": 1}})


def unconfigure_logging(monkeypatch):
    """The root logger as a plain script has it: no handler. Called in the test body, because pytest
    adds its capture handlers to the root logger when each test phase starts."""
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(logging.getLogger("tfmem"), "level", logging.NOTSET)


def test_apply_shows_one_line_without_logging_configured(tmp_path, monkeypatch, capsys):
    t = trainer(tmp_path)
    unconfigure_logging(monkeypatch)
    capsys.readouterr()
    RECIPE.apply(t)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tfmem:")]
    assert lines == [
        "tfmem: applied low-mem to the Trainer — micro-batch 4 x 4 accumulation = 16, bf16 autocast, "
        "checkpointing 3 layers (1-3), frozen: embeddings + layer 0"
    ]


def test_prepare_model_shows_one_line_without_logging_configured(monkeypatch, capsys):
    unconfigure_logging(monkeypatch)
    RECIPE.prepare_model(bert())
    err = capsys.readouterr().err
    assert err == "tfmem: prepared BertForSequenceClassification for low-mem — checkpointing 3 layers (1-3), frozen: embeddings + layer 0\n"


def test_the_line_follows_the_applications_logging_once_configured(tmp_path, caplog):
    t = trainer(tmp_path)
    with caplog.at_level(logging.WARNING):  # an application that logs warnings only: the line stays out
        Recipe.from_dict({"name": "quiet"}).prepare_model(bert())
    assert not [r for r in caplog.records if r.name == "tfmem.summary"]
    with caplog.at_level(logging.INFO):
        RECIPE.apply(t)
    summaries = [r.getMessage() for r in caplog.records if r.name == "tfmem.summary"]
    assert len(summaries) == 1 and "frozen: embeddings + layer 0" in summaries[0] and "checkpointing 3 layers" in summaries[0]


def test_the_line_can_be_silenced(monkeypatch, capsys):
    unconfigure_logging(monkeypatch)
    logging.getLogger("tfmem").setLevel(logging.WARNING)
    RECIPE.prepare_model(bert())
    assert capsys.readouterr().err == ""


def test_freezing_every_layer_warns_naming_the_recipe_and_what_still_trains(tmp_path, caplog):
    recipe = Recipe.load("bert-base-8gb")  # written for bert-base's 12 layers: 6 frozen
    with caplog.at_level(logging.WARNING):
        recipe.apply(trainer(tmp_path, model=bert(layers=6)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "tfmem: recipe 'bert-base-8gb', applied to BertForSequenceClassification, freezes all 6 of 6 layers and the "
        "embeddings; only bert.pooler, classifier train. It was probably written for a deeper model; to fine-tune "
        "the encoder, freeze fewer layers: recipe.replace(freeze={'layers': 3})."
    ]


def test_freezing_some_layers_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING):
        RECIPE.prepare_model(bert())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_freeze_summary_for_the_profilers_note():
    model = bert(layers=6)
    summary = freeze_summary(model, FreezeConfig(embeddings=True, layers=6))
    assert summary.all_layers_frozen and summary.note == (
        "freezes all 6 of 6 layers and the embeddings; only bert.pooler, classifier train")
    assert all(p.requires_grad for p in model.parameters()), "a summary does not change the model"
    partial = freeze_summary(model, FreezeConfig(layers=2))
    assert (partial.note, partial.frozen, partial.trainable) == ("", "layers 0-1", ("bert.embeddings", "layers 2-5", "bert.pooler", "classifier"))
    assert prepare(bert(layers=2), Recipe.load("low-memory")).freeze.note == ""
    with pytest.raises(RecipeError, match=r"`freeze.layers` is 7"):
        freeze_summary(model, FreezeConfig(layers=7))


def test_batch_size_suggestions_are_distinct_and_valid():
    with pytest.raises(RecipeError) as info:
        micro_batch_size(1, 4)
    assert "(for example 4 or 8)" in str(info.value) and "`gradient_accumulation_steps: 1`, which divides 1" in str(info.value)
    with pytest.raises(RecipeError, match=r"\(for example 8 or 12\), or `gradient_accumulation_steps: 2`, which divides 10"):
        micro_batch_size(10, 4)
