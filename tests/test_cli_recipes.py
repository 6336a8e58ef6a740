"""`tfmem recipes` and the CLI's handling of user errors."""

from __future__ import annotations

import subprocess
import sys

from tfmem.cli import main
from tfmem.shipped import shipped_recipe_names


def test_recipes_lists_every_shipped_recipe_with_its_summary(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in shipped_recipe_names():
        assert name in out
    assert "accumulate x4" in out


def test_recipes_name_prints_loadable_yaml(capsys, tmp_path):
    assert main(["recipes", "low-memory"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "r.yaml").write_text(text)
    from tfmem import Recipe

    assert Recipe.from_yaml(tmp_path / "r.yaml") == Recipe.load("low-memory")


def test_bad_recipe_file_is_a_one_line_error_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngradient_accumulation_steps: 0\n")
    result = subprocess.run([sys.executable, "-m", "tfmem", "recipes", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "tfmem recipes: error: Invalid recipe in" in result.stderr
    assert "`gradient_accumulation_steps` must be a positive integer, got 0" in result.stderr


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "recipes" in capsys.readouterr().out
