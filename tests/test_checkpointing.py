"""Gradient checkpointing: same gradients, frozen prefix skipped, non-reentrant, safe to copy and re-apply."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from _families import FAMILIES, LAYER_PATHS, Custom, batch, build, count_runs, gpt2_lm, saved_inside

from tfmem.errors import RecipeError
from tfmem.techniques.architecture import ModulePaths, find_backbone
from tfmem.techniques.checkpointing import (
    CheckpointingConfig,
    apply_checkpointing,
    checkpointing_problems,
    is_checkpointed,
)
from tfmem.techniques.freezing import FreezeConfig, apply_freezing

ON = CheckpointingConfig(enabled=True)


# transformers 5.2x renamed `gradient_checkpointing_enable` / `is_gradient_checkpointing` to `activation_...`
# (the old names kept, deprecated); the GPU machines have 5.17, which has only the old ones.
def _transformers_checkpointing_enable(model: torch.nn.Module, **kwargs: object) -> None:
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


def _transformers_says_checkpointed(model: torch.nn.Module) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def _grads(model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def _assert_same_grads(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name, grad in expected.items():
        if grad is None:
            assert actual[name] is None, name
        else:
            assert actual[name] is not None, f"{name} got no gradient under checkpointing"
            torch.testing.assert_close(actual[name], grad, rtol=1e-10, atol=1e-12, msg=name)


FREEZES = {
    "nothing frozen": FreezeConfig(),
    "embeddings frozen": FreezeConfig(embeddings=True),
    "embeddings and 1 layer frozen": FreezeConfig(embeddings=True, layers=1),
}


# ALBERT refuses to freeze its shared layers, so it has no "1 layer frozen" case.
CASES = [(f, k) for f in FAMILIES for k, c in FREEZES.items() if not (f == "albert" and c.layers)]


@pytest.mark.parametrize(("family", "freeze"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_gradients_equal_the_uncheckpointed_run_in_every_family(family: str, freeze: str) -> None:
    config = FREEZES[freeze]
    reference, model = build(family, dtype=torch.float64), build(family, dtype=torch.float64)
    frozen = 0
    for m in (reference, model):
        frozen = apply_freezing(m, config).frozen_layers
    checkpointed = apply_checkpointing(model, ON, frozen_layers=frozen)
    backbone = find_backbone(model)
    assert checkpointed == tuple(f"{LAYER_PATHS[family]}.{i}" for i in range(frozen, len(backbone.layers)))

    inputs = batch(model)
    expected = _grads(reference, inputs)
    with count_runs(backbone.layers) as runs:
        actual = _grads(model, inputs)
    _assert_same_grads(expected, actual)
    # Checkpointing really happened (otherwise equal gradients would prove nothing): each checkpointed
    # layer ran twice, forward and recompute; ALBERT runs its one shared layer at 3 positions.
    positions = backbone.layer_positions // len(backbone.layers)
    assert runs == [positions] * frozen + [2 * positions] * (len(backbone.layers) - frozen)


def test_frozen_embeddings_do_not_starve_checkpointed_layers_of_gradient() -> None:
    # The classic silent failure: reentrant checkpointing sends gradients into a layer only when one of its
    # inputs requires grad. With the embeddings frozen, none does, and every layer would train on nothing.
    reference, model = build("bert", dtype=torch.float64), build("bert", dtype=torch.float64)
    for m in (reference, model):
        apply_freezing(m, FreezeConfig(embeddings=True))
    apply_checkpointing(model, ON)
    inputs = batch(model)
    expected, actual = _grads(reference, inputs), _grads(model, inputs)
    for name, parameter in model.named_parameters():
        if name.startswith("bert.encoder.layer."):
            assert actual[name] is not None and actual[name].abs().sum() > 0, name
    _assert_same_grads(expected, actual)


def test_tfmem_replaces_reentrant_checkpointing_that_transformers_set_up() -> None:
    model = build("bert", dtype=torch.float64)
    reference = build("bert", dtype=torch.float64)
    for m in (reference, model):
        apply_freezing(m, FreezeConfig(embeddings=True))
    _transformers_checkpointing_enable(model, use_reentrant=True)
    model.disable_input_require_grads()  # what makes reentrant checkpointing fail silently
    apply_checkpointing(model, ON)
    inputs = batch(model)
    _assert_same_grads(_grads(reference, inputs), _grads(model, inputs))


@pytest.mark.parametrize("family", ["bert", "mpnet"])  # transformers' own per-layer switch, and tfmem's wrapper
def test_layers_in_the_frozen_prefix_are_not_checkpointed(family: str) -> None:
    model = build(family)
    frozen = apply_freezing(model, FreezeConfig(embeddings=True, layers=2)).frozen_layers
    checkpointed = apply_checkpointing(model, ON, frozen_layers=frozen)
    assert checkpointed == (f"{LAYER_PATHS[family]}.2",)
    layers = find_backbone(model).layers
    assert [is_checkpointed(layer) for layer in layers] == [False, False, True]
    with count_runs(layers) as runs:
        model(**batch(model)).loss.backward()
    assert runs == [1, 1, 2]


def test_frozen_layers_behind_trainable_embeddings_are_checkpointed() -> None:
    # They must keep activations to pass gradients back to the embeddings, so checkpointing them saves memory.
    model = build("bert")
    frozen = apply_freezing(model, FreezeConfig(layers=2)).frozen_layers
    assert apply_checkpointing(model, ON, frozen_layers=frozen) == tuple(f"bert.encoder.layer.{i}" for i in range(3))


def test_frozen_layers_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"`frozen_layers` is 5 but BertForSequenceClassification has 3 layers"):
        apply_checkpointing(build("bert"), ON, frozen_layers=5)


def test_checkpointing_keeps_fewer_activations_for_backward() -> None:
    model = build("bert")
    inputs = batch(model, size=4, seq=32)
    with saved_inside([model.bert.encoder]) as plain:
        model(**inputs).loss.backward()
    apply_checkpointing(model, ON)
    with saved_inside([model.bert.encoder]) as checkpointed:
        model(**inputs).loss.backward()

    def total(tensors: list[torch.Tensor]) -> int:
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    assert total(checkpointed) < total(plain) / 4


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_a_deep_copy_checkpoints_and_trains_its_own_weights(family: str) -> None:
    model = build(family)
    apply_checkpointing(model, ON)
    clone = copy.deepcopy(model)
    assert list(clone.state_dict()) == list(build(family).state_dict())  # keys unchanged by the wrapper

    layers = find_backbone(clone).layers
    with count_runs(layers) as runs:
        clone(**batch(clone)).loss.backward()
    assert runs == [2, 2, 2]
    assert all(p.grad is not None for p in clone.parameters())
    assert all(p.grad is None for p in model.parameters())  # a wrapper closing over the original would fill these


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_evaluation_and_no_grad_runs_are_not_recomputed(family: str) -> None:
    model = build(family)
    apply_checkpointing(model, ON)
    layers = find_backbone(model).layers
    inputs = batch(model)
    with count_runs(layers) as runs, torch.no_grad():
        model(**inputs)
    assert runs == [1, 1, 1]
    model.eval()
    with count_runs(layers) as runs:
        model(**inputs).loss.backward()
    assert runs == [1, 1, 1]


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_applying_twice_checkpoints_each_layer_once(family: str) -> None:
    model = build(family)
    first = apply_checkpointing(model, ON)
    assert apply_checkpointing(model, ON) == first
    with count_runs(find_backbone(model).layers) as runs:
        model(**batch(model)).loss.backward()
    assert runs == [2, 2, 2]
    # One wrapper, not two: once the whole prefix is frozen, applying again leaves no layer checkpointed.
    apply_freezing(model, FreezeConfig(embeddings=True, layers=3))
    assert apply_checkpointing(model, ON, frozen_layers=3) == ()
    layers = find_backbone(model).layers
    assert not any(is_checkpointed(layer) for layer in layers)
    with count_runs(layers) as runs:
        model(**batch(model)).loss.backward()
    assert runs == [1, 1, 1]


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_reapplying_after_freezing_more_unwraps_the_newly_frozen_layers(family: str) -> None:
    model = build(family)
    apply_checkpointing(model, ON)
    apply_freezing(model, FreezeConfig(embeddings=True, layers=1))
    assert apply_checkpointing(model, ON, frozen_layers=1) == (f"{LAYER_PATHS[family]}.1", f"{LAYER_PATHS[family]}.2")
    with count_runs(find_backbone(model).layers) as runs:
        model(**batch(model)).loss.backward()
    assert runs == [1, 2, 2]


def test_mpnet_is_checkpointed_although_transformers_refuses() -> None:
    model = build("mpnet")
    with pytest.raises(ValueError, match="does not support (activation|gradient) checkpointing"):
        _transformers_checkpointing_enable(model)
    assert len(apply_checkpointing(model, ON)) == 3


def test_decoders_stop_caching_when_checkpointed() -> None:
    model = gpt2_lm()
    assert model.config.use_cache
    apply_checkpointing(model, ON)
    assert model.config.use_cache is False
    assert _transformers_says_checkpointed(model)


def test_a_disabled_config_changes_nothing() -> None:
    model = build("bert")
    assert apply_checkpointing(model, CheckpointingConfig()) == ()
    assert not any(is_checkpointed(layer) for layer in model.bert.encoder.layer)


def test_an_unreadable_model_is_refused_with_how_to_name_its_layers() -> None:
    model = Custom()
    problems = checkpointing_problems(model, ON, None)
    assert len(problems) == 1 and problems[0].startswith("`gradient_checkpointing` needs the model's layers")
    with pytest.raises(RecipeError, match=r"modules: \{embeddings: .*, layers: .*\}"):
        apply_checkpointing(model, ON)


def test_naming_the_layers_checkpoints_an_unreadable_model_with_the_same_gradients() -> None:
    torch.manual_seed(0)
    reference = Custom().double()
    model = copy.deepcopy(reference)
    assert apply_checkpointing(model, ON, ModulePaths(layers="blocks")) == ("blocks.0", "blocks.1", "blocks.2")
    inputs = batch(model)
    with count_runs(model.blocks) as runs:
        actual = _grads(model, inputs)
    assert runs == [2, 2, 2]
    _assert_same_grads(_grads(reference, inputs), actual)


def test_trainer_reports_the_model_as_checkpointed() -> None:
    # transformers reads `gradient_checkpointing` flags (e.g. to set DDP's find_unused_parameters).
    model = build("mpnet")
    assert isinstance(model, tf.PreTrainedModel) and not _transformers_says_checkpointed(model)
    apply_checkpointing(model, ON)
    assert _transformers_says_checkpointed(model)
