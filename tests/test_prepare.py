"""`Recipe.prepare_model`: freezing first, then checkpointing that leaves the frozen prefix alone."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from tfmem import Recipe, RecipeError
from tfmem.techniques.checkpointing import is_checkpointed


def four_layer_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4,
                                                    num_attention_heads=2, intermediate_size=64))


def test_prepare_model_checkpoints_only_the_trainable_layers():
    recipe = Recipe.from_dict({"name": "r", "gradient_checkpointing": True,
                               "freeze": {"embeddings": True, "layers": 2}})
    model = recipe.prepare_model(four_layer_bert())
    layers = model.bert.encoder.layer
    assert [is_checkpointed(layer) for layer in layers] == [False, False, True, True]
    assert [any(p.requires_grad for p in layer.parameters()) for layer in layers] == [False, False, True, True]
    assert not any(p.requires_grad for p in model.bert.embeddings.parameters())


def test_prepare_model_leaves_the_model_untouched_when_the_recipe_does_not_fit():
    model = four_layer_bert()
    recipe = Recipe.from_dict({"name": "r", "gradient_checkpointing": True, "freeze": {"layers": 9}})
    with pytest.raises(RecipeError, match=r"`freeze.layers` is 9"):
        recipe.prepare_model(model)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(is_checkpointed(layer) for layer in model.bert.encoder.layer)
