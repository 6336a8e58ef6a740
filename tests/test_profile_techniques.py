"""`tfmem profile` runs each recipe's own optimizer, refuses TF32 on the CPU as a row, and groups by length."""

from __future__ import annotations

from tfmem.profiler import row
from tfmem.profiler.sweep import SweepSpec, run_sweep
from tfmem.recipe import Recipe


def spec(model_dir, *recipes, **kwargs) -> SweepSpec:
    values = dict(model=model_dir, recipes=recipes, batch_size=8, seq_len=32, steps=1, warmup_steps=0,
                  memory_steps=2, device="cpu")
    values.update(kwargs)
    return SweepSpec(**values)


def test_a_profile_row_trains_with_the_recipes_optimizer_and_tf32_is_not_run_on_cpu(tiny_model_dir):
    adafactor = Recipe.from_dict({"name": "adafactor", "optimizer": "adafactor"})
    rows = {r["recipe"]: r for r in run_sweep(spec(tiny_model_dir, adafactor, Recipe.load("tf32")))}
    assert rows["adafactor"]["status"] == "ok"
    # The baseline's AdamW state is 8 bytes per parameter; Adafactor's a few bytes per row and column.
    assert rows["adafactor"]["peak_optimizer_state_bytes"] < rows["baseline"]["peak_optimizer_state_bytes"] / 10
    assert rows["tf32"]["message"].startswith("not run: `tf32` is true but training runs on the CPU")
    # Each row names the optimizer it trained with (results.json / results.csv), not the Trainer's default.
    assert rows["adafactor"]["optimizer"] == "adafactor"
    assert rows["baseline"]["optimizer"] in ("adamw_torch_fused", "adamw_torch")


def test_a_grouped_recipe_is_profiled_on_length_grouped_steps(tiny_model_dir, monkeypatch):
    seen = []
    original = row.micro_batches

    def record(samples, micro, pad_to, pad_id):
        seen.append([len(s.input_ids) for s in samples])
        return original(samples, micro, pad_to, pad_id)

    monkeypatch.setattr(row, "micro_batches", record)  # seen in this process: isolate=False below
    grouped = Recipe.from_dict({"name": "grouped", "group_by_length": True})
    run_sweep(spec(tiny_model_dir, grouped, include_baseline=False, steps=3, memory_steps=1, isolate=False))
    # Synthetic samples have lengths between half and all of seq_len; grouped steps are sorted runs.
    assert seen and all(max(step) - min(step) < 8 for step in seen), seen
