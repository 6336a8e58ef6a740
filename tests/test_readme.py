"""The README's Python examples run as written (offline, on the CPU)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    from accelerate.state import AcceleratorState

    for block in blocks:  # in order: later blocks reuse names from earlier ones, as a reader would
        # Each block stands for its own program; accelerate keeps one precision per process.
        AcceleratorState._reset_state(True)
        exec(compile(block, str(README), "exec"), namespace)
        if "trainer.train()" in block:
            assert namespace["trainer"].state.global_step == 2
    assert namespace["window"].num_micro_batches == 4, "the accelerate loop ran whole windows"
