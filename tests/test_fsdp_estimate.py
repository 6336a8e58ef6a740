"""The sharded estimate and plan (fake FSDP2 steps over a fake process group; no launch needed)."""

from __future__ import annotations

import json

import pytest
from transformers import BertConfig

from tfmem.cli import main
from tfmem.errors import RecipeError
from tfmem.estimate import estimate_memory
from tfmem.estimate.sharding import estimate_sharded, per_rank_batch, trainable_bytes
from tfmem.recipe import Recipe


def _config() -> BertConfig:
    return BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=64)


def test_sharding_lowers_one_ranks_peak_and_more_gpus_lower_it_further():
    ddp = estimate_sharded(_config(), None, 8, 16, gpus=2, strategy="ddp", device="cpu")
    grad_op = estimate_sharded(_config(), None, 8, 16, gpus=2, strategy="fsdp-grad-op", device="cpu")
    fsdp2 = estimate_sharded(_config(), None, 8, 16, gpus=2, strategy="fsdp", device="cpu")
    fsdp4 = estimate_sharded(_config(), None, 8, 16, gpus=4, strategy="fsdp", device="cpu")
    assert fsdp4.peak_bytes < fsdp2.peak_bytes <= grad_op.peak_bytes < ddp.peak_bytes
    assert fsdp4.per_rank_batch_size == 2 and fsdp4.micro_batch_size == 2


def test_ddp_is_the_single_gpu_estimate_at_the_per_rank_batch_plus_gradient_buckets():
    single = estimate_memory(_config(), None, 4, 16, device="cpu")
    ddp = estimate_sharded(_config(), None, 8, 16, gpus=2, strategy="ddp", device="cpu")
    buckets = trainable_bytes(_config(), Recipe())
    assert ddp.communication_bytes == buckets > 0
    assert ddp.peak_bytes == single.peak_bytes + buckets


def test_frozen_parameters_need_no_buckets():
    frozen = Recipe.from_dict({"freeze": {"embeddings": True, "layers": 1}})
    assert trainable_bytes(_config(), frozen) < trainable_bytes(_config(), Recipe())


def test_the_global_batch_must_divide_by_the_gpus():
    assert per_rank_batch(12, 4) == 3
    with pytest.raises(RecipeError, match="does not divide by --gpus 4"):
        estimate_sharded(_config(), None, 10, 16, gpus=4, strategy="fsdp", device="cpu")


def test_a_recipe_that_cannot_shard_is_refused():
    with pytest.raises(RecipeError, match="`auto_micro_batch`"):
        estimate_sharded(_config(), Recipe.from_dict({"auto_micro_batch": True}), 8, 16, gpus=2, device="cpu")


def test_inside_a_distributed_run_the_fake_process_group_is_refused(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="process group already exists"):
            estimate_sharded(_config(), None, 8, 16, gpus=2, strategy="fsdp", device="cpu")
    finally:
        dist.destroy_process_group()


def test_cli_estimate_gpus_json(tiny_model_dir, capsys):
    code = main(["estimate", "--model", tiny_model_dir, "--batch-size", "8", "--seq-len", "16", "--device", "cpu",
                 "--gpus", "2", "--strategy", "fsdp-grad-op", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["strategy"] == "fsdp-grad-op" and out["gpus"] == 2 and out["peak_bytes"] > 0


@pytest.mark.slow
def test_only_sharding_makes_it_fit(tiny_model_dir, capsys):
    # One GPU: no recipe fits (weights, gradients and AdamW state alone are near the budget); sharded, it fits.
    args = ["plan", "--model", tiny_model_dir, "--batch-size", "4", "--seq-len", "16", "--device", "cpu",
            "--budget", "300KiB"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "Nothing fits" in out and "More processes would: on 2 processes" in out and "tfmem plan --gpus 2" in out
    assert main([*args, "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "Chosen: fsdp" in out and "accelerate launch --num_processes 4 --use_fsdp" in out


def test_the_cli_names_the_same_strategies_without_importing_the_estimator():
    from tfmem.cli import sharding as cli
    from tfmem.estimate import sharding

    assert cli.STRATEGIES == sharding.STRATEGIES
