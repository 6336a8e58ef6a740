"""The import graph reads bottom to top: techniques <- recipe <- adapters <- profiler / estimate / cli.

Read from the source with `ast`, so a back door up the layers fails here even when it would not (yet)
make a circular import. Three kinds of import are told apart: at module level, inside a function (runs
when called), and under `if TYPE_CHECKING:` (never runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tfmem

ROOT = Path(tfmem.__file__).parent

TECHNIQUES = ("tfmem.techniques",)
BASE = ("tfmem.errors", "tfmem.files", "tfmem.log")  # leaf helpers every layer may use
RECIPE = ("tfmem.recipe", "tfmem.recipe_io", "tfmem.recipe_keys", "tfmem.recipe_file", "tfmem.shipped")
ADAPTERS = ("tfmem.adapters", "tfmem.prepare")
TOP = ("tfmem.profiler", "tfmem.estimate", "tfmem.cli", "tfmem.zoo")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def in_layer(name: str, layer: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in layer)


class _Imports(ast.NodeVisitor):
    """Every `tfmem` import in a module, tagged "module", "function" or "typing"."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.found: list[tuple[str, str, int]] = []
        self._where = ["module"]

    def _record(self, name: str, line: int) -> None:
        if name == "tfmem" or name.startswith("tfmem."):
            self.found.append((name, self._where[-1], line))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._record(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            package = self.module.split(".")[: -node.level] if not self.module.endswith("__init__") else self.module.split(".")
            base = ".".join(package + ([base] if base else []))
        for alias in node.names:
            # `from tfmem.cli import estimate` imports a module: record the deeper name when it is one.
            deeper = f"{base}.{alias.name}"
            self._record(deeper if (ROOT.parent / Path(*deeper.split("."))).exists() or
                         (ROOT.parent / Path(*deeper.split("."))).with_suffix(".py").exists() else base, node.lineno)

    def _nested(self, node: ast.AST, where: str) -> None:
        self._where.append(where)
        self.generic_visit(node)
        self._where.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._nested(node, "typing" if self._where[-1] == "typing" else "function")

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            self._where.append("typing")
            for child in node.body:
                self.visit(child)
            self._where.pop()
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)


def imports_of(module: str, path: Path) -> list[tuple[str, str, int]]:
    visitor = _Imports(module)
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return visitor.found


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def violations(layer: tuple[str, ...], forbidden: tuple[str, ...], kinds: tuple[str, ...]) -> list[str]:
    return [
        f"{module}:{line} imports {target} ({kind})"
        for module, imports in GRAPH.items() if in_layer(module, layer)
        for target, kind, line in imports if kind in kinds and in_layer(target, forbidden)
    ]


def test_the_graph_was_read():
    assert {"tfmem.recipe", "tfmem.prepare", "tfmem.adapters.trainer", "tfmem.techniques.freezing"} <= set(GRAPH)
    kinds = {(target, kind) for target, kind, _ in GRAPH["tfmem.recipe"]}
    assert ("tfmem.techniques.freezing", "module") in kinds  # a module-level import
    assert ("tfmem.adapters.trainer", "function") in kinds  # `Recipe.apply` imports its adapter when called
    assert ("tfmem.recipe", "typing") in {(t, k) for t, k, _ in GRAPH["tfmem.adapters.trainer"]}


def test_techniques_import_nothing_above_them():
    assert violations(TECHNIQUES, RECIPE + ADAPTERS + TOP, ("module", "function")) == []
    assert violations(BASE, TECHNIQUES + RECIPE + ADAPTERS + TOP, ("module", "function")) == []


def test_recipe_loads_no_adapter_and_nothing_above():
    # The convenience methods (`recipe.apply`, `recipe.prepare_model`, ...) import their adapter when called.
    assert violations(RECIPE, ADAPTERS, ("module",)) == []
    assert violations(RECIPE, TOP, ("module", "function")) == []


def test_adapters_name_the_recipe_only_for_type_checking():
    assert violations(ADAPTERS, RECIPE, ("module", "function")) == []
    assert violations(ADAPTERS, TOP, ("module", "function")) == []


@pytest.mark.parametrize(("one", "other"), [("tfmem.adapters.trainer", "tfmem.adapters.accelerate"),
                                            ("tfmem.adapters.accelerate", "tfmem.adapters.trainer"),
                                            # the FSDP helpers serve both adapters and import neither
                                            ("tfmem.adapters.fsdp", "tfmem.adapters.trainer"),
                                            ("tfmem.adapters.fsdp", "tfmem.adapters.accelerate")])
def test_no_adapter_imports_another(one, other):
    assert [t for t, kind, _ in GRAPH[one] if kind != "typing" and in_layer(t, (other,))] == []
