"""Shared test setup: offline, deterministic, and accelerate's process-wide state reset between tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# No estimate cache (tfmem/estimate/cache.py): a test must not read the user's, and a cached answer would
# skip the fake step a test monkeypatches. tests/test_estimate_cache.py turns it on in a temporary folder.
os.environ["TFMEM_CACHE"] = "0"

import pytest
import torch

# The tests run tiny models, where one thread beats two (thread hand-offs cost more than the math).
torch.set_num_threads(1)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A local model directory (config only: weights are random) for the CLI and the sweep."""
    from transformers import BertConfig

    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    folder = tmp_path / "tiny-bert"
    config.save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process; a test that asks for bf16 must not leak it."""
    from accelerate.state import AcceleratorState, GradientState

    torch.manual_seed(0)
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_checks.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Stand in a GPU of a given compute capability: what cannot exist here is the GPU, not the check.

    `fake_gpu((7, 5), "Tesla T4")` makes tfmem read capability 7.5 and that device name.
    """
    from tfmem.techniques import precision

    def install(capability, name):
        monkeypatch.setattr(precision, "cuda_capability", lambda device: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return install
