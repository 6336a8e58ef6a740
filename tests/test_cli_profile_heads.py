"""A model folder's head is the one its config.json describes (num_labels with its problem_type).

The CLI used to build 2 outputs for every model while keeping the folder's `problem_type`, so a regression
folder (num_labels 1) became a 2-output regression head and a --dataset with one number per row was refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import BertConfig

from tfmem.cli import main
from tfmem.zoo import build_model, model_config

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(100)]


def model_folder(tmp_path: Path, **head) -> str:
    """A tiny BERT folder (config and vocabulary, no weights) with the head `head` describes."""
    folder = tmp_path / "model"
    BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, **head).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return str(folder)


def test_a_regression_folder_profiles_a_dataset_of_one_number_per_row(tmp_path, capsys):
    pytest.importorskip("datasets", reason="reading a dataset file needs `datasets`")
    folder = model_folder(tmp_path, num_labels=1, problem_type="regression")
    data = tmp_path / "scores.csv"
    data.write_text("text,label\n" + "".join(f"w{i} w2 w3,{i / 7:.3f}\n" for i in range(8)))
    out = tmp_path / "out"
    code = main(["profile", "--model", folder, "--recipe", "baseline", "--dataset", str(data), "--batch-size", "4",
                 "--seq-len", "16", "--steps", "1", "--warmup-steps", "0", "--output", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert [row["status"] for row in json.loads((out / "results.json").read_text())] == ["ok"]


def test_the_folders_num_labels_is_the_heads_and_a_known_name_keeps_two(tmp_path):
    folder = model_folder(tmp_path, num_labels=5, problem_type="multi_label_classification")
    model, _ = build_model(folder)
    assert model.classifier.out_features == 5 and model.config.problem_type == "multi_label_classification"
    assert model_config(folder).num_labels == 5
    assert model_config("bert-tiny").num_labels == 2  # the built-in models: 2 classes, as before
    assert model_config(folder, num_labels=3).num_labels == 3  # an explicit count still wins


@pytest.mark.parametrize("padded", [True, False])
def test_plan_measure_trains_a_multi_label_folder(tmp_path, padded):
    # `tfmem plan --measure` trains the folder's head on labels it reads (tfmem.estimate.measure.time_steps).
    from tfmem.estimate.measure import time_steps
    from tfmem.recipe import Recipe

    folder = model_folder(tmp_path, num_labels=5, problem_type="multi_label_classification")
    out = time_steps(folder, Recipe().to_dict(), 4, 16, steps=1, warmup=0, device="cpu", padded=padded)
    assert out.get("error") is None and out["step_seconds"] > 0, out
