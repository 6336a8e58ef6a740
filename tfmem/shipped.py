"""Where the shipped recipes (`recipes/*.yaml`) are, installed or in a source checkout."""

from __future__ import annotations

from pathlib import Path


def shipped_recipes_dir() -> Path:
    """The folder of shipped recipes: inside the wheel, or the repository's `recipes/` when run from source."""
    installed = Path(__file__).parent / "_recipes"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "recipes"


def shipped_recipe_names() -> list[str]:
    """Names of the shipped recipes, sorted."""
    folder = shipped_recipes_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def shipped_recipe_path(name: str) -> Path | None:
    """The file of the shipped recipe called `name`, or None."""
    path = shipped_recipes_dir() / f"{name}.yaml"
    return path if path.is_file() else None
