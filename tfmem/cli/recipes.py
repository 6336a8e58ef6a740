"""`tfmem recipes`: list the shipped recipes, or show one."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from tfmem.recipe import Recipe
from tfmem.shipped import shipped_recipe_names, shipped_recipes_dir


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("recipes", help="list the shipped recipes, or print one as YAML")
    p.add_argument("name", nargs="?", help="a shipped recipe name or a YAML file to print (validated)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    if args.name:
        print(Recipe.load(args.name).to_yaml(), end="")
        return 0
    table = Table(title=f"Shipped recipes ({shipped_recipes_dir()})")
    table.add_column("name", style="bold")
    table.add_column("techniques")
    table.add_column("what it saves / what it costs")
    for name in shipped_recipe_names():
        recipe = Recipe.load(name)
        table.add_row(name, recipe.summary(), recipe.description)
    console.print(table)
    console.print("Load one with [bold]Recipe.load(NAME)[/]; print it with [bold]tfmem recipes NAME[/].")
    return 0
