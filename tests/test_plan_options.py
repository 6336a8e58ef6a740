"""`tfmem plan` options: --no-padding reaches every estimate, TF32 candidates where they run, the
--allow-optimizer hint when nothing fits, and `tfmem plan --help` without torch."""

from __future__ import annotations

import functools
import json
import re

import pytest

from tfmem.cli import build_parser, main
from tfmem.estimate.device import device_profile
from tfmem.estimate.plan import plan, with_lighter_optimizers
from tfmem.recipe import Recipe

TINY = ["--model", "bert-tiny", "--batch-size", "8", "--seq-len", "128"]


def _help_of(command: str, option: str) -> str:
    parser = build_parser([command])
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return next(a for a in sub._actions if option in a.option_strings).help


# -- --no-padding ------------------------------------------------------------------------------------------

def test_plan_and_estimate_document_no_padding_alike():
    assert _help_of("plan", "--no-padding") == _help_of("estimate", "--no-padding")


def test_no_padding_reaches_every_estimate_of_a_plan_and_its_full_depth_check(monkeypatch):
    import tfmem.estimate.plan as plan_module

    calls = []
    real = plan_module.estimate_memory

    def spy(*args, **kwargs):
        calls.append((kwargs.get("padded", True), kwargs.get("extrapolate_depth", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_module, "estimate_memory", spy)
    roomy = plan("bert-tiny", 8, 128, 10**12, device_profile(gpu="h100"), padded=False)
    # A budget the chosen recipe fits by 1 MiB: within the extrapolation's margin, so it is confirmed at full depth.
    p = plan("bert-tiny", 8, 128, roomy.chosen.needed_bytes + 2**20, device_profile(gpu="h100"), padded=False)
    assert p.chosen is not None and p.padded is False and p.to_dict()["padded"] is False
    assert calls and {padded for padded, _ in calls} == {False}
    assert any(not extrapolated for _, extrapolated in calls)  # the full-depth confirmation ran, unpadded too
    # The nothing-fits hint's estimates follow the plan's padding as well.
    calls.clear()
    tight = plan("bert-tiny", 8, 128, 1, device_profile(gpu="h100"), padded=False, verify=False)
    assert with_lighter_optimizers("bert-tiny", tight, device_profile(gpu="h100"))
    assert calls and {padded for padded, _ in calls} == {False}


def test_cli_no_padding_plans_with_unpadded_estimates(capsys):
    """On CUDA an unpadded batch has no attention mask to keep: the chosen recipe's peak is the
    `tfmem estimate --no-padding` figure of that recipe, and below the padded one."""
    from tfmem.estimate import estimate_memory

    args = ["plan", *TINY, "--gpu", "h100", "--budget", "40GiB", "--json"]
    assert main([*args, "--no-padding"]) == 0
    unpadded = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    padded = json.loads(capsys.readouterr().out)
    assert unpadded["padded"] is False and padded["padded"] is True
    recipe = Recipe.from_dict(unpadded["chosen"]["recipe"])
    profile = device_profile(gpu="h100")
    expected = estimate_memory("bert-tiny", recipe, 8, 128, profile, padded=False, extrapolate_depth=True)
    assert unpadded["chosen"]["peak_bytes"] == expected.peak_bytes
    assert padded["chosen"]["summary"] == unpadded["chosen"]["summary"]
    assert unpadded["chosen"]["peak_bytes"] < padded["chosen"]["peak_bytes"]


# -- TF32 --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target, tf32_expected", [
    (["--gpu", "h100"], True),
    (["--gpu", "a100"], True),
    (["--gpu-capability", "8.0"], True),
    (["--gpu-capability", "7.5"], False),
    (["--gpu", "t4"], False),
    (["--gpu", "v100"], False),
    (["--device", "cpu"], False),
])
def test_tf32_candidates_on_capability_8_and_above_only(capsys, target, tf32_expected):
    assert main(["plan", *TINY, *target, "--budget", "40GiB", "--keep", "8", "--json"]) == 0
    fitting = json.loads(capsys.readouterr().out)["fitting"]
    tf32 = [c for c in fitting if c["tf32"]]
    assert bool(tf32) is tf32_expected, [c["summary"] for c in fitting]
    for c in tf32:  # fp32 weights with TF32 matmuls, written as the recipe's key
        assert c["recipe"]["mixed_precision"] == "no" and c["recipe"]["tf32"] is True and "tf32" in c["summary"]
    if not tf32_expected:
        assert all("tf32" not in c["recipe"] for c in fitting)


