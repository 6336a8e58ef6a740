"""Find a model's embedding block and its list of repeated layers, across transformer families.

Freezing and checkpointing both need the same two things: which modules turn token ids into the first
hidden states (the *embedding block*), and the `nn.ModuleList` of repeated layers that follows. Hugging
Face models do not name these consistently (`bert.encoder.layer`, `distilbert.transformer.layer`,
`model.layers`, `transformer.h`), so `find_backbone` reads them in three steps:

1. Paths the user named in the recipe (`modules: {embeddings: ..., layers: ...}`) win.
2. A small table of families we test (`_KNOWN`). Besides speed, it carries what structure alone cannot
   see: ALBERT's shared layers, and the parts of an embedding block that live outside the embeddings
   module (ALBERT's and ELECTRA's embedding-to-hidden projection, DeBERTa's relative-position
   embeddings and their LayerNorm).
3. Structural discovery for everything else: anchored on `get_input_embeddings()`, the embedding block
   is the largest module around the word embeddings that does not also hold the layers, plus every
   other `nn.Embedding` outside the layers (position tables such as GPT-2's `wpe`); the layers are the
   longest `nn.ModuleList` of same-type blocks under the base model.

Models without `get_input_embeddings()` are not guessed at: a wrong guess would freeze or checkpoint
the wrong modules silently, so `UnsupportedModelError` asks for the paths instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tfmem.errors import UnsupportedModelError
from tfmem.techniques._fields import quote, type_problem


@dataclass(frozen=True)
class ModulePaths:
    """Where the embeddings and the encoder layers are, for models tfmem cannot read by itself.

    Args:
        embeddings: dotted module path of the embedding block, e.g. "bert.embeddings". Several parts
            may be given separated by commas, e.g. "transformer.wte, transformer.wpe" for a decoder
            whose token and position tables sit directly on the base model.
        layers: dotted module path of the `nn.ModuleList` of encoder layers, e.g. "bert.encoder.layer".
    """

    embeddings: str | None = None
    layers: str | None = None

    def problems(self) -> list[str]:
        out = []
        for name in ("embeddings", "layers"):
            value = getattr(self, name)
            if value is not None:
                problem = type_problem(f"modules.{name}", value, str, f"modules: {{{name}: bert.encoder.layer}}")
                if problem:
                    out.append(problem)
                elif not value.strip():
                    out.append(f"`modules.{name}` is empty; give a dotted module path such as `bert.encoder.layer`.")
        return out

    @property
    def given(self) -> bool:
        return self.embeddings is not None or self.layers is not None


@dataclass
class Backbone:
    """What `find_backbone` found in a model. Paths are dotted names from the top of the model.

    Attributes:
        family: the config's `model_type` ("bert", "gpt2", ...) or the class name when there is none.
        embeddings: the main embedding module (BERT: `bert.embeddings`; GPT-2: `transformer.wte`), or
            None when the model has none that tfmem can find.
        extra_embeddings: other parts of the embedding block, by path (GPT-2's `wpe`, DeBERTa's
            relative-position table, ALBERT's and ELECTRA's projection to the hidden size).
        layers: the repeated layers, in the order the model runs them.
        shared_layers: True when layer positions reuse the same weights (ALBERT), so `layers` holds
            fewer modules than the model runs.
    """

    family: str
    embeddings: nn.Module | None
    embeddings_path: str | None
    layers: list[nn.Module]
    layers_path: str
    shared_layers: bool = False  # ALBERT: every layer position runs the same weights
    notes: list[str] = field(default_factory=list)
    extra_embeddings: dict[str, nn.Module] = field(default_factory=dict)
    layer_positions: int | None = None  # how many layers the model runs; differs from len(layers) when shared

    def embedding_modules(self) -> dict[str, nn.Module]:
        """Every module of the embedding block, by path (empty when there is none)."""
        out = {} if self.embeddings is None else {str(self.embeddings_path): self.embeddings}
        out.update(self.extra_embeddings)
        return out

    def layer_path(self, index: int) -> str:
        return f"{self.layers_path}.{index}"


@dataclass(frozen=True)
class _Known:
    """A family's paths relative to its base model. Embedding parts after the first are optional:
    they exist only with some configurations (ELECTRA's projection when embedding_size != hidden_size)."""

    embeddings: tuple[str, ...]
    layers: str
    shared_layers: bool = False


_BERT = _Known(("embeddings",), "encoder.layer")
_KNOWN: dict[str, _Known] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _Known(("embeddings", "embeddings_project"), "encoder.layer"),
    "distilbert": _Known(("embeddings",), "transformer.layer"),
    "albert": _Known(("embeddings", "encoder.embedding_hidden_mapping_in"), "encoder.albert_layer_groups", True),
    # The relative-position table is read by every layer; left trainable under frozen layers, it would make
    # the frozen layers keep their activations for its gradient. So it belongs to the embedding block.
    "deberta-v2": _Known(("embeddings", "encoder.rel_embeddings", "encoder.LayerNorm"), "encoder.layer"),
    "mpnet": _Known(("embeddings", "encoder.relative_attention_bias"), "encoder.layer"),
    "modernbert": _Known(("embeddings",), "layers"),
    "gpt2": _Known(("wte", "wpe"), "h"),
}

