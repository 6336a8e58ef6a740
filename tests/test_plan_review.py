"""Review fixes to `tfmem plan` / `tfmem estimate`: options a sharded run would ignore are refused,
the sharded table agrees with its Chosen line, `--measure` times the loop it planned and writes nothing
that did not fit, `--overhead 0GiB`, and the --allow-optimizer hint's headroom."""

from __future__ import annotations

import pytest

from tfmem.cli import main

TINY = ["--model", "bert-tiny", "--batch-size", "8", "--seq-len", "16"]


# -- 1. --gpus N refuses what the sharded path would ignore ------------------------------------------------

@pytest.mark.parametrize("extra, flag", [
    (["--allow-freeze", "1"], "--allow-freeze"), (["--allow-optimizer", "adafactor"], "--allow-optimizer"),
    (["--no-padding"], "--no-padding"), (["--keep", "3"], "--keep"), (["--measure"], "--measure"),
])
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
    monkeypatch.setattr(sharding_module, "plan_sharded", lambda *a, **k: result)
    rc = main(["plan", "--device", "cpu", "--model", "bert-mini", "--batch-size", "4", "--seq-len", "32",
               "--budget", "170MiB", "--gpus", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    chosen = re.search(r"predicted peak ([0-9.]+ \wiB) per GPU, headroom ([0-9.]+ \wiB)", " ".join(out.split()))
    row = next(line for line in out.splitlines() if line.startswith("│ 1 "))
    assert chosen.group(1) in row and chosen.group(2) in row and "~" not in row, (row, chosen.groups())
    assert re.search(r"│ 2 .*~", out) and "~: extrapolated" in out
