"""The estimate cache (tfmem/estimate/cache.py): the same answers with it as without, a damaged entry
ignored and written again, an unwritable folder never failing the command; and the `tfmem` program's
garbage-collector policy (tfmem/cli `entry`)."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BertConfig

from tfmem.cli import main
from tfmem.estimate import cache, estimator
from tfmem.estimate.estimator import estimate_memory
from tfmem.estimate.plan import plan

REPO = Path(__file__).resolve().parent.parent


def cfg(layers: int = 4, **extra) -> BertConfig:
    # Four layers: the planner's depth extrapolation runs (2- and 3-layer copies), as for real models.
    return BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                      vocab_size=100, max_position_embeddings=64, **extra)


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    """The cache in a fresh folder (conftest turns it off for every other test)."""
    folder = tmp_path / "cache"
    monkeypatch.delenv("TFMEM_CACHE", raising=False)
    monkeypatch.setenv("TFMEM_CACHE_DIR", str(folder))
    monkeypatch.setattr(cache, "_warned_unwritable", False)
    return folder


@pytest.fixture
def fake_steps(monkeypatch):
    """Counts the fake steps the estimator runs (all of them go through `run_fake_step`)."""
    calls = []
    real = estimator.run_fake_step

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(estimator, "run_fake_step", counted)
    return calls


def entries(folder: Path) -> list[Path]:
    return sorted((folder / "estimates").glob("*.json"))


def without_seconds(data):
    if isinstance(data, dict):
        return {k: without_seconds(v) for k, v in data.items() if k != "seconds"}
    if isinstance(data, list):
        return [without_seconds(v) for v in data]
    return data


PLANS = [  # (device, gpu, budget): each plan has recipes that fit and recipes that do not, one confirmed at
    # full depth (an estimate without extrapolation); a CUDA target (reserved bytes) and a CPU one
    ("cuda", "t4", 545400 * 2**10),
    ("cpu", None, 3 * 2**20),
]


@pytest.mark.parametrize("device, gpu, budget", PLANS)
def test_a_plan_is_the_same_with_the_cache_off_written_and_read(cache_on, fake_steps, monkeypatch, device, gpu, budget):
    def planned() -> dict:
        return without_seconds(plan(cfg(), 8, 32, budget, device, gpu=gpu, keep=2).to_dict())

    monkeypatch.setenv("TFMEM_CACHE", "off")
    off = planned()
    assert not cache_on.exists()
    monkeypatch.delenv("TFMEM_CACHE")
    written = planned()
    steps_written = len(fake_steps)
    read = planned()
    assert off == written == read
    assert steps_written > 0 and len(fake_steps) == steps_written, "the third plan ran fake steps: nothing was read"
    assert len(entries(cache_on)) == off["estimates_run"]


def test_every_input_of_an_estimate_is_in_its_key(cache_on):
    """An estimate read from the cache is the one computed for those inputs, never a neighbour's."""
    base = dict(model_or_config=cfg(), recipe=None, batch_size=4, seq_len=32, device="cuda", gpu="t4")
    variants = [
        {},
        {"recipe": "bf16"}, {"recipe": "checkpointing"}, {"recipe": "low-memory"}, {"batch_size": 8},
        {"seq_len": 16}, {"gpu": "h100"}, {"device": "cpu", "gpu": None}, {"padded": False},
        {"extrapolate_depth": True}, {"model_or_config": cfg(layers=5)},
        {"model_or_config": cfg(attn_implementation="eager")},
    ]
    # Written in this order: an input missing from the key would make a later variant read an earlier one's
    # entry (and write none of its own).
    fresh = [estimate_memory(**{**base, **v}) for v in variants]
    assert len(entries(cache_on)) == len(variants), "two different estimates share an entry"
    assert len({(e.peak_bytes, e.reserved_bytes) for e in fresh}) > len(variants) // 2  # they do differ
    for v, expected in zip(variants, fresh):  # read
        assert estimate_memory(**{**base, **v}) == expected, v


