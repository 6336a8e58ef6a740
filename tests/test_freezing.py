"""Layer freezing: what is frozen, that it stays frozen under training, and that the frozen prefix keeps nothing."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf
from _families import FAMILIES, Custom, batch, build, count_runs, gpt2_lm, saved_inside
from torch import nn

from tfmem.errors import RecipeError
from tfmem.techniques.architecture import ModulePaths, find_backbone
from tfmem.techniques.checkpointing import CheckpointingConfig, GradientCheckpointingLayer, apply_checkpointing
from tfmem.techniques.freezing import FreezeConfig, apply_freezing, freeze_problems

UNSHARED = [f for f in FAMILIES if f != "albert"]


def _params(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


@pytest.mark.parametrize("family", UNSHARED)
def test_frozen_parameters_get_no_gradient_and_the_rest_do(family: str) -> None:
    model = build(family)
    backbone = find_backbone(model)
    result = apply_freezing(model, FreezeConfig(embeddings=True, layers=2))

    frozen = _params([*backbone.embedding_modules().values(), *backbone.layers[:2]])
    assert frozen and all(not p.requires_grad for p in frozen)
    model(**batch(model)).loss.backward()
    assert all(p.grad is None for p in frozen)
    # The last layer and the head still train.
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, name
    assert any(p.requires_grad for p in backbone.layers[2].parameters())
    # The result names exactly the frozen parameters, and lists the rest as trainable.
    names = dict(model.named_parameters())
    assert {n for n in result.frozen_parameter_names} == {n for n, p in names.items() if not p.requires_grad}
    assert set(result.trainable_parameter_names) == {n for n, p in names.items() if p.requires_grad}
    assert result.frozen_embeddings and result.frozen_layers == 2


@pytest.mark.parametrize(
    ("family", "frozen_names"),
    [
        ("bert", ["bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias",
                  "bert.embeddings.token_type_embeddings.weight"]),
        ("modernbert", ["model.embeddings.norm.weight"]),
        ("gpt2", ["transformer.wte.weight", "transformer.wpe.weight"]),
    ],
)
def test_freezing_embeddings_freezes_their_layernorm_and_tables_but_not_the_head(family: str, frozen_names: list[str]) -> None:
    model = build(family)
    result = apply_freezing(model, FreezeConfig(embeddings=True))
    params = dict(model.named_parameters())
    assert all(not params[n].requires_grad for n in frozen_names)
    assert set(frozen_names) <= set(result.frozen_parameter_names)
    head = [n for n in params if n.startswith(("classifier", "score", "pooler", "bert.pooler"))]
    assert head and all(params[n].requires_grad for n in head)


@pytest.mark.parametrize("family", UNSHARED)
def test_the_frozen_prefix_keeps_no_activations_for_backward(family: str) -> None:
    model = build(family)
    backbone = find_backbone(model)
    prefix = [*backbone.embedding_modules().values(), *backbone.layers[:2]]
    inputs = batch(model)

    # Control: without freezing, the same measurement sees the prefix keep its activations.
    with saved_inside(prefix) as saved:
        model(**inputs).loss.backward()
    assert len(saved) > 0

    apply_freezing(model, FreezeConfig(embeddings=True, layers=2))
    # tfmem's checkpointing on top must not re-attach the prefix (as enable_input_require_grads would).
    apply_checkpointing(model, CheckpointingConfig(enabled=True), frozen_layers=2)
    with saved_inside(prefix) as saved:
        model(**inputs).loss.backward()
    assert saved == []
    # The trainable layer does keep what its backward needs (checkpointed: its input, for the recompute), and is
    # recomputed. transformers 5.17 (the GPU machines') checkpoints a layer around its whole `__call__`, hooks
    # included, so the checkpoint's own hooks see the saved input there: only the recompute is visible.
    layer = backbone.layers[2]
    hooks_inside_checkpoint = (GradientCheckpointingLayer is not None and isinstance(layer, GradientCheckpointingLayer)
                               and "__call__" in vars(GradientCheckpointingLayer))
    with saved_inside([layer]) as saved_after, count_runs([layer]) as runs:
        model(**inputs).loss.backward()
    assert runs == [2]
    assert len(saved_after) > 0 or hooks_inside_checkpoint


def test_enable_input_require_grads_reattaches_the_frozen_prefix_so_tfmem_warns(caplog: pytest.LogCaptureFixture) -> None:
    # Why tfmem never calls it: the hook makes the embedding output require grad, and the frozen layers
    # then keep everything for a backward that only passes through them.
    model = build("bert")
    model.enable_input_require_grads()
    with caplog.at_level(logging.WARNING, logger="tfmem"):
        apply_freezing(model, FreezeConfig(embeddings=True, layers=2))
    assert "enable_input_require_grads" in caplog.text
    backbone = find_backbone(model)
    with saved_inside(backbone.layers[:2]) as saved:
        model(**batch(model)).loss.backward()
    assert len(saved) > 0


def test_freezing_only_layers_leaves_the_embeddings_training() -> None:
    model = build("bert")
    apply_freezing(model, FreezeConfig(layers=1))
    model(**batch(model)).loss.backward()
    assert model.bert.embeddings.word_embeddings.weight.grad is not None
    assert all(p.grad is None for p in model.bert.encoder.layer[0].parameters())


def test_frozen_parameters_are_bit_for_bit_unchanged_after_adamw_with_weight_decay() -> None:
    model = build("bert")
    result = apply_freezing(model, FreezeConfig(embeddings=True, layers=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    inputs = batch(model)
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()
    after = dict(model.named_parameters())
    for name in result.frozen_parameter_names:
        assert torch.equal(after[name], before[name]), name
    assert all(not torch.equal(after[n], before[n]) for n in result.trainable_parameter_names)


def test_trainer_builds_no_optimizer_state_for_frozen_parameters(tmp_path) -> None:
    model = build("bert")
    result = apply_freezing(model, FreezeConfig(embeddings=True, layers=2))
    args = tf.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], weight_decay=0.1)
    trainer = tf.Trainer(model=model, args=args)
    trainer.create_optimizer()
    optimizer = trainer.optimizer

    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    frozen = {id(params[n]) for n in result.frozen_parameter_names}
    assert not frozen & in_groups
    assert {id(params[n]) for n in result.trainable_parameter_names} == in_groups

    model(**batch(model)).loss.backward()
    optimizer.step()
    assert optimizer.state and not frozen & {id(p) for p in optimizer.state}


def test_freezing_more_layers_than_the_model_has_is_an_error_that_changes_nothing() -> None:
    model = build("bert")
    config = FreezeConfig(embeddings=True, layers=4)
    expected = (
        "`freeze.layers` is 4 but BertForSequenceClassification has 3 encoder layers (`bert.encoder.layer`); "
        "use 3 or fewer."
    )
    assert freeze_problems(model, config, None) == [expected]
    with pytest.raises(RecipeError, match=r"`freeze.layers` is 4 but .* has 3 encoder layers .*use 3 or fewer"):
        apply_freezing(model, config)
    assert all(p.requires_grad for p in model.parameters())


def test_freezing_every_layer_is_allowed() -> None:
    model = build("bert")
    apply_freezing(model, FreezeConfig(embeddings=True, layers=3))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}


def test_albert_refuses_to_freeze_shared_layers_but_freezes_its_embeddings() -> None:
    model = build("albert")
    with pytest.raises(RecipeError, match=r"`freeze.layers` is 1 but Albert\w+ shares one set of layer weights across all 3"):
        apply_freezing(model, FreezeConfig(layers=1))
    named = ModulePaths(layers="albert.encoder.albert_layer_groups")  # naming the layers does not get around it
    with pytest.raises(RecipeError, match=r"shares one set of layer weights"):
        apply_freezing(model, FreezeConfig(layers=1), named)
    result = apply_freezing(model, FreezeConfig(embeddings=True))
    assert not model.albert.embeddings.LayerNorm.weight.requires_grad
    assert not model.albert.encoder.embedding_hidden_mapping_in.weight.requires_grad
    assert all(p.requires_grad for p in model.albert.encoder.albert_layer_groups.parameters())
    assert result.frozen_layers == 0


@pytest.mark.parametrize(
    ("make", "tied", "embedding"),
    [
        (gpt2_lm, "lm_head.weight", "transformer.wte.weight"),
        (lambda: tf.BertForMaskedLM(tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=64)),
         "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
    ],
)
def test_a_head_tied_to_the_embeddings_is_not_frozen_behind_the_users_back(make, tied: str, embedding: str) -> None:
    model = make()
    message = rf"`freeze.embeddings` is true but .* ties `{tied}` to `{embedding}`.*freeze.embeddings: false"
    with pytest.raises(RecipeError, match=message):
        apply_freezing(model, FreezeConfig(embeddings=True, layers=1))
    assert all(p.requires_grad for p in model.parameters())
    # Freezing layers only is fine.
    apply_freezing(model, FreezeConfig(layers=1))


def test_an_untied_head_stays_trainable_when_the_embeddings_freeze() -> None:
    model = gpt2_lm()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    result = apply_freezing(model, FreezeConfig(embeddings=True))
    assert "lm_head.weight" in result.trainable_parameter_names
    assert not model.transformer.wte.weight.requires_grad


def test_an_unreadable_model_gets_a_recipe_error_saying_how_to_name_its_modules() -> None:
    with pytest.raises(RecipeError, match=r"`freeze` needs .*modules: \{embeddings: .*, layers: .*\}"):
        apply_freezing(Custom(), FreezeConfig(layers=1))


def test_naming_the_modules_lets_an_unreadable_model_be_frozen() -> None:
    model = Custom()
    paths = ModulePaths(embeddings="tok, norm", layers="blocks")
    result = apply_freezing(model, FreezeConfig(embeddings=True, layers=1), paths)
    assert set(result.frozen_parameter_names) == {
        "tok.weight", "norm.weight", "norm.bias", "blocks.0.0.weight", "blocks.0.0.bias",
    }
    inputs = batch(model)
    with saved_inside([model.tok, model.norm, model.blocks[0]]) as saved:
        model(**inputs).loss.backward()
    assert saved == [] and model.blocks[0][0].weight.grad is None and model.blocks[1][0].weight.grad is not None


def test_freezing_embeddings_of_a_model_without_named_embeddings_is_refused() -> None:
    problems = freeze_problems(Custom(), FreezeConfig(embeddings=True), ModulePaths(layers="blocks"))
    assert problems == [
        "`freeze.embeddings` is true but tfmem found no embeddings in Custom; name them with "
        "`modules: {embeddings: <dotted path>}` or set `freeze.embeddings: false`."
    ]


def test_applying_twice_changes_nothing_more() -> None:
    model = build("bert")
    first = apply_freezing(model, FreezeConfig(embeddings=True, layers=1))
    second = apply_freezing(model, FreezeConfig(embeddings=True, layers=1))
    assert first == second


def test_a_disabled_config_freezes_nothing() -> None:
    model = build("bert")
    result = apply_freezing(model, FreezeConfig())
    assert result.frozen_parameter_names == () and all(p.requires_grad for p in model.parameters())
