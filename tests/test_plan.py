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
    t4 = plan(cfg(), 1, 16, 10**12, device_profile(gpu="t4"), verify=False)
    assert {c.recipe.mixed_precision for c in t4.fitting} == {"no", "fp16"}
    a100 = plan(cfg(), 1, 16, 10**12, device_profile(gpu="a100"), verify=False)
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


def test_gpu_plan_explains_its_ranking_with_the_gpu_defaults(capsys):
    rc = main(["plan", "--gpu", "t4", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16", "--budget", "1MiB"])
    out = _text(capsys.readouterr().out)
    assert rc == 1
    assert "16-bit x0.5 on tensor-core GPUs, each micro-batch costs ~2048 tokens of fixed overhead" in out
    assert "EPYC" not in out and "or a larger GPU." in out


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
