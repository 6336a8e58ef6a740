"""`tfmem estimate` / `tfmem plan` of a model folder estimate the head its config.json describes, as
`tfmem profile` builds it (tfmem.zoo with num_labels None).

They used to build 2 outputs for every name or folder (`num_labels=2` defaults in the estimator, the
planner, the dataset and the sharded paths), so a 5-class or a regression folder was estimated with
another classifier than the one it trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import BertConfig

from tfmem.cli import main
from tfmem.estimate import cache
from tfmem.estimate.estimator import estimate_memory
from tfmem.estimate.plan import plan
from tfmem.estimate.sharding import plan_sharded
from tfmem.recipe import Recipe
from tfmem.zoo import build_model

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(100)]
HIDDEN = 32
HEADS = {  # name: (config.json's head, its outputs)
    "5-class": ({"num_labels": 5}, 5),
    "regression": ({"num_labels": 1, "problem_type": "regression"}, 1),
}


def model_folder(tmp_path: Path, name: str, **head) -> str:
    """A tiny BERT folder (config and vocabulary, no weights) with the head `head` describes."""
    folder = tmp_path / name
    BertConfig(vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, **head).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return str(folder)


def head_bytes(outputs: int) -> int:
    """fp32 bytes of BERT's classifier: Linear(hidden, outputs), weights and bias."""
    return (HIDDEN + 1) * outputs * 4


def parameter_count(folder: str, num_labels: int | None = None) -> int:
    return sum(p.numel() for p in build_model(folder, num_labels=num_labels)[0].parameters())


def cli_json(capsys, *args: str) -> dict:
    code = main(list(args))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.mark.parametrize("kind", HEADS)
def test_the_api_estimates_the_folders_head_and_an_explicit_count_still_wins(tmp_path, kind):
    head, outputs = HEADS[kind]
    folder = model_folder(tmp_path, kind, **head)
    own = estimate_memory(folder, None, 4, 16, "cpu")
    two = estimate_memory(folder, None, 4, 16, "cpu", num_labels=2)
    assert own.parameters_bytes - two.parameters_bytes == head_bytes(outputs) - head_bytes(2)
    # ... the model `tfmem profile` and `plan --measure` train (tfmem.zoo.build_model with no count)
    assert own.parameters_bytes - two.parameters_bytes == 4 * (parameter_count(folder) - parameter_count(folder, 2))


def test_the_cli_estimates_the_folders_head_alone_sharded_and_for_a_dataset(tmp_path, capsys):
    pytest.importorskip("datasets", reason="reading a dataset file needs `datasets`")
    five, two = model_folder(tmp_path, "five", num_labels=5), model_folder(tmp_path, "two", num_labels=2)
    data = tmp_path / "rows.csv"
    data.write_text("text,label\n" + "".join(f"{' '.join(['w1'] * (i + 2))},{i % 5}\n" for i in range(8)))
    step = ["--batch-size", "4", "--device", "cpu", "--json"]
    runs = {  # what each path prints: (arguments, the parameters' bytes in its JSON)
        "one GPU": (["--seq-len", "16"], lambda out: out["parameters_bytes"]),
        "DDP": (["--seq-len", "16", "--gpus", "2", "--strategy", "ddp"], lambda out: out["parameters_bytes"]),
        "dataset": (["--dataset", str(data)], lambda out: out["parameters_bytes"]),
    }
    for path, (args, parameters) in runs.items():
        got = {folder: parameters(cli_json(capsys, "estimate", "--model", folder, *args, *step)) for folder in (five, two)}
        assert got[five] - got[two] == head_bytes(5) - head_bytes(2), path
    # FSDP: each rank holds its shard of the head; the 5-class one is the larger
    fsdp = ["--seq-len", "16", "--gpus", "2", "--strategy", "fsdp", *step]
    assert (cli_json(capsys, "estimate", "--model", five, *fsdp)["parameters_bytes"]
            > cli_json(capsys, "estimate", "--model", two, *fsdp)["parameters_bytes"])


@pytest.mark.parametrize("kind", HEADS)
def test_a_plan_of_the_folder_runs_and_estimates_its_head(tmp_path, kind):
    head, outputs = HEADS[kind]
    folder = model_folder(tmp_path, kind, **head)
    result = plan(folder, 4, 16, 2**30, "cpu")
    assert result.chosen is not None
    baseline_two = estimate_memory(folder, result.chosen.recipe, 4, 16, "cpu", num_labels=2)
    assert (result.chosen.estimate.parameters_bytes - baseline_two.parameters_bytes
            == head_bytes(outputs) - head_bytes(2))
    if kind != "5-class":  # the sharded planner once (seconds of fake steps)
        return
    for strategy in ("ddp", "fsdp"):  # `tfmem plan --gpus 2`'s planner
        own = plan_sharded(folder, 4, 16, 2**30, 2, "cpu", strategies=(strategy,)).chosen.estimate
        two = plan_sharded(folder, 4, 16, 2**30, 2, "cpu", strategies=(strategy,), num_labels=2).chosen.estimate
        assert own.recipe == two.recipe
        if strategy == "ddp":  # every rank holds the whole head
            assert own.parameters_bytes - two.parameters_bytes == head_bytes(outputs) - head_bytes(2)
        else:  # each rank its shard of it
            assert own.parameters_bytes > two.parameters_bytes, strategy


def test_the_plan_command_runs_for_a_5_class_folder_alone_sharded_and_for_a_dataset(tmp_path, capsys):
    pytest.importorskip("datasets", reason="reading a dataset file needs `datasets`")
    folder = model_folder(tmp_path, "five", num_labels=5, problem_type="multi_label_classification")
    data = tmp_path / "rows.csv"
    data.write_text("text,label\n" + "".join(f"{' '.join(['w1'] * (i + 2))},{i % 5}\n" for i in range(8)))
    plan_args = ["plan", "--model", folder, "--batch-size", "4", "--device", "cpu", "--budget", "1GiB", "--json"]
    for args in (["--seq-len", "16"], ["--dataset", str(data)]):
        out = cli_json(capsys, *plan_args, *args)
        two = estimate_memory(folder, Recipe.from_dict(out["chosen"]["recipe"]), 4, 16, "cpu", num_labels=2)
        assert out["chosen_estimate"]["parameters_bytes"] - two.parameters_bytes == head_bytes(5) - head_bytes(2), args
    assert cli_json(capsys, *plan_args, "--seq-len", "16", "--gpus", "2")["chosen"]


def test_a_2_class_and_a_5_class_estimate_of_one_folder_are_cached_apart(tmp_path, monkeypatch):
    monkeypatch.delenv("TFMEM_CACHE", raising=False)  # conftest turns the cache off for the suite
    monkeypatch.setenv("TFMEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_warned_unwritable", False)
    folder = model_folder(tmp_path, "five", num_labels=5)
    own = estimate_memory(folder, None, 4, 16, "cpu")
    two = estimate_memory(folder, None, 4, 16, "cpu", num_labels=2)
    assert len(list((tmp_path / "cache" / "estimates").glob("*.json"))) == 2
    assert own.parameters_bytes - two.parameters_bytes == head_bytes(5) - head_bytes(2)
    again = estimate_memory(folder, None, 4, 16, "cpu")  # read from the cache: the 5-class entry
    assert again.method == own.method and again.parameters_bytes == own.parameters_bytes
    assert len(list((tmp_path / "cache" / "estimates").glob("*.json"))) == 2
