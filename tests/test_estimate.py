"""estimate_memory: predictions against an independent measurement, and the techniques' directions."""

from __future__ import annotations

import json

import pytest
import torch
from _real_step import batch_for, run_steps
from transformers import AutoModelForSequenceClassification, BertConfig

from tfmem.cli import main
from tfmem.estimate import estimate_memory
from tfmem.estimate.allocator import round_allocation, simulate
from tfmem.profiler.live_bytes import LiveBytes
from tfmem.recipe import Recipe


def tiny_config(layers: int = 2) -> BertConfig:
    return BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
                      vocab_size=500, max_position_embeddings=128, num_labels=2)


def measured_peak(recipe: Recipe, batch: int, seq: int) -> int:
    """A real CPU training step (two optimizer steps), counted by the profiler's LiveBytes."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(), attn_implementation="sdpa")
    recipe.prepare_model(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = batch_for(recipe, batch, seq)
    tracker = LiveBytes()
    tracker.track(model, opt, inputs)
    with tracker:
        run_steps(model, opt, inputs, recipe)
    return tracker.peak_bytes


@pytest.mark.parametrize("recipe", [
    Recipe(name="baseline"),
    Recipe(name="ckpt").replace(gradient_checkpointing=True),
    Recipe(name="bf16").replace(mixed_precision="bf16"),
    Recipe(name="acc").replace(gradient_accumulation_steps=2),
])
def test_cpu_estimate_matches_a_measured_step(recipe):
    predicted = estimate_memory(tiny_config(), recipe, batch_size=8, seq_len=64, device="cpu").peak_bytes
    measured = measured_peak(recipe, 8, 64)
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)


def test_breakdown_sums_to_peak_and_names_modules():
    est = estimate_memory(tiny_config(), None, batch_size=4, seq_len=32, device="cuda")
    assert est.peak_bytes == (est.parameters_bytes + est.gradients_bytes + est.optimizer_state_bytes
                              + est.activations_bytes + est.library_workspace_bytes)
    assert est.library_workspace_bytes > 0  # cuBLAS workspaces come from PyTorch's allocator on CUDA
    n_params = sum(p.numel() for p in AutoModelForSequenceClassification.from_config(tiny_config()).parameters())
    assert est.parameters_bytes >= 4 * n_params  # fp32 weights, each tensor rounded up to 512 bytes on CUDA
    assert est.optimizer_state_bytes >= 2 * est.parameters_bytes - 512 * 100
    assert {"bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "classifier"} <= set(est.per_module)
    assert est.reserved_bytes >= est.peak_bytes


def test_checkpointing_and_bf16_predict_less_than_baseline():
    cfg = tiny_config(4)
    base = estimate_memory(cfg, None, 16, 128, device="cuda").peak_bytes
    ckpt = estimate_memory(cfg, Recipe(name="c").replace(gradient_checkpointing=True), 16, 128, device="cuda").peak_bytes
    bf16 = estimate_memory(cfg, Recipe(name="b").replace(mixed_precision="bf16"), 16, 128, device="cuda").peak_bytes
    assert ckpt < base
    assert bf16 < base


def test_cuda_target_uses_fused_attention_not_the_cpu_seq_squared_matrix():
    # On CUDA, sdpa keeps no (batch, heads, seq, seq) tensor; on CPU (math path) it does. At seq 128 that
    # is 16 x 4 x 128 x 128 x 4 bytes = 4 MiB per layer for probabilities alone.
    cfg = tiny_config(2)
    cuda = estimate_memory(cfg, None, 16, 128, device="cuda")
    cpu = estimate_memory(cfg, None, 16, 128, device="cpu")
    assert cpu.activations_bytes - cuda.activations_bytes > 2 * 16 * 4 * 128 * 128 * 4


def test_depth_extrapolation_matches_full_depth():
    cfg = tiny_config(6)
    for recipe in (None, Recipe(name="lm").replace(gradient_accumulation_steps=2, gradient_checkpointing=True, mixed_precision="bf16"),
                   Recipe(name="fz").replace(freeze={"embeddings": True, "layers": 2})):
        full = estimate_memory(cfg, recipe, 4, 64, device="cuda")
        fast = estimate_memory(cfg, recipe, 4, 64, device="cuda", extrapolate_depth=True)
        assert fast.method != full.method
        assert abs(fast.peak_bytes - full.peak_bytes) / full.peak_bytes < 0.01, (recipe, fast.peak_bytes, full.peak_bytes)
        assert len(fast.per_module) == len(full.per_module)


def test_freezing_drops_gradients_and_optimizer_state():
    cfg = tiny_config(4)
    base = estimate_memory(cfg, None, 4, 32, device="cuda")
    frozen = estimate_memory(cfg, Recipe(name="f").replace(freeze={"embeddings": True, "layers": 4}), 4, 32, device="cuda")
    assert frozen.optimizer_state_bytes < base.optimizer_state_bytes / 4


def test_estimator_raises_instead_of_guessing():
    with pytest.raises(ValueError, match="batch_size"):
        estimate_memory(tiny_config(), None, 0, 32, device="cpu")
    with pytest.raises(ValueError, match="seq_len"):
        estimate_memory(tiny_config(), None, 2, 4096, device="cpu")
    with pytest.raises(ValueError, match="does not divide"):
        estimate_memory(tiny_config(), Recipe(name="a").replace(gradient_accumulation_steps=3), 4, 32, device="cpu")
    with pytest.raises(ValueError, match="freeze.layers"):
        estimate_memory(tiny_config(2), Recipe(name="f").replace(freeze={"layers": 5}), 4, 32, device="cpu")


def test_allocator_rounding_and_reserved():
    assert [round_allocation(n) for n in (1, 512, 513)] == [512, 512, 1024]
    peaks = simulate([(1, 4), (2, 3 << 20), (2, 0), (3, 2 << 20)])
    assert peaks.peak_allocated_bytes == 512 + (3 << 20)
    assert peaks.peak_reserved_bytes == (2 << 20) + (20 << 20)  # the 2 MiB request reuses the freed large block


def test_cli_estimate_json_parses(capsys):
    assert main(["estimate", "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak_bytes"] > 0 and data["model"] == "bert-tiny"
    assert data["peak_bytes"] == sum(data[k] for k in ("parameters_bytes", "gradients_bytes", "optimizer_state_bytes",
                                                        "activations_bytes", "library_workspace_bytes"))


def test_cli_estimate_human_output(capsys):
    assert main(["estimate", "--model", "bert-tiny", "--recipe", "bf16", "--batch-size", "2", "--seq-len", "32", "--gpu", "a100"]) == 0
    out = capsys.readouterr().out
    assert "peak allocated" in out and "MiB" in out


def test_cuda_target_counts_parameters_as_the_caching_allocator_rounds_them():
    model = AutoModelForSequenceClassification.from_config(tiny_config())
    exact = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    rounded = sum(round_allocation(p.numel() * 4) for p in model.parameters()) + sum(
        round_allocation(b.numel() * b.element_size()) for b in model.buffers())
    assert estimate_memory(tiny_config(), None, 2, 16, device="cpu").parameters_bytes == exact
    assert estimate_memory(tiny_config(), None, 2, 16, device="cuda").parameters_bytes == rounded > exact


def test_depth_extrapolation_survives_a_peak_that_moves_with_depth():
    # bert-base, accumulation + checkpointing + bf16 at seq 512: up to ~8 layers the peak is in backward,
    # from then on at the end of forward (autocast's cached bf16 weights grow faster per layer). A single
    # extrapolated peak misses that by 2%; per-phase extrapolation must not.
    full = estimate_memory("bert-base-uncased", "low-memory", 32, 512, device="cuda")
    fast = estimate_memory("bert-base-uncased", "low-memory", 32, 512, device="cuda", extrapolate_depth=True)
    assert full.peak_phase == "forward"
    assert abs(fast.peak_bytes - full.peak_bytes) / full.peak_bytes < 0.002


def test_roberta_holds_its_positions_minus_the_padding_offset(capsys):
    # RoBERTa's position ids start at pad_token_id + 1, so 34 positions with pad 1 hold 32 tokens; a 33-token
    # batch would index past the embedding table. Checking `max_position_embeddings` alone accepted 33 and 34.
    from transformers import RobertaConfig

    cfg = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=34, pad_token_id=1, num_labels=2)
    assert estimate_memory(cfg, None, 2, 32, device="cpu").seq_len == 32
    for seq_len in (33, 34):
        with pytest.raises(ValueError, match=rf"`seq_len` is {seq_len} but roberta holds at most 32 tokens; use 32"):
            estimate_memory(cfg, None, 2, seq_len, device="cpu")
    # roberta-base by name: 514 positions, 512 tokens (raised before any fake step, so this is quick).
    assert main(["estimate", "--model", "roberta-base", "--batch-size", "1", "--seq-len", "513"]) == 2
    err = capsys.readouterr().err
    assert "roberta-base holds at most 512 tokens" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["estimate"], ["plan", "--budget", "1GiB"]])
@pytest.mark.parametrize("gpu_args", [["--gpu", "t4"], ["--gpu-capability", "7.5"]])
def test_device_cpu_with_a_gpu_flag_is_an_error_not_a_gpu_estimate(command, gpu_args, capsys):
    # Before: --gpu silently won over --device cpu, so `estimate --device cpu --gpu t4` estimated a T4 (exit 0).
    rc = main([*command, "--model", "bert-tiny", "--batch-size", "2", "--seq-len", "16", "--device", "cpu", *gpu_args])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert f"--device cpu cannot be combined with {' '.join(gpu_args)}" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
