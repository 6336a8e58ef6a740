"""Every example in tfmem's docstrings runs and shows what it says (STYLE: examples a test runs)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import tfmem

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(tfmem.__path__, prefix="tfmem.") if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


@pytest.mark.parametrize("name", ["tfmem.recipe", "tfmem.techniques.accumulation", "tfmem.techniques.architecture",
                                  "tfmem.techniques.freezing", "tfmem.techniques.checkpointing",
                                  "tfmem.profiler.live_bytes", "tfmem.estimate.speed"])
def test_core_modules_have_examples(name):
    assert doctest.testmod(importlib.import_module(name)).attempted > 0, f"{name} lost its docstring examples"
