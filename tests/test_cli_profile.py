"""`tfmem profile` from the command line: files, table, headline, and one-line errors for bad arguments."""

from __future__ import annotations

import csv
import json

import pytest

from tfmem.cli import main
from tfmem.profiler.report import REQUIRED_KEYS


def profile(*args: str) -> int:
    return main(["profile", "--batch-size", "8", "--seq-len", "32", "--steps", "1", "--warmup-steps", "0", *args])


def test_profile_writes_rows_csv_chart_and_prints_the_headline(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "results"
    code = profile("--model", tiny_model_dir, "--recipe", "checkpointing", "fp16", "--output", str(out), "--device", "cpu")
    printed = capsys.readouterr().out
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["recipe"] for r in rows] == ["baseline", "checkpointing", "fp16"]
    for row in rows:
        assert set(REQUIRED_KEYS) <= set(row)
        assert row["device"] == "cpu"
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    assert rows[1]["peak_allocated_bytes"] < rows[0]["peak_allocated_bytes"]
    with open(out / "results.csv", newline="") as f:
        assert [r["recipe"] for r in csv.DictReader(f)] == ["baseline", "checkpointing", "fp16"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "random weights" in printed  # says the model was built from its configuration
    assert "checkpointing: peak" in printed and "x baseline" in printed


def test_max_memory_makes_a_recipe_oom_and_the_sweep_finishes(tmp_path, tiny_model_dir, capsys):
    code = profile("--model", tiny_model_dir, "--recipe", "accumulate-4", "--max-memory", "1MiB",
                   "--output", str(tmp_path), "--device", "cpu")
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    # The tiny model's baseline peaks near 1.5 MiB, accumulate-4 near 0.6 MiB.
    assert [r["status"] for r in rows] == ["oom", "ok"]
    assert rows[0]["requested_bytes"] > 0 and rows[0]["limit_bytes"] == 2**20
    printed = capsys.readouterr().out
    assert "oom" in printed and "(limit 1.0 MiB)" in printed
    assert rows[0]["oom_live_bytes"] > 2**20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-memory", "lots"], "--max-memory 'lots' is not a size"),
        (["--model", "bert-gigantic"], "--model 'bert-gigantic' is neither"),
        (["--recipe", "low-memroy"], "Did you mean 'low-memory'"),
        (["--batch-size", "0"], "--batch-size must be a positive"),
        (["--dataset", "nowhere.csv", "--model", "bert-tiny"], "--dataset needs the model's tokenizer"),
        (["--batch-size", "10", "--recipe", "accumulate-4"],
         "--batch-size 10 does not divide by the 4 accumulation steps of recipe 'accumulate-4'"),
        (["--model", "roberta-base", "--seq-len", "600"], "`--seq-len` is 600 but roberta-base holds at most 512 tokens"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message, tmp_path, capsys):
    code = profile(*args, "--output", str(tmp_path))
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path, tiny_model_dir, capsys,
                                                                            monkeypatch):
    monkeypatch.setattr("tfmem.cli.profile.run_sweep", lambda *a, **k: pytest.fail("a recipe ran"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = profile("--model", tiny_model_dir, "--output", str(blocker / "results"), "--device", "cpu")
    err = capsys.readouterr().err
    assert code == 2
    assert f"--output '{blocker / 'results'}' cannot be written" in err and len(err.strip().splitlines()) == 1


def test_no_ratio_line_says_why(tmp_path, tiny_model_dir, capsys):
    # The baseline runs, the only other recipe cannot (fp16 on a CPU).
    code = profile("--model", tiny_model_dir, "--recipe", "fp16", "--output", str(tmp_path), "--device", "cpu")
    printed = capsys.readouterr().out
    assert code == 0
    assert "No ratios: no recipe other than the baseline ran" in printed
    assert "baseline row did not run" not in printed


def test_seq_len_is_checked_against_the_models_positions_before_anything_starts(tmp_path, capsys):
    from transformers import RobertaConfig

    folder = tmp_path / "tiny-roberta"
    # RoBERTa's positions start after the padding index: 34 positions hold 34 - (1 + 1) = 32 tokens.
    RobertaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=34, pad_token_id=1).save_pretrained(folder)
    code = profile("--model", str(folder), "--seq-len", "33", "--recipe", "baseline", "--output", str(tmp_path / "a"))
    out, err = capsys.readouterr()
    assert code == 2 and out == ""  # refused before the run is even announced
    assert err.strip() == ("tfmem profile: error: `--seq-len` is 33 but tiny-roberta holds at most 32 tokens; "
                           "use 32 or fewer.")
    code = profile("--model", str(folder), "--seq-len", "32", "--recipe", "baseline", "--output", str(tmp_path / "b"),
                   "--device", "cpu")
    assert code == 0
    assert [r["status"] for r in json.loads((tmp_path / "b" / "results.json").read_text())] == ["ok"]
