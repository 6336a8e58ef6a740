"""Recipe: immutable, validated at construction (every problem at once), exact round trips."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import yaml

from tfmem import Recipe, RecipeError
from tfmem.files import write_text_atomic
from tfmem.shipped import shipped_recipe_names, shipped_recipes_dir

FULL = {
    "name": "full",
    "description": "every key set",
    "gradient_accumulation_steps": 4,
    "gradient_checkpointing": True,
    "mixed_precision": "bf16",
    "freeze": {"embeddings": True, "layers": 6},
    "modules": {"embeddings": "bert.embeddings", "layers": "bert.encoder.layer"},
    "optimizer": "adamw-8bit",
    "tf32": True,
    "group_by_length": True,
}
RECIPES = [Recipe.from_dict(FULL), Recipe.from_dict({"name": "defaults"})] + [Recipe.load(n) for n in shipped_recipe_names()]


def test_every_shipped_yaml_file_is_found_and_loads():
    # Recursing with a glob of our own guards against a loader that silently skips files.
    files = sorted(p.stem for p in Path(shipped_recipes_dir()).rglob("*.y*ml"))
    assert files == shipped_recipe_names()
    assert len(files) >= 5
    for name in files:
        recipe = Recipe.load(name)
        assert recipe.name == name, "a shipped recipe's `name` must match its file name"
        assert recipe.description, f"{name} needs a one-line description for `tfmem recipes`"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_round_trip_contract(recipe, tmp_path):
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.to_dict() == Recipe.from_dict(recipe.to_dict()).to_dict()
    path = tmp_path / "r.yaml"
    recipe.to_yaml(path)
    assert Recipe.from_yaml(path) == recipe
    assert yaml.safe_load(path.read_text()) == recipe.to_dict()
    (tmp_path / "r.json").write_text(json.dumps(recipe.to_dict()))
    assert Recipe.from_json(tmp_path / "r.json") == recipe
    assert Recipe.load(tmp_path / "r.json") == recipe
    assert copy.deepcopy(recipe) == recipe
    assert pickle.loads(pickle.dumps(recipe)) == recipe
    assert hash(recipe) == hash(Recipe.from_dict(recipe.to_dict()))


def test_full_dict_round_trips_key_for_key():
    assert Recipe.from_dict(FULL).to_dict() == FULL


def test_recipe_is_immutable():
    recipe = Recipe.from_dict(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.accumulation.steps = 8  # type: ignore[misc]


def test_replace_returns_a_validated_copy():
    recipe = Recipe.from_dict(FULL)
    changed = recipe.replace(gradient_accumulation_steps=2, freeze={"layers": 2})
    assert (changed.gradient_accumulation_steps, changed.freeze.layers, changed.freeze.embeddings) == (2, 2, True)
    assert recipe.gradient_accumulation_steps == 4
    with pytest.raises(RecipeError, match="gradient_accumulation_steps"):
        recipe.replace(gradient_accumulation_steps=0)


def test_every_problem_is_reported_at_once():
    bad = {
        "name": "bad",
        "gradient_accumulation_steps": 0,
        "mixed_precision": "fp8",
        "gradient_checkpointing": "yes",
        "freeze": {"layers": -1, "embedings": True},
        "optimiser": "adamw",
    }
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(bad)
    problems = info.value.problems
    assert len(problems) == 6, problems
    text = str(info.value)
    for needle in ("`gradient_accumulation_steps` must be a positive integer, got 0",
                   "`mixed_precision` must be one of no, fp16, bf16; got 'fp8'",
                   "`gradient_checkpointing` must be bool, got 'yes'",
                   "`freeze.layers` must be 0 or more",
                   "did you mean `freeze.embeddings`",
                   "unknown key `optimiser`"):
        assert needle in text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"gradient_accumulation_steps": -2}, r"positive integer, got -2; use 1"),
        ({"gradient_accumulation_steps": 2.5}, r"must be int, got 2.5"),
        ({"gradient_accumulation_steps": True}, r"must be int, got True"),
        ({"mixed_precision": False}, r'is False \(YAML reads .*a bare `no` as a boolean\); write `mixed_precision: "no"`'),
        ({"mixed_precision": "float16"}, r"one of no, fp16, bf16; got 'float16'"),
        ({"freeze": 3}, r"`freeze` must be a mapping"),
        ({"freeze": {"layers": "6"}}, r"`freeze.layers` must be int, got '6'"),
        ({"name": ""}, r"`name` must be a non-empty string"),
        ({"modules": {"layers": ""}}, r"`modules.layers` is empty"),
        ({"gradient_acumulation_steps": 4}, r"did you mean `gradient_accumulation_steps`"),
    ],
)
def test_bad_values_name_the_field_the_value_and_the_fix(data, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ngradient_accumulation_steps: [4\n")
    with pytest.raises(RecipeError, match=r"broken.yaml.*not valid YAML at line"):
        Recipe.from_yaml(path)


def test_bad_recipe_file_reports_its_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ngradient_accumulation_steps: 0\nmixed_precision: fp32\n")
    with pytest.raises(RecipeError, match=r"Invalid recipe in .*bad.yaml \(2 problems\)"):
        Recipe.from_yaml(path)


def test_yaml_loading_is_safe_and_never_runs_code(tmp_path):
    path = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml(path)
    assert not marker.exists()


def test_unknown_shipped_name_suggests_the_closest(tmp_path):
    with pytest.raises(RecipeError, match=r"no shipped recipe is named 'low-memroy'.*Did you mean 'low-memory'"):
        Recipe.load("low-memroy")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Recipe.from_yaml(tmp_path / "nope.yaml")


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "recipe.yaml"
    Recipe.from_dict({"name": "old"}).to_yaml(path)
    before = path.read_text()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("tfmem.files.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        Recipe.from_dict({"name": "new"}).to_yaml(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"], "no temporary file may be left behind"


def test_write_text_atomic_creates_parent_folders(tmp_path):
    write_text_atomic(tmp_path / "a" / "b.txt", "hello")
    assert (tmp_path / "a" / "b.txt").read_text() == "hello"


def test_yaml_comments_say_what_each_setting_costs():
    text = Recipe.from_dict(FULL).to_yaml()
    assert "gradient_checkpointing: true  # true recomputes" in text
    assert 'mixed_precision: bf16  # no | fp16 | bf16' in text
    assert Recipe.from_dict({"name": "n", "mixed_precision": "no"}).to_yaml().count("mixed_precision: 'no'") == 1


def test_summary_names_the_techniques():
    assert Recipe.from_dict(FULL).summary() == ("accumulate x4, checkpointing, bf16, freeze embeddings, freeze 6 layers, "
                                                "adamw-8bit, tf32, group by length")
    assert Recipe().summary() == "no techniques (baseline)"


def test_written_files_get_the_usual_permissions_not_private_ones(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "shared.yaml", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.yaml").stat().st_mode & 0o777 == 0o644