def test_a_planned_tf32_recipe_is_written_and_loads(tmp_path, capsys):
    """bert-tiny in 40 GiB of an H100: fp32 with TF32 is predicted fastest (16-bit's casts cost more than
    its matmuls save at this size), so the written recipe carries `tf32: true`."""
    out = tmp_path / "recipe.yaml"
    assert main(["plan", *TINY, "--gpu", "h100", "--budget", "40GiB", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Chosen: tf32" in printed.replace("\n", " ")
    assert "tf32: true" in out.read_text()
    loaded = Recipe.from_yaml(out)
    assert loaded.tf32.enabled and loaded.mixed_precision == "no"


# -- --allow-optimizer hint --------------------------------------------------------------------------------

@functools.cache
def _budget_only_a_lighter_optimizer_fits(device_type: str = "cpu") -> int:
    """A budget below every AdamW recipe's need, above the closest one's need with Adafactor (CPU)."""
    device = device_profile(device_type)
    tight = plan("bert-tiny", 8, 128, 1, device, verify=False)
    lighter = with_lighter_optimizers("bert-tiny", tight, device)
    assert [c.recipe.optimizer.name for c in lighter] == ["adamw-8bit", "adafactor"]
    lightest = min(c.needed_bytes for c in lighter)
    assert lightest < tight.closest.needed_bytes
    return (lightest + tight.closest.needed_bytes) // 2


def test_nothing_fits_names_allow_optimizer_when_a_lighter_optimizer_would_fit(capsys):
    budget = _budget_only_a_lighter_optimizer_fits()
    args = ["plan", *TINY, "--device", "cpu", "--budget", str(budget)]
    assert main(args) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "Nothing fits" in out and "changes what is learned" in out
    assert re.search(r"--allow-optimizer [a-z0-9,-]*adafactor", out), out
    # With the flag the planner finds it, and the table and the Chosen line name the optimizer.
    assert main([*args, "--allow-optimizer", "adamw-8bit,adafactor"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Chosen:" in out and "adafactor" in out.split("Chosen:")[1].split("micro-batch")[0]
    assert "--allow-optimizer" not in out


def test_no_optimizer_hint_when_the_flag_was_given_or_nothing_would_fit(capsys):
    assert main(["plan", *TINY, "--device", "cpu", "--budget", "1MiB"]) == 1
    assert "--allow-optimizer" not in capsys.readouterr().out  # even Adafactor does not fit in 1 MiB
    budget = _budget_only_a_lighter_optimizer_fits()
    # --allow-optimizer given (here only AdamW): the user has chosen, no hint to pass the flag again.
    rc = main(["plan", *TINY, "--device", "cpu", "--budget", str(budget), "--allow-optimizer", "adamw"])
    assert rc == 1 and "--allow-optimizer" not in capsys.readouterr().out


def test_json_plan_names_a_lighter_optimizer_in_the_recipe(capsys):
    budget = _budget_only_a_lighter_optimizer_fits()
    assert main(["plan", *TINY, "--device", "cpu", "--budget", str(budget), "--allow-optimizer", "adafactor",
                 "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)["chosen"]
    assert chosen["recipe"]["optimizer"] == "adafactor" and "adafactor" in chosen["summary"]
