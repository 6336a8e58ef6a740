"""Review fixes to `tfmem plan` / `tfmem estimate`: options a sharded run would ignore are refused,
the sharded table agrees with its Chosen line, `--measure` times the loop it planned and writes nothing
that did not fit, `--overhead 0GiB`, and the --allow-optimizer hint's headroom."""

from __future__ import annotations

import pytest

from tfmem.cli import main

TINY = ["--model", "bert-tiny", "--batch-size", "8", "--seq-len", "16"]


# -- 1. --gpus N refuses what the sharded path would ignore ------------------------------------------------

@pytest.mark.parametrize("extra, flag", [
    (["--no-padding"], "--no-padding"), (["--keep", "3"], "--keep"), (["--measure"], "--measure"),
])  # --allow-freeze and --allow-optimizer are searched on N GPUs (tests/test_sharded_plan.py)
def test_sharded_plan_refuses_options_it_would_ignore(extra, flag, capsys):
    rc = main(["plan", *TINY, "--budget", "1GiB", "--gpus", "2", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and "--gpus 2" in err


def test_sharded_estimate_refuses_no_padding(capsys):
    rc = main(["estimate", *TINY, "--gpus", "2", "--no-padding"])
    err = capsys.readouterr().err
    assert rc == 2 and "--no-padding" in err


@pytest.mark.parametrize("command", ["estimate", "plan"])
def test_batch_that_does_not_split_over_gpus_is_a_plain_usage_error(command, capsys):
    extra = ["--budget", "1GiB"] if command == "plan" else []
    rc = main([command, "--model", "bert-tiny", "--batch-size", "32", "--seq-len", "16", "--gpus", "3", *extra])
    captured = capsys.readouterr()
    assert rc == 2 and "--batch-size 32" in captured.err and "--gpus 3" in captured.err
    assert "Invalid recipe" not in captured.err + captured.out


# -- 2. the sharded table prints the chosen row at full depth, as its Chosen line does ----------------------

def test_sharded_table_row_of_the_chosen_recipe_matches_the_chosen_line(capsys, monkeypatch):
    import re

    import tfmem.estimate.sharding as sharding_module

    # bert-mini has 4 layers: FSDP rows are extrapolated from 2- and 3-layer copies, the chosen one is not.
    result = sharding_module.plan_sharded("bert-mini", 4, 32, 170 * 2**20, 2, "cpu", strategies=("fsdp",))
    assert result.chosen is not None and not result.chosen.extrapolated
    assert result.fitting[0] == result.chosen and any(c.extrapolated for c in result.fitting[1:])
    rows = result.to_dict()["fitting"]
    assert rows[0]["extrapolated"] is False and any(r["extrapolated"] for r in rows[1:])  # --json says so too
    monkeypatch.setattr(sharding_module, "plan_sharded", lambda *a, **k: result)
    rc = main(["plan", "--device", "cpu", "--model", "bert-mini", "--batch-size", "4", "--seq-len", "32",
               "--budget", "170MiB", "--gpus", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    chosen = re.search(r"predicted peak ([0-9.]+ \wiB) per GPU, headroom ([0-9.]+ \wiB)", " ".join(out.split()))
    row = next(line for line in out.splitlines() if line.startswith("│ 1 "))
    assert chosen.group(1) in row and chosen.group(2) in row and "~" not in row, (row, chosen.groups())
    assert re.search(r"│ 2 .*~", out) and "~: extrapolated" in out


# -- 3. --measure times the loop that was planned ---------------------------------------------------------

def test_measure_loop_uses_the_recipes_optimizer_padded_batches_and_clips(monkeypatch):
    import torch

    from tfmem.estimate.measure import time_steps
    from tfmem.recipe import Recipe

    clipped = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, n, *a, **k: clipped.append(n) or real_clip(p, n))
    recipe = Recipe(name="x").replace(optimizer="adafactor")
    out = time_steps("bert-tiny", recipe.to_dict(), 4, 16, steps=1, warmup=1, device="cpu")
    assert out["optimizer"] == "Adafactor" and out["padding_fraction"] > 0 and clipped == [1.0, 1.0]
    packed = time_steps("bert-tiny", Recipe().to_dict(), 4, 16, steps=1, warmup=1, device="cpu", padded=False)
    assert packed["optimizer"] == "AdamW" and packed["padding_fraction"] == 0


def test_measure_passes_the_plans_padding_and_a_hung_candidate_times_out(monkeypatch):
    import subprocess

    import tfmem.estimate.measure as measure_module
    from tfmem.estimate.plan import plan

    jobs = []

    def fake_run(cmd, **kwargs):
        jobs.append((__import__("json").loads(cmd[-1]), kwargs))
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(measure_module.subprocess, "run", fake_run)
    p = plan("bert-tiny", 2, 16, 2**30, "cpu", padded=False)
    out = measure_module.measure(p, 1)
    assert jobs[0][0]["padded"] is False and jobs[0][1]["timeout"] == measure_module.TIMEOUT_S
    assert out[0].error == f"timed out after {measure_module.TIMEOUT_S:g} s" and not out[0].fits


# -- 4. --measure writes nothing that did not fit when measured -------------------------------------------

@pytest.mark.parametrize("as_json", [False, True])
def test_measure_where_nothing_fits_measured_writes_nothing_and_fails(as_json, tmp_path, capsys, monkeypatch):
    import json

    from tfmem.estimate import measure as measure_module

    monkeypatch.setattr(measure_module, "gpu_problem", lambda capability: None)
    monkeypatch.setattr(measure_module, "run_in_subprocess",
                        lambda model, c, batch, seq: {"step_seconds": 0.1, "reserved_bytes": 5 * 2**30})
    path = tmp_path / "measured.yaml"
    rc = main(["plan", "--model", "bert-tiny", "--batch-size", "4", "--seq-len", "32", "--gpu", "h100",
               "--budget", "4GiB", "--measure", "2", "-o", str(path), *(["--json"] if as_json else [])])
    out = capsys.readouterr().out
    assert rc == 1 and not path.exists()
    if as_json:
        assert json.loads(out)["chosen_after_measuring"] is None
    else:
        assert "Nothing fits when measured" in " ".join(out.split()) and "Chosen:" not in out


# -- 5. --overhead 0 in any unit ------------------------------------------------------------------------

@pytest.mark.parametrize("zero", ["0", "0GiB", "0.0MB", "0 B"])
def test_zero_overhead_reads_in_any_unit(zero, capsys):
    import json

    from tfmem.profiler.units import SizeError, parse_bytes

    assert parse_bytes(zero, field="--overhead", allow_zero=True) == 0
    with pytest.raises(SizeError, match="must be positive"):
        parse_bytes(zero, field="--budget")
    rc = main(["plan", "--gpu", "h100", *TINY, "--budget", "1GiB", "--overhead", zero, "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["overhead_bytes"] == 0


def test_negative_overhead_is_refused(capsys):
    rc = main(["plan", "--gpu", "h100", *TINY, "--budget", "1GiB", "--overhead=-1GiB"])
    assert rc == 2 and "--overhead '-1GiB' must be zero or positive" in capsys.readouterr().err


# -- 6. the --allow-optimizer hint shows the headroom it would leave ---------------------------------------

def test_allow_optimizer_hint_shows_the_headroom_the_lighter_optimizer_leaves(capsys):
    from dataclasses import replace

    from tfmem.cli.plan import headroom_text
    from tfmem.estimate.device import device_profile
    from tfmem.estimate.plan import plan, with_lighter_optimizers

    device = device_profile("cpu")
    tight = plan("bert-tiny", 8, 128, 1, device, verify=False)
    lighter = with_lighter_optimizers("bert-tiny", tight, device)
    # A budget the lightest fits with a few bytes to spare: its need rounds to the budget itself.
    budget = min(c.needed_bytes for c in lighter) + 1
    assert main(["plan", "--model", "bert-tiny", "--batch-size", "8", "--seq-len", "128", "--device", "cpu",
                 "--budget", str(budget)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    best = next(c for c in lighter if c.needed_bytes <= budget)
    best = replace(best, headroom_bytes=budget - best.needed_bytes)  # 1 B: "1 B", never a rounded need
    assert f"is predicted to leave {headroom_text(best)} headroom)" in out, out
