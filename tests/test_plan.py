"""plan: keeps the effective batch, never freezes unless allowed, says when nothing fits, writes a loadable recipe."""

from __future__ import annotations

import json

import pytest
from _real_step import batch_for, run_steps
from transformers import BertConfig

from tfmem.cli import main
from tfmem.estimate import estimate_memory
from tfmem.estimate.device import device_profile
from tfmem.estimate.plan import plan
from tfmem.recipe import Recipe

MiB = 2**20


def cfg() -> BertConfig:
    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      vocab_size=500, max_position_embeddings=128, num_labels=2)


def test_plan_keeps_effective_batch_and_fits():
    base = estimate_memory(cfg(), None, 8, 128, device="cuda")
    budget = base.reserved_bytes - base.activations_bytes // 2  # the baseline does not fit
    p = plan(cfg(), 8, 128, budget, "cuda", overhead_bytes=0)
    assert p.chosen is not None and p.fitting
    for c in p.fitting:
        assert c.estimate.micro_batch_size * c.recipe.gradient_accumulation_steps == 8
        assert c.needed_bytes <= budget
        assert not c.recipe.freeze.enabled
    assert p.chosen_estimate.peak_bytes <= budget
    times = [c.relative_time for c in p.fitting]
    assert times == sorted(times)


def test_plan_never_freezes_without_permission_and_may_with_it():
    tight = 1 * MiB
    p = plan(cfg(), 2, 32, tight, "cuda", overhead_bytes=0, verify=False)
    assert all(not c.recipe.freeze.enabled for c in p.fitting + p.not_fitting)
    allowed = plan(cfg(), 2, 32, tight, "cuda", overhead_bytes=0, allow_freeze=2, verify=False)
    assert any(c.recipe.freeze.enabled for c in allowed.fitting + allowed.not_fitting)


def test_plan_precision_follows_the_device():
    t4 = plan(cfg(), 1, 16, 10**12, device_profile(gpu="t4"), verify=False, keep=4)
    assert {c.recipe.mixed_precision for c in t4.fitting} == {"no", "fp16"}
    a100 = plan(cfg(), 1, 16, 10**12, device_profile(gpu="a100"), verify=False, keep=4)
    assert {c.recipe.mixed_precision for c in a100.fitting} == {"no", "bf16"}


