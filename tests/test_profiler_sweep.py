"""The sweep behind `tfmem profile`: out-of-memory is a row, failures are rows, rows survive interruption."""

from __future__ import annotations

import json

import pytest
import torch

from tfmem.profiler import report
from tfmem.profiler.report import RowWriter, headline
from tfmem.profiler.sweep import SweepSpec, run_sweep
from tfmem.recipe import Recipe


def spec(model_dir, *recipes, **kwargs) -> SweepSpec:
    values = dict(model=model_dir, recipes=tuple(Recipe.load(r) for r in recipes), batch_size=8, seq_len=32,
                  steps=1, warmup_steps=0, memory_steps=1, device="cpu")
    values.update(kwargs)
    return SweepSpec(**values)


def test_a_recipe_out_of_memory_is_an_oom_row_and_the_sweep_goes_on(tmp_path, tiny_model_dir, monkeypatch):
    measured = run_sweep(spec(tiny_model_dir, "accumulate-4"))
    base, small = (r["peak_allocated_bytes"] for r in measured)
    assert small < base
    limit = (base + small) // 2  # the baseline does not fit, accumulate-4 does

    rows = run_sweep(spec(tiny_model_dir, "accumulate-4", max_memory_bytes=limit), output_dir=tmp_path / "out")
    assert [(r["recipe"], r["status"]) for r in rows] == [("baseline", "oom"), ("accumulate-4", "ok")]
    oom = rows[0]
    assert oom["requested_bytes"] > 0 and oom["limit_bytes"] == limit
    assert oom["peak_allocated_bytes"] is None and oom["samples_per_second"] is None
    assert rows[1]["peak_allocated_bytes"] == small  # same seed, same samples: the same exact peak
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["status"] for r in on_disk] == ["oom", "ok"]


def test_recipes_that_cannot_run_are_error_rows_with_the_reason(tiny_model_dir):
    rows = run_sweep(spec(tiny_model_dir, "fp16", "bert-base-8gb", "checkpointing"))
    by_name = {r["recipe"]: r for r in rows}
    assert by_name["fp16"]["status"] == "error"
    assert "fp16" in by_name["fp16"]["message"] and "CPU" in by_name["fp16"]["message"]
    assert by_name["bert-base-8gb"]["status"] == "error"  # freezes 6 layers of a 2-layer model
    assert "layers" in by_name["bert-base-8gb"]["message"]
    assert by_name["checkpointing"]["status"] == "ok"
    assert by_name["checkpointing"]["memory_ratio_to_baseline"] < 1
    assert headline(rows).startswith("checkpointing: peak ")


def test_every_recipe_trains_the_same_effective_batch(tiny_model_dir):
    rows = run_sweep(spec(tiny_model_dir, "accumulate-4", steps=2))
    assert [r["micro_batch_size"] for r in rows] == [8, 2]
    assert [r["batch_size"] for r in rows] == [8, 8]
    assert all(r["timed_steps"] == 2 for r in rows)
    assert rows[0]["tokens_per_second"] / rows[0]["samples_per_second"] == pytest.approx(
        rows[1]["tokens_per_second"] / rows[1]["samples_per_second"]
    )  # the same samples, so the same real tokens per sample


def test_an_interrupted_sweep_keeps_its_finished_rows(tmp_path, tiny_model_dir):
    def interrupt(kind, info):
        if kind == "start" and info["index"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec(tiny_model_dir, "accumulate-4"), output_dir=tmp_path, on_event=interrupt)
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["recipe"] for r in rows] == ["baseline"]
    assert (tmp_path / "results.csv").read_text().splitlines()[1].startswith("baseline,ok,")


def test_a_failed_write_leaves_the_previous_results_whole(tmp_path, monkeypatch):
    writer = RowWriter(tmp_path)
    first = [{"recipe": "baseline", "status": "ok", "peak_allocated_bytes": 10}]
    writer.write(first)
    before = (tmp_path / "results.json").read_text()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr("tfmem.recipe.os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        writer.write(first + [{"recipe": "checkpointing", "status": "ok", "peak_allocated_bytes": 5}])
    assert (tmp_path / "results.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json"]  # no temporary left


def test_rows_have_the_keys_other_programs_read():
    row = report.normalise({"recipe": "x", "status": "ok"})
    assert set(report.REQUIRED_KEYS) <= set(row)


def test_bad_settings_are_refused_with_the_flag_named(tiny_model_dir):
    with pytest.raises(ValueError, match="--batch-size must be a positive"):
        spec(tiny_model_dir, batch_size=0)
    with pytest.raises(ValueError, match="--device 'tpu'"):
        spec(tiny_model_dir, device="tpu")


@pytest.fixture
def model_dir_with_tokenizer(tiny_model_dir):
    # Its tests read a dataset file, which goes through `datasets`: the GPU machines may lack it (skip there).
    pytest.importorskip("datasets", reason="the GPU machines may lack `datasets`")
    from pathlib import Path

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(100)]
    (Path(tiny_model_dir) / "vocab.txt").write_text("\n".join(words) + "\n")
    return tiny_model_dir


