"""Training spread over N GPUs (DDP, FSDP FULL_SHARD, FSDP SHARD_GRAD_OP): one rank's peak, and a plan.

    estimate_sharded(model_or_config, recipe, batch_size, seq_len, gpus=4, strategy="fsdp") -> ShardedEstimate
    plan_sharded(model_or_config, batch_size, seq_len, budget_bytes, gpus) -> ShardedPlan
    gpus_needed(model_or_config, batch_size, seq_len, budget_bytes) -> ShardedPlan | None

Three modules: fake_step.py runs one FSDP2 step on fake tensors over a fake process group and counts
rank 0's bytes; per_rank.py predicts one rank's peak from it (FSDP) or from the single-GPU estimate plus
DDP's gradient buckets (DDP), with the caching allocator's reserved bytes on CUDA; planner.py runs the single-GPU planner's search (estimate/search.py) over strategies with it, fits on
those reserved bytes as one GPU does, and says how many GPUs would fit. The names are re-exported here,
where callers import them.
"""

from __future__ import annotations

from tfmem.estimate.sharding.per_rank import (
    STRATEGIES,
    ShardedEstimate,
    bucket_reserved_bytes,
    estimate_sharded,
    fake_sharded_step,
    per_rank_batch,
    shard_like_accelerate,
    trainable_bytes,
)
from tfmem.estimate.sharding.planner import (
    STRATEGY_TIME,
    ShardedCandidate,
    ShardedPlan,
    gpus_needed,
    plan_sharded,
    planned_recipe,
)

__all__ = ["STRATEGIES", "STRATEGY_TIME", "ShardedCandidate", "ShardedEstimate", "ShardedPlan", "bucket_reserved_bytes",
           "estimate_sharded", "fake_sharded_step", "gpus_needed", "per_rank_batch", "plan_sharded", "planned_recipe",
           "shard_like_accelerate", "trainable_bytes"]