@pytest.mark.parametrize("damage", [
    "not json {",
    "",
    json.dumps({"key": "another", "method": "fake step", "step": {}}),
    "OTHER_KEY",
    "TRUNCATE",
    "NO_CATEGORY",
    "STRING_BYTES",
])
def test_a_damaged_entry_is_ignored_and_written_again(cache_on, fake_steps, caplog, damage):
    expected = estimate_memory(cfg(), "checkpointing", 4, 32, "cuda", gpu="t4", extrapolate_depth=True)
    (path,) = entries(cache_on)
    good = path.read_text()
    entry = json.loads(good)
    if damage == "TRUNCATE":
        damage = good[: len(good) // 2]
    elif damage == "NO_CATEGORY":
        for phase in entry["step"]["phases"].values():
            phase["breakdown"].pop("gradients")
        damage = json.dumps(entry)
    elif damage == "OTHER_KEY":  # well formed, but written for another estimate (as a hash collision would be)
        entry["key"]["seq_len"] = 64
        for phase in entry["step"]["phases"].values():
            phase["peak_bytes"] *= 2
        damage = json.dumps(entry)
    elif damage == "STRING_BYTES":
        first = next(iter(entry["step"]["phases"].values()))
        first["peak_bytes"] = str(first["peak_bytes"])
        damage = json.dumps(entry)
    path.write_text(damage)
    steps = len(fake_steps)
    with caplog.at_level(logging.INFO, logger="tfmem.estimate.cache"):
        again = estimate_memory(cfg(), "checkpointing", 4, 32, "cuda", gpu="t4", extrapolate_depth=True)
    assert again == expected
    assert len(fake_steps) > steps, "the damaged entry was used"
    assert "ignoring the estimate cache entry" in caplog.text
    assert path.read_text() == good, "the entry was not written again"


def test_an_unwritable_cache_folder_does_not_fail_the_command(tmp_path, monkeypatch, capsys, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.delenv("TFMEM_CACHE", raising=False)
    monkeypatch.setenv("TFMEM_CACHE_DIR", str(blocker / "cache"))  # cannot be made, even by root
    monkeypatch.setattr(cache, "_warned_unwritable", False)
    model = tmp_path / "tiny"
    cfg().save_pretrained(model)
    argv = ["plan", "--model", str(model), "--seq-len", "32", "--batch-size", "8", "--gpu", "t4", "--budget",
            "545400KiB", "--json"]
    with caplog.at_level(logging.WARNING, logger="tfmem.estimate.cache"):
        assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chosen"] is not None
    warnings = [r for r in caplog.records if "cannot write the estimate cache" in r.getMessage()]
    assert len(warnings) == 1, "one warning per process, however many estimates"
    monkeypatch.setenv("TFMEM_CACHE", "0")
    assert main(argv) == 0
    assert without_seconds(json.loads(capsys.readouterr().out)) == without_seconds(out)


def test_a_cached_estimate_logs_the_warnings_the_computed_one_logged(cache_on, monkeypatch, caplog):
    """A warning from inside the fake steps (a model without sdpa estimated with eager attention, say) is
    part of the answer: it is kept with the entry and logged again when the entry is read."""
    real = estimator.run_fake_step

    def warning_step(*args, **kwargs):
        logging.getLogger("tfmem.estimate.fake_step").warning("tfmem: estimating with %s (50%% of it)", "eager attention")
        return real(*args, **kwargs)

    monkeypatch.setattr(estimator, "run_fake_step", warning_step)
    with caplog.at_level(logging.WARNING):
        computed = estimate_memory(cfg(), None, 4, 32, "cpu")
    first = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    caplog.clear()
    monkeypatch.setattr(estimator, "run_fake_step", real)
    with caplog.at_level(logging.WARNING):
        assert estimate_memory(cfg(), None, 4, 32, "cpu") == computed
    assert first == [("tfmem.estimate.fake_step", logging.WARNING, "tfmem: estimating with eager attention (50% of it)")]
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == first


def test_an_edit_to_tfmem_makes_every_entry_stale(cache_on, fake_steps, monkeypatch):
    estimate_memory(cfg(), None, 4, 32, "cpu")
    steps = len(fake_steps)
    monkeypatch.setattr(cache, "source_fingerprint", lambda: "edited")
    estimate_memory(cfg(), None, 4, 32, "cpu")
    assert len(fake_steps) > steps and len(entries(cache_on)) == 2


def test_a_cached_plan_imports_no_transformers_modeling_code(cache_on, tiny_model_dir, capsys):
    """The point of reading the cache before anything else: transformers' modeling code is 1-2 s of import."""
    argv = ["plan", "--model", tiny_model_dir, "--seq-len", "32", "--batch-size", "8", "--gpu", "t4", "--budget",
            "545400KiB"]
    assert main(argv) == 0  # fills the cache
    capsys.readouterr()
    code = (
        "import io, sys, contextlib\nfrom tfmem.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    status = main({argv!r})\n"
        "print('STATUS', status, 'MODELING', 'transformers.modeling_utils' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TFMEM_CACHE"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert "STATUS 0 MODELING False" in run.stdout, run.stdout + run.stderr


# -- the `tfmem` program's collector policy ------------------------------------------------------------

@pytest.mark.parametrize("command, full_collections", [("plan", False), ("recipes", False), ("profile", True)])
def test_the_program_skips_full_collections_except_where_it_measures(monkeypatch, command, full_collections):
    import tfmem.cli

    seen = {}

    def fake_main(argv):
        seen["threshold"] = gc.get_threshold()
        return 0

    monkeypatch.setattr(tfmem.cli, "main", fake_main)
    monkeypatch.setattr(sys, "argv", ["tfmem", "-v", command, "--help"])
    before = gc.get_threshold()
    try:
        with pytest.raises(SystemExit) as exit_:
            tfmem.cli.entry()
        frozen = gc.get_freeze_count()
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
    assert exit_.value.code == 0
    assert (seen["threshold"] == before) == full_collections
    if not full_collections:
        assert seen["threshold"][:2] == before[:2], "young collections must still run"
    assert frozen > 0, "objects left to the collection at exit"