_HOW_TO_NAME = (
    "name them in the recipe by dotted module path, e.g. "
    "`modules: {embeddings: bert.embeddings, layers: bert.encoder.layer}`"
)


def find_backbone(model: nn.Module, paths: ModulePaths | None = None) -> Backbone:
    """Find the embedding block and the repeated layers of `model`, without changing it.

    Args:
        model: a Hugging Face model (any head) or, with `paths`, any `nn.Module`.
        paths: module paths from the recipe's `modules:` section; each one given overrides discovery.

    Returns:
        A `Backbone` whose `layers` are the model's own modules (changing them changes the model).

    Raises:
        UnsupportedModelError: the layers cannot be found, or a named path does not exist or is not a
            list of modules. The message says which `modules:` entry to write.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=64, vocab_size=100))
        >>> backbone = find_backbone(model)
        >>> backbone.embeddings_path, backbone.layers_path, len(backbone.layers)
        ('embeddings', 'encoder.layer', 2)
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None) or name
    paths = paths if paths is not None and paths.given else None

    if paths is None:
        backbone = _from_table(model, family) or _discover(model, family)
    else:
        backbone = _from_paths(model, family, paths)
    if backbone.layer_positions is None:
        backbone.layer_positions = len(backbone.layers)
    return backbone


def _base(model: nn.Module) -> tuple[nn.Module, str]:
    """The base model under the task head (`bert` in BertForSequenceClassification) and its path prefix."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module):
        return base, f"{prefix}."
    return model, ""


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _from_table(model: nn.Module, family: str) -> Backbone | None:
    known = _KNOWN.get(family)
    if known is None:
        return None
    base, prefix = _base(model)
    main, layers = _get(base, known.embeddings[0]), _get(base, known.layers)
    if main is None or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None  # renamed in some transformers version: let structure decide
    extras = {f"{prefix}{p}": m for p in known.embeddings[1:] if (m := _get(base, p)) is not None}
    backbone = Backbone(
        family=family,
        embeddings=main,
        embeddings_path=f"{prefix}{known.embeddings[0]}",
        layers=list(layers),
        layers_path=f"{prefix}{known.layers}",
        extra_embeddings=extras,
        notes=[f"{family}: paths from tfmem's table of known families"],
    )
    if known.shared_layers:
        positions = getattr(getattr(model, "config", None), "num_hidden_layers", len(layers))
        backbone.layer_positions = positions
        backbone.shared_layers = positions != len(layers)
    return backbone


def _layer_lists(root: nn.Module) -> dict[str, nn.ModuleList]:
    """Every non-empty `nn.ModuleList` of same-type blocks with parameters under `root`, by path."""
    out = {}
    for path, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and any(True for _ in module.parameters()):
                out[path] = module
    return out


def _candidates(model: nn.Module) -> str:
    lists = _layer_lists(model)
    if not lists:
        return "it has no nn.ModuleList of layers"
    ordered = sorted(lists.items(), key=lambda item: -len(item[1]))
    shown = ", ".join(f"`{p}` ({len(m)} x {type(m[0]).__name__})" for p, m in ordered)
    return f"module lists it has: {shown}"