def test_nothing_fits_says_so_and_names_the_closest(capsys):
    rc = main(["plan", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16", "--budget", "1MiB"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "Nothing fits" in out and "Closest:" in out


def test_plan_writes_a_recipe_that_loads(tmp_path, capsys):
    path = tmp_path / "planned.yaml"
    rc = main(["plan", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "32", "--budget", "2GiB",
               "--output", str(path), "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    recipe = Recipe.from_yaml(path)
    assert recipe.to_dict() == data["chosen"]["recipe"]
    assert data["chosen"]["micro_batch_size"] * recipe.gradient_accumulation_steps == 2


def test_chosen_recipe_measures_within_5_percent_of_its_prediction():
    # Plan for the CPU, then train the chosen recipe for real under the profiler and compare.
    import torch
    from transformers import AutoModelForSequenceClassification

    from tfmem.profiler.session import Profiler

    full = estimate_memory(cfg(), None, 8, 64, device="cpu").peak_bytes
    p = plan(cfg(), 8, 64, int(full * 0.8), "cpu")
    assert p.chosen is not None
    recipe = p.chosen.recipe
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg(), attn_implementation="sdpa")
    recipe.prepare_model(model)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    batch = batch_for(recipe, 8, 64)
    profiler = Profiler(model, opt, device="cpu", memory_steps=2, warmup_steps=0)
    run_steps(model, opt, batch, recipe, step_context=profiler.step)
    measured = profiler.metrics()["tfmem/peak_allocated_bytes"]
    predicted = p.chosen_estimate.peak_bytes
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)
    assert measured <= p.budget_bytes


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="allow-freeze"):
        plan(cfg(), 4, 32, 10**9, "cuda", allow_freeze=9)
    with pytest.raises(ValueError, match="budget"):
        plan(cfg(), 4, 32, 0, "cuda")


def _text(out: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(out.split())


def test_cpu_plan_explains_its_ranking_with_the_measured_cpu_constants(capsys):
    rc = main(["plan", "--device", "cpu", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16", "--budget", "1MiB"])
    out = _text(capsys.readouterr().out)
    assert rc == 1 and "Nothing fits" in out
    assert "bf16 x0.66 and a fixed cost of ~48 tokens per micro-batch, measured on a 2-core EPYC" in out
    assert "tensor-core" not in out and "2048" not in out
    assert "or a larger --budget if the machine has the memory." in out and "GPU" not in out


def test_gpu_plan_says_its_speed_constants_are_scaled_not_measured_off_capability_9(capsys):
    rc = main(["plan", "--gpu", "t4", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16", "--budget", "1MiB"])
    out = _text(capsys.readouterr().out)
    assert rc == 1
    assert "constants for capability 7.5: not measured: the 9.0 fit scaled by T4 vs H100 SXM datasheet ratios" in out
    assert "EPYC" not in out and "or a larger GPU." in out
    rc = main(["plan", "--gpu", "h100", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16", "--budget", "1MiB"])
    out = _text(capsys.readouterr().out)
    assert "constants for capability 9.0: fitted to step times measured on an H200 (speed-grid.json)" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1.5", r"--budget '1.5' is not a whole number of bytes \(a number without a unit counts bytes\); give a unit, "
                r"e\.g\. 1\.5GiB"),
        ("1.5B", r"--budget '1.5B' is not a whole number of bytes"),
        ("-5GiB", r"--budget '-5GiB' must be positive; write it like 8GiB"),
        ("0", r"--budget '0' must be positive"),
        ("lots", r"--budget 'lots' is not a size; write it like 8GiB"),
        ("5 parsecs", r"--budget '5 parsecs' is not a size"),
    ],
)
def test_parse_bytes_refuses_with_the_field_the_value_and_a_fix(text, message):
    from tfmem.profiler.units import SizeError, parse_bytes

    with pytest.raises(SizeError, match=message):
        parse_bytes(text, field="--budget")


def test_parse_bytes_reads_the_forms_the_cli_documents():
    from tfmem.profiler.units import parse_bytes

    assert parse_bytes("8GiB") == parse_bytes("8 gib") == parse_bytes("8G") == 8 * 2**30
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("1.1GB") == 1_100_000_000  # exact, not float
    assert parse_bytes("1048576") == parse_bytes("1.0MiB") == parse_bytes("+1MiB") == MiB
    assert parse_bytes("0.5KiB") == 512


def test_fractional_budget_without_a_unit_is_a_cli_error(capsys):
    # Before: `--budget 1.5` was read as 1 byte and the plan reported that nothing fits in "1 B".
    rc = main(["plan", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16", "--budget", "1.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "--budget '1.5' is not a whole number of bytes" in err and len(err.strip().splitlines()) == 1


# --- issue 7.3: the measured-fastest recipe that fits (H200 speed-grid.json, see README) -------------------

GiB = 2**30


@pytest.mark.parametrize(
    ("model", "budget_gib", "precision", "checkpointing", "micro"),
    [
        ("bert-base-uncased", 4, "bf16", True, 32),   # measured 77 ms, 2.6 GiB
        ("bert-base-uncased", 8, "bf16", False, 16),  # measured 50 ms, 5.4 GiB (checkpointed 32: 77 ms)
        ("bert-large-uncased", 8, "bf16", True, 32),  # measured 150 ms, 6.3 GiB (before: micro 8, 429 ms)
    ],
)
def test_h100_plan_picks_the_measured_fastest_recipe_that_fits(model, budget_gib, precision, checkpointing, micro):
    p = plan(model, 32, 512, budget_gib * GiB, "cuda", gpu="h100", keep=1)
    assert p.chosen is not None
    recipe = p.chosen.recipe
    assert (recipe.mixed_precision, recipe.gradient_checkpointing, p.chosen.estimate.micro_batch_size) == (
        precision, checkpointing, micro), recipe.summary()


def test_extrapolated_reserved_stays_near_the_full_depth_figure():
    # Before: the allocator's cached slack was extrapolated linearly in depth (9.1 GiB for a 6.5 GiB step),
    # which hid bert-large bf16 + checkpointing at micro-batch 32 from an 8 GiB plan.
    recipe = Recipe(name="x").replace(gradient_checkpointing=True, mixed_precision="bf16")
    h100 = device_profile(gpu="h100")
    shallow = estimate_memory("bert-large-uncased", recipe, 32, 512, h100, extrapolate_depth=True)
    full = estimate_memory("bert-large-uncased", recipe, 32, 512, h100)
    assert shallow.peak_bytes == full.peak_bytes
    assert abs(shallow.reserved_bytes - full.reserved_bytes) < 0.02 * full.reserved_bytes


def test_search_space_is_one_list_and_offers_tf32_only_where_it_runs():
    import importlib

    plan_module = importlib.import_module("tfmem.estimate.plan")  # the module; the package exports the function
    search_space = plan_module.search_space

    h100 = {(p.precision, p.tf32) for p in search_space(device_profile(gpu="h100"))}
    assert h100 == {("no", False), ("no", True), ("bf16", False)}
    t4 = {(p.precision, p.tf32) for p in search_space(device_profile(gpu="t4"))}
    assert t4 == {("no", False), ("fp16", False)}  # no TF32 before Ampere
    cpu = {(p.precision, p.tf32) for p in search_space(device_profile("cpu"))}
    assert ("no", True) not in cpu


# --- issue 7.2: the speed model ----------------------------------------------------------------------------

def _speed_case(model: str, precision: str = "no", checkpointing: bool = False, micro: int = 32,
                tf32: bool = False, gpu: str = "h100") -> float:
    from tfmem.estimate.speed import ModelShape, SpeedModel
    from tfmem.zoo import model_config

    recipe = Recipe(name="x").replace(mixed_precision=precision, gradient_checkpointing=checkpointing,
                                      gradient_accumulation_steps=32 // micro)
    return SpeedModel().step_seconds(recipe, ModelShape.of(model_config(model)), 32, 512, device_profile(gpu=gpu),
                                     tf32=tf32)


def test_speed_model_small_16bit_micro_batches_are_launch_bound():
    # H200 grid: bf16 micro 8 = 151 ms, micro 32 = 38 ms for the same 32 samples (4x).
    assert _speed_case("bert-base-uncased", "bf16", micro=8) > 3 * _speed_case("bert-base-uncased", "bf16", micro=32)
    # fp32 is compute-bound: micro 8 costs only a little more (measured 255 vs 224 ms).
    ratio = _speed_case("bert-base-uncased", micro=8) / _speed_case("bert-base-uncased", micro=32)
    assert 1.0 < ratio < 1.25


def test_speed_model_depends_on_model_size_precision_and_checkpointing():
    base, large = _speed_case("bert-base-uncased"), _speed_case("bert-large-uncased")
    assert 2.5 < large / base < 4  # measured 728 / 224 ms
    assert _speed_case("bert-base-uncased", tf32=True) < 0.6 * base  # measured 0.40x
    assert _speed_case("bert-base-uncased", "bf16") < 0.25 * base  # measured 0.17x
    ckpt = _speed_case("bert-large-uncased", checkpointing=True) / large
    assert 1.25 < ckpt < 1.4  # one more forward: measured 1.33x
    assert _speed_case("bert-base-uncased", tf32=True, gpu="t4") == _speed_case("bert-base-uncased", gpu="t4")  # fp32


def test_speed_model_frozen_layers_cost_less():
    from tfmem.estimate.speed import SpeedModel

    h100 = device_profile(gpu="h100")
    full = SpeedModel().step_seconds(Recipe(name="x"), 12, 32, 512, h100)
    frozen = SpeedModel().step_seconds(Recipe(name="x").replace(freeze={"embeddings": True, "layers": 6}), 12, 32,
                                       512, h100)
    assert frozen < 0.8 * full


def test_speed_constants_off_capability_9_are_labelled_as_not_measured():
    from tfmem.estimate.speed import GpuConstants

    assert GpuConstants.for_capability((9, 0)).measured
    a100 = GpuConstants.for_capability((8, 0))
    assert not a100.measured and "not measured" in a100.source
    assert a100.throughput_flops["bf16"] < GpuConstants.for_capability((9, 0)).throughput_flops["bf16"]


def test_speed_benchmark_scores_a_grid_file_offline(tmp_path, capsys, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    rows = [{"model": "bert-base", "ckpt": ckpt, "prec": prec, "micro": micro, "step_s": seconds}
            for ckpt, prec, micro, seconds in [(False, "fp32", 32, 0.224), (False, "bf16", 32, 0.038),
                                               (False, "bf16", 8, 0.151), (True, "bf16", 32, 0.077)]]
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(rows))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_model.py"
    spec = importlib.util.spec_from_file_location("speed_model_benchmark", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["speed_model.py", "--grid", str(grid)])
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("bert-base bf16 m8") for line in lines)
    assert lines[-1].startswith("speed model: largest ratio error") and "pairs ordered wrongly" in lines[-1]


# --- issue 7.4: plan --measure -----------------------------------------------------------------------------

def test_measure_refuses_in_one_line_without_the_gpu(capsys):
    rc = main(["plan", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16", "--gpu", "h100", "--measure"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--measure needs the target GPU here" in err


def test_measure_reranks_by_measured_time_and_checks_the_budget():
    from tfmem.estimate.measure import measure

    p = plan(cfg(), 8, 128, 10**12, "cuda", gpu="h100", overhead_bytes=0, verify=False, keep=4)
    assert len(p.fitting) >= 3
    first, second, third = p.fitting[:3]
    fake = {id(first): {"step_seconds": 0.30, "reserved_bytes": 10**6},
            id(second): {"step_seconds": 0.10, "reserved_bytes": 10**6},
            id(third): {"step_seconds": 0.05, "reserved_bytes": 2 * 10**12}}  # fastest, but over the budget
    out = measure(p, 3, run=lambda model, c, batch, seq: fake[id(c)])
    assert [m.candidate for m in out] == [second, first, third]
    assert [m.fits for m in out] == [True, True, False]
    assert out[0].step_seconds == 0.10 and out[0].candidate.step_seconds is not None  # predicted kept beside


def test_plan_measure_prints_predicted_vs_measured_and_writes_the_measured_choice(tmp_path, capsys, monkeypatch):
    from tfmem.estimate import measure as measure_module

    monkeypatch.setattr(measure_module, "gpu_problem", lambda capability: None)
    calls = []

    def fake_run(model, c, batch, seq):
        calls.append(c)
        return {"step_seconds": 0.5 if len(calls) == 1 else 0.1, "reserved_bytes": 100 * 2**20}

    monkeypatch.setattr(measure_module, "run_in_subprocess", fake_run)
    path = tmp_path / "measured.yaml"
    rc = main(["plan", "--model", "bert-tiny", "--batch-size", "4", "--seq-len", "32", "--gpu", "h100",
               "--budget", "4GiB", "--measure", "2", "-o", str(path)])
    out = _text(capsys.readouterr().out)
    assert rc == 0 and len(calls) == 2
    assert "Measured on this GPU, fastest first (re-ranked)" in out and "500 ms" in out and "100 ms" in out
    assert Recipe.from_yaml(path).to_dict() == calls[1].recipe.to_dict()  # the one measured faster


def test_measure_loop_trains_a_planned_recipe():
    # The loop each --measure process runs, here on CPU (the GPU figures are checked by gpu_checks.sh).
    from tfmem.estimate.measure import time_steps

    recipe = Recipe(name="x").replace(gradient_accumulation_steps=2, gradient_checkpointing=True)
    out = time_steps("bert-tiny", recipe.to_dict(), 4, 16, steps=1, warmup=1, device="cpu")
    assert out["step_seconds"] > 0 and out["reserved_bytes"] is None


# --- issue 9: plan CLI -------------------------------------------------------------------------------------

def _no_planning(monkeypatch):
    import tfmem.estimate.plan as plan_module  # cli/plan.py imports the planner when it runs

    def fail(*args, **kwargs):
        raise AssertionError("planned before refusing")

    monkeypatch.setattr(plan_module, "plan", fail)


def test_output_into_a_directory_is_refused_before_planning(tmp_path, capsys, monkeypatch):
    _no_planning(monkeypatch)
    rc = main(["plan", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16", "--budget", "1GiB",
               "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "is a directory; give a file name" in err and len(err.strip().splitlines()) == 1


def test_output_where_nothing_can_be_written_is_refused_before_planning(tmp_path, capsys, monkeypatch):
    _no_planning(monkeypatch)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for path, words in ((a_file / "planned.yaml", "is not a directory"),
                        (tmp_path / "missing" / "planned.yaml", "does not exist"),
                        ("/proc/planned.yaml", "cannot write in")):
        rc = main(["plan", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16", "--budget", "1GiB",
                   "-o", str(path)])
        err = capsys.readouterr().err
        assert rc == 2 and words in err, err


@pytest.mark.parametrize("size", ["0", "-1"])
def test_bad_batch_size_gets_the_message_estimate_gives(size, capsys):
    rc_plan = main(["plan", "--model", "bert-tiny", "--batch-size", size, "--seq-len", "16", "--budget", "1GiB"])
    plan_err = capsys.readouterr().err
    rc_estimate = main(["estimate", "--model", "bert-tiny", "--batch-size", size, "--seq-len", "16"])
    estimate_err = capsys.readouterr().err
    assert rc_plan == rc_estimate == 2
    assert plan_err.replace("tfmem plan", "tfmem estimate") == estimate_err
    assert "Nothing fits" not in plan_err


def test_table_and_chosen_line_print_the_same_headroom(capsys):
    # bert-mini has 4 layers: candidates are screened by depth extrapolation, and a chosen one with little
    # headroom is re-estimated at full depth; the table used to show the screening figure and the line
    # below it the full-depth one (1.4 GiB vs 1.3 GiB in the issue).
    loose = plan("bert-mini", 8, 128, 2**31, "cuda", gpu="h100")
    budget = loose.chosen.needed_bytes + 32 * MiB  # within the verification margin
    rc = main(["plan", "--model", "bert-mini", "--batch-size", "8", "--seq-len", "128", "--gpu", "h100",
               "--budget", str(budget)])
    out = capsys.readouterr().out
    assert rc == 0
    row = next(line for line in out.splitlines() if line.startswith("│ 1 "))
    table_headroom = [cell.strip() for cell in row.split("│")][6]
    chosen = _text(out).split("Chosen:")[1]
    assert "(fake step)" in chosen  # confirmed at full depth
    assert f"headroom {table_headroom}." in chosen, (table_headroom, chosen)


def test_full_depth_confirmation_runs_only_when_the_headroom_is_small():
    from tfmem.estimate.plan import verify_margin

    loose = plan("bert-mini", 8, 128, 2**31, "cuda", gpu="h100")
    assert loose.chosen.headroom_bytes >= verify_margin(loose.chosen.needed_bytes)
    assert loose.chosen_estimate.method.startswith("fake steps of")  # extrapolated: ample headroom
    tight = plan("bert-mini", 8, 128, loose.chosen.needed_bytes + 32 * MiB, "cuda", gpu="h100")
    assert tight.chosen_estimate.method == "fake step"
