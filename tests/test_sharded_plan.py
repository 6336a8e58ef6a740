"""`tfmem plan --gpus N` fits on one rank's reserved bytes (as the single-GPU planner does), runs the single-GPU
planner's search, and the per-rank estimate honours the recipe's optimizer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig

from tfmem.cli import main
from tfmem.errors import RecipeError
from tfmem.estimate import estimate_memory
from tfmem.estimate.device import device_profile
from tfmem.estimate.optimizer_state import state_bytes
from tfmem.estimate.search import search_space
from tfmem.estimate.sharding import bucket_reserved_bytes, estimate_sharded, plan_sharded, trainable_bytes
from tfmem.recipe import Recipe


def _config() -> BertConfig:
    return BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                      max_position_embeddings=128, num_labels=2)


def test_a_rank_whose_peak_fits_but_whose_reserved_bytes_do_not_is_not_called_fitting():
    # Before: the sharded planner compared the allocated peak with the budget, so on a GPU it chose recipes
    # the caching allocator would run out of memory on (issue 7's bug, on N GPUs).
    h100 = device_profile(gpu="h100")
    baseline = estimate_sharded(_config(), None, 2, 64, 2, "fsdp", h100)  # one sample per rank: no accumulation
    assert baseline.reserved_bytes > baseline.peak_bytes
    budget = (baseline.peak_bytes + baseline.reserved_bytes) // 2  # the peak fits, the reserved bytes do not
    result = plan_sharded(_config(), 2, 64, budget, 2, h100, strategies=("fsdp",))
    baseline_row = [c for c in result.fitting if c.recipe.summary() == "no techniques (baseline)"]
    assert not baseline_row, "fits by its peak, not by what the allocator reserves"
    for c in result.fitting:
        assert c.estimate.reserved_bytes + result.overhead_bytes == c.needed_bytes <= budget
    closest = result.closest or result.chosen
    assert closest.needed_bytes == closest.estimate.reserved_bytes  # the figure compared with the budget


def test_ddp_reserves_the_single_gpu_figure_plus_the_gradient_buffers_segment():
    h100 = device_profile(gpu="h100")
    single = estimate_memory(_config(), None, 4, 64, h100)
    ddp = estimate_sharded(_config(), None, 8, 64, 2, "ddp", h100)
    buckets = trainable_bytes(_config(), Recipe())
    assert ddp.reserved_bytes == single.reserved_bytes + bucket_reserved_bytes(buckets) >= ddp.peak_bytes
    assert estimate_sharded(_config(), None, 8, 64, 2, "ddp", "cpu").reserved_bytes is None  # nothing cached on a CPU


@pytest.mark.parametrize("optimizer", ["adamw-8bit", "adafactor"])
def test_a_lighter_optimizer_lowers_a_ddp_ranks_estimate_by_its_smaller_state(optimizer):
    # Under DDP every rank keeps the whole optimizer state: the recipe's optimizer, as on one GPU. At 128
    # tokens the peak is in backward, where the state is all that differs between the optimizers.
    adamw = estimate_sharded(_config(), None, 8, 128, 2, "ddp", "cpu")
    lighter = estimate_sharded(_config(), Recipe().replace(optimizer=optimizer), 8, 128, 2, "ddp", "cpu")
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(_config())
    # torch's AdamW also keeps a 4-byte step counter per parameter tensor (state_bytes counts the moments).
    adamw_state = state_bytes("adamw", model) + 4 * len(list(model.parameters()))
    assert adamw.peak_bytes - lighter.peak_bytes == adamw_state - state_bytes(optimizer, model) > 0
    assert lighter.optimizer_state_bytes == state_bytes(optimizer, model)


@pytest.mark.parametrize("optimizer", ["adamw-8bit", "adafactor"])
def test_under_fsdp_an_optimizer_that_fails_on_sharded_parameters_is_refused(optimizer):
    recipe = Recipe().replace(optimizer=optimizer)
    with pytest.raises(RecipeError, match=f"`optimizer` is '{optimizer}' but the model is sharded with FSDP"):
        estimate_sharded(_config(), recipe, 8, 16, 2, "fsdp", "cpu")
    with pytest.raises(RecipeError, match="--strategy ddp"):  # and before training, through the same check
        recipe.accelerator_kwargs(device="cpu", fsdp_plugin=_fsdp2_plugin())


def _fsdp2_plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2)


def test_adafactor_really_fails_on_fsdp2_parameters(tmp_path):
    # Why the refusal above exists: if transformers' Adafactor learns to step DTensors, this fails; lift the refusal.
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers.optimization import Adafactor

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        fully_shard(model)
        optimizer = Adafactor(model.parameters(), lr=1e-3, scale_parameter=False, relative_step=False)
        model(torch.randn(4, 8)).sum().backward()
        with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
            optimizer.step()
    finally:
        dist.destroy_process_group()


def test_the_sharded_plan_searches_the_single_gpu_search_space_and_prints_reserved(capsys, monkeypatch):
    # One search: every (precision, tf32, checkpointing) the single-GPU planner tries on an H100 is a DDP row here
    # (the sharded planner used to search its own list, without tf32).
    import tfmem.estimate.sharding as sharding

    h100 = device_profile(gpu="h100")
    result = plan_sharded("bert-tiny", 2, 16, 8 * 2**30, 2, h100, overhead_bytes=512 * 2**20)
    ddp = {(c.recipe.mixed_precision, c.recipe.tf32.enabled, c.recipe.gradient_checkpointing)
           for c in result.fitting if c.strategy == "ddp"}
    assert ddp == {(p.precision, p.tf32, p.checkpointing) for p in search_space(h100)}
    assert not any(c.recipe.mixed_precision == "fp16" for c in result.fitting)
    assert result.chosen == result.fitting[0] and not result.chosen.extrapolated
    assert result.to_dict()["chosen"]["reserved_bytes"] == result.chosen.estimate.reserved_bytes
    monkeypatch.setattr(sharding, "plan_sharded", lambda *a, **k: result)
    rc = main(["plan", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16", "--gpu", "h100",
               "--budget", "8GiB", "--gpus", "2"])
    out = " ".join(capsys.readouterr().out.split())
    assert rc == 0 and "┃ reserved ┃" in out and "headroom: budget - reserved - overhead" in out
    assert " reserved), headroom " in out.split("Chosen:")[1]


# -- --allow-freeze / --allow-optimizer on N GPUs (the shared search; they used to be refused with --gpus) --------

def _on_two(model: str) -> list[str]:
    return ["plan", "--model", model, "--batch-size", "4", "--seq-len", "16", "--device", "cpu", "--gpus", "2"]


def test_allow_freeze_on_two_gpus_offers_a_frozen_recipe_where_nothing_else_fits(capsys):
    # 30 MiB per process: bert-tiny's weights, gradients and AdamW state alone (70 MB) exceed it even halved by
    # FSDP, so every recipe that trains the whole model is out; freezing the embeddings (most of its weights) and
    # its 2 layers leaves so little to train that even DDP fits.
    assert main([*_on_two("bert-tiny"), "--budget", "30MiB"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "Nothing fits" in out and "--allow-freeze N" in out  # the single-GPU planner's hint
    rc = main([*_on_two("bert-tiny"), "--budget", "30MiB", "--allow-freeze", "2"])
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())
    assert rc == 0 and "not supported with --gpus" not in captured.err, captured.err
    chosen = out.split("Chosen:")[1]
    assert "freeze embeddings, freeze 2 layers" in chosen.split("micro-batch")[0]
    assert "--allow-freeze 2 (changes what is learned)" in out and "share a unit" in out  # FSDP2 handles the mix


def test_allow_optimizer_on_two_gpus_is_searched_under_ddp_only_and_ranked_after_adamw(capsys):
    import json

    rc = main([*_on_two("bert-tiny"), "--budget", "1GiB", "--allow-optimizer", "adafactor", "--json"])
    captured = capsys.readouterr()
    assert rc == 0 and "not supported with --gpus" not in captured.err, captured.err
    rows = json.loads(captured.out)["fitting"]
    optimizer = {(r["strategy"], r["recipe"].get("optimizer", "adamw")) for r in rows}
    assert optimizer == {("ddp", "adamw"), ("ddp", "adafactor"), ("fsdp", "adamw"), ("fsdp-grad-op", "adamw")}
    first = [r["recipe"].get("optimizer", "adamw") for r in rows].index("adafactor")
    assert all(r["recipe"].get("optimizer", "adamw") == "adafactor" for r in rows[first:])  # it changes what is learned: last
    assert main([*_on_two("bert-tiny"), "--budget", "1GiB", "--allow-optimizer", "adafactr"]) == 2
    assert "adafactor" in capsys.readouterr().err  # a misspelt name is refused with the right one