def test_a_dataset_file_is_profiled_with_its_real_lengths(tmp_path, model_dir_with_tokenizer):
    from transformers import AutoTokenizer

    from tfmem.profiler.batches import dataset_samples
    from tfmem.profiler.sweep import _steps

    lengths = [3, 40, 7, 12, 5, 9, 30, 4] * 2  # words per text
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "\n".join(f"{' '.join(['w1'] * n)},{i % 2}" for i, n in enumerate(lengths)) + "\n")
    s = spec(model_dir_with_tokenizer, "accumulate-4", dataset=str(data), batch_size=4, seq_len=64,
             memory_steps=2, steps=2)
    rows = run_sweep(s)
    assert [r["status"] for r in rows] == ["ok", "ok"]

    samples = dataset_samples(data, AutoTokenizer.from_pretrained(model_dir_with_tokenizer), 16, 64)
    ordered = _steps(samples, s)
    # Steps of 4 texts: words [3, 40, 7, 12], [5, 9, 30, 4], then the same again. The memory window gets
    # both steps holding the 40-word text (42 tokens with [CLS] and [SEP]), where a real run peaks...
    assert [max(len(x.input_ids) for x in group) for group in ordered] == [42, 42, 32, 32]
    # ...and tokens/s counts the real tokens of the timed steps, not a padded length.
    timed = [x for group in ordered[s.memory_steps + s.warmup_steps :] for x in group]
    per_sample = sum(len(x.input_ids) for x in timed) / len(timed)
    for row in rows:
        assert row["tokens_per_second"] / row["samples_per_second"] == pytest.approx(per_sample)


def test_the_longest_step_ends_the_memory_window_so_its_peak_holds_the_optimizer_state():
    # The first step runs forward and backward before the optimizer's state exists; a real run meets its
    # longest batch with the state allocated, so the profile must too (else 8-bit AdamW showed 1.00x).
    from tfmem.profiler.batches import Sample
    from tfmem.profiler.sweep import _steps

    samples = [Sample(torch.ones(n, dtype=torch.long), 0) for n in (5, 9, 40, 7, 30, 6, 8, 4)]
    s = SweepSpec(model="bert-tiny", recipes=(), batch_size=2, seq_len=64, steps=2, warmup_steps=0,
                  memory_steps=2, device="cpu", dataset="data.csv")
    ordered = _steps(samples, s)
    assert [max(len(x.input_ids) for x in group) for group in ordered] == [30, 40, 9, 8]


def test_auto_micro_batch_trains_where_the_plain_recipe_runs_out_of_memory(tmp_path, tiny_model_dir):
    auto = tmp_path / "auto.yaml"
    auto.write_text("name: auto\nauto_micro_batch: true\n")
    # The baseline's peak with a micro-batch of 8 does not fit; accumulate-4's (micro-batch 2) does.
    base, small = (r["peak_allocated_bytes"] for r in run_sweep(spec(tiny_model_dir, "accumulate-4")))
    limit = (base + small) // 2
    # Memory steps: the first splits 8 into 2, the second (now with AdamW's state) into 4, the third runs.
    s = SweepSpec(model=tiny_model_dir, recipes=(Recipe.load(str(auto)),), batch_size=8, seq_len=32, steps=1,
                  warmup_steps=0, memory_steps=3, device="cpu", max_memory_bytes=limit)
    rows = run_sweep(s)
    assert [(r["recipe"], r["status"]) for r in rows] == [("baseline", "oom"), ("auto", "ok")]
    assert rows[1]["message"] == "split each micro-batch of 8 into 4 after out-of-memory (same effective batch)"
    # The peak is a step that ran after the split, not the refused allocation that caused it.
    assert rows[1]["peak_allocated_bytes"] <= limit
    assert torch._C._len_torch_dispatch_stack() == 0


def test_a_batch_that_does_not_divide_by_a_recipes_accumulation_is_refused_up_front(tiny_model_dir):
    with pytest.raises(ValueError, match=r"--batch-size 10 does not divide by the 4 accumulation steps of recipe "
                                         r"'accumulate-4'.*use --batch-size 8 or 12"):
        spec(tiny_model_dir, "accumulate-4", batch_size=10)