def _discover(model: nn.Module, family: str) -> Backbone:
    name = type(model).__name__
    base, prefix = _base(model)
    anchor = None
    getter = getattr(base, "get_input_embeddings", None)
    if callable(getter):
        try:
            anchor = getter()
        except (NotImplementedError, AttributeError):
            anchor = None
    if not isinstance(anchor, nn.Module):
        raise UnsupportedModelError(
            f"tfmem cannot read the structure of {name}: it has no `get_input_embeddings()` to start from, so "
            f"tfmem does not know where its embeddings and layers are; {_HOW_TO_NAME} ({_candidates(model)})."
        )

    lists = {p: m for p, m in _layer_lists(base).items()}
    if not lists:
        raise UnsupportedModelError(
            f"tfmem cannot find the layers of {name}: it has no nn.ModuleList of repeated blocks; {_HOW_TO_NAME}."
        )
    longest = max(len(m) for m in lists.values())
    top = [p for p, m in lists.items() if len(m) == longest]
    # A list nested inside another of the same length is part of one of its blocks: keep the outer one.
    top = [p for p in top if not any(p != q and p.startswith(f"{q}.") for q in top)]
    if len(top) > 1:
        shown = ", ".join(f"`{prefix}{p}`" for p in top)
        raise UnsupportedModelError(
            f"tfmem cannot tell which list holds the layers of {name}: {shown} all have {longest} blocks; "
            f"{_HOW_TO_NAME}."
        )
    layers_rel = top[0]
    layers = lists[layers_rel]

    names = {id(m): p for p, m in base.named_modules()}
    anchor_rel = names.get(id(anchor))
    if anchor_rel is None:
        raise UnsupportedModelError(
            f"tfmem cannot place the input embeddings of {name}: `get_input_embeddings()` returns a module that "
            f"is not part of the model; {_HOW_TO_NAME}."
        )

    def holds_layers(path: str) -> bool:
        return layers_rel == path or layers_rel.startswith(f"{path}.")

    # Widest ancestor of the word embeddings that does not also hold the layers: BertEmbeddings (with its
    # position table and LayerNorm) for BERT, the word table alone for GPT-2 whose parent is the base model.
    main_rel = anchor_rel
    parts = anchor_rel.split(".")
    for depth in range(1, len(parts)):
        ancestor = ".".join(parts[:depth])
        if not holds_layers(ancestor):
            main_rel = ancestor
            break
    extras = {}
    for path, module in base.named_modules():
        inside_main = path == main_rel or path.startswith(f"{main_rel}.")
        if isinstance(module, nn.Embedding) and not holds_layers(path) and not inside_main:
            extras[path] = module
    return Backbone(
        family=family,
        embeddings=_get(base, main_rel),
        embeddings_path=f"{prefix}{main_rel}",
        layers=list(layers),
        layers_path=f"{prefix}{layers_rel}",
        extra_embeddings={f"{prefix}{p}": m for p, m in extras.items()},
        notes=[f"{family}: paths found by structure (word embeddings and the longest list of blocks)"],
    )


def _from_paths(model: nn.Module, family: str, paths: ModulePaths) -> Backbone:
    name = type(model).__name__
    if paths.layers is not None:
        layers_path = paths.layers.strip()
        layers = _get(model, layers_path)
        if layers is None:
            raise UnsupportedModelError(
                f"`modules.layers` is {quote(paths.layers)} but {name} has no module at that path; give the dotted path "
                f"of its list of layers ({_candidates(model)})."
            )
        if not isinstance(layers, nn.ModuleList | nn.Sequential) or len(layers) == 0:
            raise UnsupportedModelError(
                f"`modules.layers` is {quote(paths.layers)} but that module is a {type(layers).__name__}, not a non-empty "
                f"nn.ModuleList of layers; name the list itself ({_candidates(model)})."
            )
        found = Backbone(family, None, None, list(layers), layers_path, notes=["layers named in the recipe"])
        known = _from_table(model, family)
        if known is not None and known.layers_path == layers_path:  # naming ALBERT's layers keeps them shared
            found.shared_layers, found.layer_positions = known.shared_layers, known.layer_positions
    else:
        found = _from_table(model, family) or _discover(model, family)
        found.embeddings, found.embeddings_path, found.extra_embeddings = None, None, {}

    if paths.embeddings is not None:
        parts = [p.strip() for p in paths.embeddings.split(",") if p.strip()]
        if not parts:
            raise UnsupportedModelError(
                f"`modules.embeddings` is {quote(paths.embeddings)}, which names no module; give a dotted module path "
                "such as `bert.embeddings` (several separated by commas)."
            )
        modules = {}
        for part in parts:
            module = _get(model, part)
            if module is None:
                raise UnsupportedModelError(
                    f"`modules.embeddings` is {quote(paths.embeddings)} but {name} has no module at {quote(part)}; give the "
                    "dotted path of its embedding block (several parts separated by commas)."
                )
            if any(_contains(module, layer) for layer in found.layers):
                raise UnsupportedModelError(
                    f"`modules.embeddings` is {quote(paths.embeddings)} but {quote(part)} holds the layers too; name only "
                    "the modules that embed the tokens."
                )
            modules[part] = module
        first = next(iter(modules))
        found.embeddings, found.embeddings_path = modules.pop(first), first
        found.extra_embeddings = modules
        found.notes.append("embeddings named in the recipe")
    elif paths.layers is not None:
        # Layers named, embeddings not: use the model's own word embeddings when it has them.
        try:
            discovered = _from_table(model, family) or _discover(model, family)
        except UnsupportedModelError:
            discovered = None
        if discovered is not None:
            found.embeddings, found.embeddings_path = discovered.embeddings, discovered.embeddings_path
            found.extra_embeddings = discovered.extra_embeddings
        else:
            found.notes.append("no embeddings found or named")
    return found


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())
