"""find_backbone: the embedding block and the layers, for every family tfmem supports and for models it cannot read."""

from __future__ import annotations

import pytest
from _families import FAMILIES, LAYER_PATHS, Custom, build
from torch import nn

from tfmem.errors import UnsupportedModelError
from tfmem.techniques import architecture
from tfmem.techniques.architecture import ModulePaths, find_backbone


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_the_layers_and_the_word_embeddings_of_every_family(family: str) -> None:
    model = build(family)
    backbone = find_backbone(model)

    assert backbone.family == family
    assert backbone.layers_path == LAYER_PATHS[family]
    container = model.get_submodule(LAYER_PATHS[family])
    assert len(backbone.layers) == len(container) and all(a is b for a, b in zip(backbone.layers, container))
    # The block holds the model's own word embeddings (not a copy) ...
    block = [p for m in backbone.embedding_modules().values() for p in m.parameters()]
    assert any(p is model.get_input_embeddings().weight for p in block)
    # ... and nothing of the layers.
    layer_ids = {id(p) for layer in backbone.layers for p in layer.parameters()}
    assert not layer_ids & {id(p) for p in block}


def test_albert_reports_one_set_of_weights_run_at_every_layer_position() -> None:
    backbone = find_backbone(build("albert"))
    assert backbone.shared_layers and len(backbone.layers) == 1 and backbone.layer_positions == 3


@pytest.mark.parametrize(
    ("family", "parts"),
    [
        ("bert", {"bert.embeddings"}),
        ("gpt2", {"transformer.wte", "transformer.wpe"}),  # a decoder: no embeddings module, two tables
        ("deberta-v2", {"deberta.embeddings", "deberta.encoder.rel_embeddings", "deberta.encoder.LayerNorm"}),
        ("mpnet", {"mpnet.embeddings", "mpnet.encoder.relative_attention_bias"}),
        ("electra", {"electra.embeddings", "electra.embeddings_project"}),
        ("albert", {"albert.embeddings", "albert.encoder.embedding_hidden_mapping_in"}),
    ],
)
def test_the_embedding_block_includes_parts_outside_the_embeddings_module(family: str, parts: set[str]) -> None:
    assert set(find_backbone(build(family)).embedding_modules()) == parts


@pytest.mark.parametrize("family", FAMILIES)
def test_structure_alone_finds_the_same_layers_without_the_table(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # What an unknown family gets: discovery from get_input_embeddings() and the longest ModuleList.
    model = build(family)
    expected = find_backbone(model)
    monkeypatch.setattr(architecture, "_KNOWN", {})
    found = find_backbone(model)
    assert found.layers_path == expected.layers_path
    assert found.embeddings_path == expected.embeddings_path
    # Embedding tables outside the embeddings module are found by structure too (GPT-2's wpe, MPNet's
    # relative bias, DeBERTa's relative table); only the table knows the projections and DeBERTa's LayerNorm.
    tables = {p for p in expected.extra_embeddings if isinstance(model.get_submodule(p), nn.Embedding)}
    assert set(found.extra_embeddings) == tables


def test_an_unreadable_model_is_refused_with_how_to_name_its_modules() -> None:
    with pytest.raises(UnsupportedModelError, match=r"modules: \{embeddings: .*, layers: .*\}.*`blocks` \(3 x Sequential\)"):
        find_backbone(Custom())


def test_naming_the_modules_makes_an_unreadable_model_readable() -> None:
    model = Custom()
    backbone = find_backbone(model, ModulePaths(embeddings="tok, norm", layers="blocks"))
    assert backbone.layers_path == "blocks" and all(a is b for a, b in zip(backbone.layers, model.blocks))
    assert backbone.embedding_modules() == {"tok": model.tok, "norm": model.norm}


def test_named_paths_override_what_tfmem_would_find() -> None:
    model = build("bert")
    paths = ModulePaths(embeddings="bert.embeddings.word_embeddings", layers="bert.encoder.layer")
    backbone = find_backbone(model, paths)
    assert backbone.embedding_modules() == {"bert.embeddings.word_embeddings": model.bert.embeddings.word_embeddings}


def test_only_layers_named_still_finds_the_models_own_embeddings() -> None:
    model = build("bert")
    backbone = find_backbone(model, ModulePaths(layers="bert.encoder.layer"))
    assert backbone.embeddings is model.bert.embeddings


def test_an_empty_modules_section_means_discovery() -> None:
    assert find_backbone(build("bert"), ModulePaths()).layers_path == "bert.encoder.layer"


def test_a_misspelt_layers_path_names_the_field_the_value_and_the_lists_it_could_be() -> None:
    with pytest.raises(UnsupportedModelError, match=r"`modules.layers` is 'blockz' but Custom has no module .*`blocks`"):
        find_backbone(Custom(), ModulePaths(layers="blockz"))


def test_a_layers_path_that_is_not_a_list_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match=r"`modules.layers` is 'head' but that module is a Linear"):
        find_backbone(Custom(), ModulePaths(layers="head"))


def test_a_misspelt_embeddings_path_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match=r"`modules.embeddings` is 'tok, nrom' but Custom has no module at 'nrom'"):
        find_backbone(Custom(), ModulePaths(embeddings="tok, nrom", layers="blocks"))


def test_embeddings_that_hold_the_layers_are_refused() -> None:
    # Naming the whole model as "embeddings" would freeze the layers (and head) with it.
    with pytest.raises(UnsupportedModelError, match=r"`modules.embeddings` is 'bert' but 'bert' holds the layers too"):
        find_backbone(build("bert"), ModulePaths(embeddings="bert", layers="bert.encoder.layer"))


class _TwoStacks(nn.Module):
    """Readable embeddings, but two lists of equal length: which one is "the layers" is a guess."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.left = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.right = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def get_input_embeddings(self) -> nn.Module:
        return self.embed


def test_two_equally_likely_layer_lists_are_refused_rather_than_guessed() -> None:
    with pytest.raises(UnsupportedModelError, match=r"cannot tell which list .*`left`, `right`.*modules:"):
        find_backbone(_TwoStacks())
    assert find_backbone(_TwoStacks(), ModulePaths(layers="right")).layers_path == "right"