def test_a_sequence_longer_than_the_models_positions_is_refused_before_training(tmp_path, monkeypatch):
    from transformers import RobertaConfig

    from tfmem.profiler import row

    folder = tmp_path / "tiny-roberta"
    # RoBERTa's positions start after the padding index: 34 positions hold 34 - (1 + 1) = 32 tokens.
    RobertaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=34, pad_token_id=1).save_pretrained(folder)
    assert [r["status"] for r in run_sweep(spec(str(folder), seq_len=32, steps=1))] == ["ok"]

    def must_not_train(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(row, "build_model", must_not_train)
    with pytest.raises(ValueError, match=r"`--seq-len` is 33 but tiny-roberta holds at most 32 tokens; use 32"):
        run_sweep(spec(str(folder), seq_len=33))


def test_an_empty_dataset_file_says_it_has_no_rows(tmp_path, model_dir_with_tokenizer):
    from tfmem.profiler.batches import DatasetError

    for content, message in (("text,label\n", "has no rows"), ("", "is empty")):
        data = tmp_path / "empty.csv"
        data.write_text(content)
        with pytest.raises(DatasetError, match=rf"--dataset '.*empty.csv' {message}"):
            run_sweep(spec(model_dir_with_tokenizer, dataset=str(data)))


def test_in_process_rows_free_a_mixed_precision_model_before_the_next_row(tiny_model_dir, monkeypatch):
    """The H200's irreproducible rows: accelerate's bf16/fp16 wrapping puts the model (and, with a GradScaler,
    the optimizer) in reference cycles, so without a collection after the row it outlived the row and was
    counted in whichever later row Python's collector happened to run in."""
    import gc
    import weakref

    from tfmem.profiler import row

    built = []
    real_build = row.build_model

    def build_and_remember(*args, **kwargs):
        model, source = real_build(*args, **kwargs)
        built.append(weakref.ref(model))
        return model, source

    monkeypatch.setattr(row, "build_model", build_and_remember)
    alive_at_next_start = []

    def on_event(kind, info):
        if kind == "start" and info["index"] > 0:
            alive_at_next_start.append(built[-1]() is not None)

    gc.disable()  # as between two automatic collections: only the sweep's own collection may free it
    try:
        rows = run_sweep(spec(tiny_model_dir, "bf16", "checkpointing", isolate=False), on_event=on_event)
    finally:
        gc.enable()
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    assert alive_at_next_start == [False, False]  # the baseline's model, then the bf16 row's
    assert torch._C._len_torch_dispatch_stack() == 0


def _trainer_peak(model_dir, recipe_name, batch_size, seq_len, steps, output_dir):
    """Peak live tensor bytes of a real `transformers.Trainer` run of `recipe_name` (its default optimizer),
    over the same steps a sweep measures, with the same samples (CPU, live-bytes accounting)."""
    from transformers import Trainer, TrainingArguments

    from tfmem.profiler.batches import micro_batches, synthetic_samples
    from tfmem.profiler.callback import MemoryProfilerCallback
    from tfmem.zoo import build_model, resolve

    config, _ = resolve(model_dir)
    samples = synthetic_samples(batch_size * steps, seq_len, config.vocab_size, seed=0)
    data = [{k: v[0] for k, v in b.items()} for b in micro_batches(samples, 1, pad_to=seq_len)]
    torch.manual_seed(0)
    model, _ = build_model(model_dir)
    recipe = Recipe.load(recipe_name)
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=batch_size,
                             max_steps=steps, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, dataloader_drop_last=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    recipe.apply(trainer)
    callback = MemoryProfilerCallback.attach(trainer, memory_steps=steps, warmup_steps=0)
    trainer.train()
    return callback.profiler.metrics(prefix="")["peak_allocated_bytes"]


def test_a_rows_peak_does_not_depend_on_order_steps_or_cli_and_matches_a_real_trainer(tmp_path, tiny_model_dir):
    from tfmem.cli import main

    alone = run_sweep(spec(tiny_model_dir, "checkpointing", include_baseline=False, memory_steps=3, steps=1))
    after_others = run_sweep(spec(tiny_model_dir, "bf16", "accumulate-4", "checkpointing", memory_steps=3, steps=3))
    assert main(["profile", "--model", tiny_model_dir, "--recipe", "low-memory", "checkpointing", "--batch-size", "8",
                 "--seq-len", "32", "--steps", "2", "--warmup-steps", "0", "--memory-steps", "3", "--device", "cpu",
                 "--output", str(tmp_path)]) == 0
    cli = json.loads((tmp_path / "results.json").read_text())
    peaks = [next(r for r in rows if r["recipe"] == "checkpointing")["peak_allocated_bytes"]
             for rows in (alone, after_others, cli)]
    assert peaks[0] == peaks[1] == peaks[2]
    assert {r["optimizer"] for r in alone + cli} == {"adamw_torch_fused"}  # what Trainer builds by default
    trainer = _trainer_peak(tiny_model_dir, "checkpointing", batch_size=8, seq_len=32, steps=3,
                            output_dir=tmp_path / "trainer")
    assert peaks[0] == pytest.approx(trainer, rel=0.01)  # measured: 1,171,744 vs 1,171,600 bytes


def test_each_row_trains_in_a_process_of_its_own_not_the_callers(tiny_model_dir, monkeypatch):
    """The leftovers of a row (the H200's 1.3 GB after an fp16 row) are allocator state that live-bytes on
    a CPU never shows; what can be pinned here is that no row builds its model in the calling process."""
    from tfmem.profiler import row as row_module

    built_here = []
    original = row_module.build_model
    monkeypatch.setattr(row_module, "build_model", lambda *a, **k: built_here.append(a) or original(*a, **k))
    rows = run_sweep(spec(tiny_model_dir, "bf16", "checkpointing"))
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    assert built_here == []
    run_sweep(spec(tiny_model_dir, "checkpointing", include_baseline=False, isolate=False))
    assert len(built_here) == 1  # the same patch does reach an in-process row


def test_a_row_keeps_transformers_loading_report_and_bar_quiet(tmp_path, capfd):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "with-weights"
    BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    capfd.readouterr()
    rows = run_sweep(spec(str(folder), "checkpointing", isolate=False))
    out, err = capfd.readouterr()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert "LOAD REPORT" not in out + err and "Loading weights" not in out + err


def test_a_recipe_that_freezes_every_layer_says_so_in_its_note(tiny_model_dir):
    # bert-base-8gb freezes 6 layers: all of a 6-layer model, so only the classifier head trains.
    rows = run_sweep(spec(tiny_model_dir, "bert-base-8gb", config_overrides={"num_hidden_layers": 6}))
    row = rows[1]
    assert row["status"] == "ok"
    assert row["message"] == "froze all 6 layers and the embeddings: only the head trains"


def test_a_row_whose_process_is_killed_is_an_error_row_and_the_sweep_goes_on(tiny_model_dir):
    """As the kernel's out-of-memory killer does it: SIGKILL to the row's process in the middle of its steps."""
    import multiprocessing
    import os
    import signal

    killed = []

    def on_event(kind, info):
        if kind == "step" and info["recipe"] == "baseline" and not killed:
            for process in multiprocessing.active_children():
                if process.name == "tfmem-profile-baseline":
                    os.kill(process.pid, signal.SIGKILL)
                    killed.append(process.pid)

    rows = run_sweep(spec(tiny_model_dir, "checkpointing", memory_steps=2, steps=2), on_event=on_event)
    assert killed
    assert [(r["recipe"], r["status"]) for r in rows] == [("baseline", "error"), ("checkpointing", "ok")]
    assert rows[0]["message"].startswith("the recipe's process was killed by SIGKILL (the system's out-of-memory killer")


def test_a_script_without_a_main_guard_can_call_run_sweep(tmp_path, tiny_model_dir):
    """Each row's process must not re-import the caller's script (it would run the sweep again, and
    multiprocessing refuses to start processes while one is bootstrapping: every row an error)."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "from tfmem import Recipe\nfrom tfmem.profiler.sweep import SweepSpec, run_sweep\n"
        f"rows = run_sweep(SweepSpec(model={tiny_model_dir!r}, recipes=(Recipe.load('checkpointing'),), batch_size=8, seq_len=32,"
        " steps=1, warmup_steps=0, memory_steps=1, device='cpu', include_baseline=False))\n"
        "print('STATUS', [r['status'] for r in rows])\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert "STATUS ['ok']" in done.stdout, done.stdout + done.stderr[-2000:]


def test_run_sweep_itself_refuses_a_results_folder_another_sweep_is_writing(tmp_path, tiny_model_dir):
    """Not only the CLI: a script or notebook calling run_sweep must not overwrite another sweep's rows."""
    import fcntl

    from tfmem.profiler.output_lock import LOCK_NAME, OutputLocked

    with open(tmp_path / LOCK_NAME, "w") as held:  # as another process's running sweep holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        with pytest.raises(OutputLocked, match="PID 4242"):
            run_sweep(spec(tiny_model_dir, "checkpointing", include_baseline=False), tmp_path)
    assert not (tmp_path / "results.json").exists()
