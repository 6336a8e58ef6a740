"""A recipe's text on disk: which file a name means, the data in that file, and the YAML `to_yaml` writes.

`tfmem.recipe.Recipe` turns data into a validated recipe and back; this module deals only in paths,
text and plain data, so the class keeps to what a recipe is. Reading goes through `tfmem.recipe_file`,
which refuses anything that is not a small, plain recipe file (see its docstring for the limits).

Example:
    >>> recipe_path("checkpointing").name
    'checkpointing.yaml'
    >>> print(commented_yaml({"name": "mine", "mixed_precision": "no"}), end="")
    name: mine
    mixed_precision: 'no'  # no | fp16 | bf16; bf16 needs compute capability 8.0+ on GPU
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from tfmem.errors import RecipeError
from tfmem.recipe_file import load_json, load_yaml, read_recipe_text
from tfmem.recipe_keys import COMMENTS
from tfmem.shipped import shipped_recipe_names, shipped_recipe_path
from tfmem.techniques._fields import quote

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


def recipe_path(name_or_path: str | os.PathLike[str]) -> Path:
    """The file `name_or_path` means: itself when it names a recipe file (by its suffix) or any file that
    exists, else the shipped recipe of that name (see `tfmem recipes`).

    Raises:
        RecipeError: a NUL character in it, or no shipped recipe has that name and no such file exists;
            the message lists the shipped names and suggests the closest.
    """
    text = str(name_or_path)
    if "\x00" in text:
        raise RecipeError(f"the recipe name or path {quote(text)} contains a NUL character.")
    path = Path(text)
    if path.suffix.lower() in RECIPE_SUFFIXES or path.exists():
        return path
    shipped = shipped_recipe_path(text)
    if shipped is None:
        names = shipped_recipe_names()
        close = difflib.get_close_matches(text, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(
            f"no shipped recipe is named {quote(text)} and no such file exists.{hint} "
            f"Shipped recipes: {', '.join(names)}; or give the path of a .yaml file."
        )
    return shipped


def read_yaml_data(path: Path) -> Any:
    """The data of the YAML (or JSON: JSON is YAML) recipe file at `path`, read safely: no code runs.

    Raises:
        FileNotFoundError: the file does not exist.
        RecipeError: the file cannot be read as a recipe file, is not valid YAML, or is empty.
    """
    data = load_yaml(read_recipe_text(path), source=str(path))
    if data is None:
        raise RecipeError("the file is empty; a recipe needs at least a `name`.", source=str(path))
    return data


def read_json_data(path: Path) -> Any:
    """The data of the JSON recipe file at `path` (the same limits as YAML files)."""
    return load_json(read_recipe_text(path), source=str(path))


def commented_yaml(data: dict[str, Any]) -> str:
    """`data` (a `Recipe.to_dict()`) as YAML with the comment of each key (`tfmem.recipe_keys`) on its line.

    Comments are ignored on loading, so `read_yaml_data` gives back `data`.
    """
    lines = []
    for key, value in data.items():
        comment = f"  # {COMMENTS[key]}" if key in COMMENTS else ""
        if isinstance(value, dict):
            lines.append(f"{key}:{comment}")
            for sub, subvalue in value.items():
                lines.append(f"  {sub}: {_scalar(subvalue)}")
        else:
            lines.append(f"{key}: {_scalar(value)}{comment}")
    return "\n".join(lines) + "\n"


def _scalar(value: Any) -> str:
    # yaml.safe_dump of a scalar quotes exactly what needs quoting (e.g. "no", which YAML would read as False).
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()
