"""Layer freezing: stop training the embedding block and/or the first N layers.

Frozen parameters get `requires_grad=False`. That does three things, and all three are the point:

- they get no gradient (`.grad` stays None), so no gradient memory;
- optimizers built over `p for p in model.parameters() if p.requires_grad` (as `transformers.Trainer`
  does) hold no state for them, so no Adam moments; and AdamW skips parameters whose `.grad` is None,
  so weight decay cannot creep into them either;
- when the embeddings *and* the first N layers are frozen, nothing in that prefix needs a gradient, so
  autograd records nothing there: the prefix runs as if under `torch.no_grad()` and keeps no activations
  for backward. This holds only while nothing makes the embedding output require grad, which is exactly
  what `PreTrainedModel.enable_input_require_grads()` does (transformers calls it for *reentrant*
  checkpointing). tfmem never calls it (its checkpointing is non-reentrant and does not need it), and
  `apply_freezing` warns when the model already carries its hook.

Decisions worth knowing:

- The embedding block is what `find_backbone` calls it: the embeddings module with its LayerNorm, plus
  the parts that live elsewhere but only embed (GPT-2's `wpe`, DeBERTa-v2's relative-position table and
  its LayerNorm, MPNet's relative-attention bias, ALBERT's and ELECTRA's projection to the hidden size).
- The head (classifier, pooler, LM head) and anything after the layers (GPT-2's `ln_f`, ModernBERT's
  `final_norm`) stay trainable.
- ALBERT runs one set of layer weights at every layer position, so "the first 2 layers" has no weights
  of its own: `freeze.layers > 0` is refused for ALBERT; `freeze.embeddings` is fine.
- A head tied to the input embeddings (GPT-2's and BERT's LM heads share the word-embedding matrix) would
  be frozen with them, silently turning off training of the output layer. `freeze.embeddings` is refused
  for such models; the message says how to untie or to freeze layers only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from tfmem.errors import RecipeError, UnsupportedModelError
from tfmem.techniques._fields import count_problem, type_problem
from tfmem.techniques.architecture import Backbone, ModulePaths, find_backbone

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FreezeConfig:
    """Which part of the model to freeze.

    Args:
        embeddings: freeze the embedding block (word, position, type embeddings and their LayerNorm).
        layers: freeze the first N encoder layers (0 freezes none).
    """

    embeddings: bool = False
    layers: int = 0

    def problems(self) -> list[str]:
        out = []
        if problem := type_problem("freeze.embeddings", self.embeddings, bool, "freeze: {embeddings: true}"):
            out.append(problem)
        if problem := count_problem(
            "freeze.layers", self.layers, minimum=0, example="freeze: {layers: 6}",
            meaning="the number of leading encoder layers to freeze",
        ):
            out.append(problem)
        return out

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise RecipeError(problems)

    @property
    def enabled(self) -> bool:
        return bool(self.embeddings) or self.layers > 0


@dataclass(frozen=True)
class FreezeResult:
    """What `apply_freezing` froze, and what is left to train.

    Attributes:
        frozen_embeddings: the embedding block is frozen.
        frozen_layers: how many leading layers are frozen.
        frozen_parameter_names: names (as in `model.named_parameters()`) of the parameters frozen.
        trainable_parameter_names: names of the parameters that still require grad after freezing.
    """

    frozen_embeddings: bool
    frozen_layers: int
    frozen_parameter_names: tuple[str, ...]
    trainable_parameter_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class FreezeSummary:
    """What a `FreezeConfig` freezes in one model and what still trains, worked out without changing it.

    The profiler puts `note` in a result row; `tfmem.prepare` warns with it. Freezing every layer is
    legal (a linear probe on a frozen encoder) but rarely meant: a 12-layer recipe such as `bert-base-8gb`
    applied to a 6-layer model trains only the head.

    Attributes:
        embeddings: the embedding block is frozen.
        frozen_layers: how many leading layers are frozen.
        layer_count: how many layers the model has (None when nothing is frozen: the model was not read).
        trainable: the parts that still train, in model order, e.g. ("layers 2-5", "bert.pooler", "classifier").
    """

    embeddings: bool
    frozen_layers: int
    layer_count: int | None
    trainable: tuple[str, ...]

    @property
    def all_layers_frozen(self) -> bool:
        return bool(self.layer_count) and self.frozen_layers >= self.layer_count  # type: ignore[operator]

    @property
    def frozen(self) -> str:
        """What is frozen, for people: "embeddings + layers 0-5", "layers 0-1", "nothing"."""
        parts = ["embeddings"] if self.embeddings else []
        if self.frozen_layers:
            parts.append(_layer_range(0, self.frozen_layers - 1))
        return " + ".join(parts) or "nothing"

    @property
    def note(self) -> str:
        """One line when every layer is frozen (else ""): how many, and what is left to train."""
        if not self.all_layers_frozen:
            return ""
        trains = ", ".join(self.trainable) or "nothing"
        return (
            f"freezes all {self.layer_count} of {self.layer_count} layers{' and the embeddings' if self.embeddings else ''}; "
            f"only {trains} train{'s' if len(self.trainable) == 1 else ''}"
        )


def freeze_summary(model: nn.Module, config: FreezeConfig, paths: ModulePaths | None = None) -> FreezeSummary:
    """What `apply_freezing(model, config, paths)` would freeze, and what would still train; `model` is not changed.

    Raises:
        RecipeError: with every line of `freeze_problems`.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
        >>> summary = freeze_summary(model, FreezeConfig(embeddings=True, layers=2))
        >>> summary.frozen, summary.trainable
        ('embeddings + layers 0-1', ('bert.pooler', 'classifier'))
        >>> summary.note
        'freezes all 2 of 2 layers and the embeddings; only bert.pooler, classifier train'
    """
    if not config.enabled:
        return FreezeSummary(False, 0, None, ("everything",))
    if problems := freeze_problems(model, config, paths):
        raise RecipeError(problems, source=type(model).__name__)
    backbone = find_backbone(model, paths)
    frozen = {id(p) for m in _modules_to_freeze(backbone, config) for p in m.parameters()}
    layer_of = {id(p): i for i, layer in enumerate(backbone.layers) for p in layer.parameters()}
    trainable: dict[str, None] = {}  # ordered set
    trainable_layers: list[int] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or id(parameter) in frozen:
            continue
        if id(parameter) in layer_of:
            trainable_layers.append(layer_of[id(parameter)])
            trainable.setdefault("layers", None)
        else:
            trainable.setdefault(".".join(name.split(".")[:-1][:2]) or name, None)
    parts = [_layer_range(min(trainable_layers), max(trainable_layers)) if p == "layers" else p for p in trainable]
    return FreezeSummary(bool(config.embeddings), config.layers, len(backbone.layers), tuple(parts))


def _modules_to_freeze(backbone: Backbone, config: FreezeConfig) -> list[nn.Module]:
    modules: list[nn.Module] = list(backbone.embedding_modules().values()) if config.embeddings else []
    return modules + list(backbone.layers[: config.layers])


def _layer_range(first: int, last: int) -> str:
    return f"layer {first}" if first == last else f"layers {first}-{last}"


def freeze_problems(model: nn.Module, config: FreezeConfig, paths: ModulePaths | None) -> list[str]:
    """Everything that stops `config` from applying to `model`, one line each; the model is not changed.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
        >>> print(*freeze_problems(model, FreezeConfig(layers=3), None))
        `freeze.layers` is 3 but BertForSequenceClassification has 2 encoder layers (`bert.encoder.layer`); use 2 or fewer.
    """
    if not config.enabled:
        return []
    name = type(model).__name__
    try:
        backbone = find_backbone(model, paths)
    except UnsupportedModelError as error:
        return [f"`freeze` needs to know the model's structure, but {_lowercase_first(str(error))}"]

    problems = []
    if config.embeddings and not backbone.embedding_modules():
        problems.append(
            f"`freeze.embeddings` is true but tfmem found no embeddings in {name}; name them with "
            "`modules: {embeddings: <dotted path>}` or set `freeze.embeddings: false`."
        )
    if config.layers > 0 and backbone.shared_layers:
        problems.append(
            f"`freeze.layers` is {config.layers} but {name} shares one set of layer weights across all "
            f"{backbone.layer_positions} layer positions (ALBERT), so its first {config.layers} layers cannot be "
            "frozen apart from the rest; use `freeze.layers: 0` (`freeze.embeddings: true` still works)."
        )
    elif config.layers > len(backbone.layers):
        count = len(backbone.layers)
        problems.append(
            f"`freeze.layers` is {config.layers} but {name} has {count} encoder layers (`{backbone.layers_path}`); "
            f"use {count} or fewer."
        )
    if config.embeddings:
        for embedding_name, tied_name in _tied_outside(model, backbone):
            problems.append(
                f"`freeze.embeddings` is true but {name} ties `{tied_name}` to `{embedding_name}`, so freezing the "
                f"embeddings would freeze that head too; set `freeze.embeddings: false` (freezing layers is fine), "
                f"or untie it before applying the recipe (give `{tied_name}` its own copy of the weights and set "
                "`config.tie_word_embeddings = False`)."
            )
    return problems


def apply_freezing(model: nn.Module, config: FreezeConfig, paths: ModulePaths | None = None) -> FreezeResult:
    """Freeze the embedding block and/or the first `config.layers` layers of `model`, in place.

    Applying the same config twice changes nothing more. Build the optimizer after this call, from
    parameters that require grad, so frozen ones get no optimizer state.

    Args:
        model: the model to change.
        config: what to freeze.
        paths: the recipe's `modules:` paths, for models tfmem cannot read by itself.

    Returns:
        What was frozen, and what stays trainable.

    Raises:
        RecipeError: with every line of `freeze_problems` (nothing is changed then).

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
        >>> result = apply_freezing(model, FreezeConfig(embeddings=True, layers=1))
        >>> result.frozen_layers, model.bert.encoder.layer[0].output.dense.weight.requires_grad
        (1, False)
        >>> "classifier.weight" in result.trainable_parameter_names
        True
    """
    if problems := freeze_problems(model, config, paths):
        raise RecipeError(problems, source=type(model).__name__)
    if not config.enabled:
        return FreezeResult(False, 0, (), tuple(n for n, p in model.named_parameters() if p.requires_grad))
    backbone = find_backbone(model, paths)

    if config.embeddings:
        _warn_if_input_grads_forced(model, backbone)
    modules = _modules_to_freeze(backbone, config)

    names = {id(p): n for n, p in model.named_parameters()}
    frozen: dict[str, None] = {}  # ordered set
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(False)
            frozen[names[id(parameter)]] = None
    trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    logger.info(
        "tfmem: froze %s%d layers of %s (%d parameter tensors); %d trainable parameter tensors remain, from %s to %s",
        "the embeddings and " if config.embeddings else "",
        config.layers,
        type(model).__name__,
        len(frozen),
        len(trainable),
        trainable[0] if trainable else "-",
        trainable[-1] if trainable else "-",
    )
    return FreezeResult(bool(config.embeddings), config.layers, tuple(frozen), trainable)


def _tied_outside(model: nn.Module, backbone: Backbone) -> list[tuple[str, str]]:
    """(embedding parameter name, other name) for embedding parameters also used outside the embedding block."""
    block_ids = {id(p) for m in backbone.embedding_modules().values() for p in m.parameters()}
    prefixes = tuple(f"{path}." for path in backbone.embedding_modules())
    first_name: dict[int, str] = {}
    tied = []
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) not in block_ids:
            continue
        if name.startswith(prefixes):
            first_name.setdefault(id(parameter), name)
        else:
            tied.append((id(parameter), name))
    return [(first_name.get(pid, "the input embeddings"), name) for pid, name in tied]


def _warn_if_input_grads_forced(model: nn.Module, backbone: Backbone) -> None:
    for module in backbone.embedding_modules().values():
        for sub in module.modules():
            for hook in sub._forward_hooks.values():
                if getattr(hook, "__name__", "") == "make_inputs_require_grads":
                    logger.warning(
                        "tfmem: %s has a hook from `enable_input_require_grads()` on its embeddings; the frozen "
                        "layers will keep their activations for backward. Call `model.disable_input_require_grads()` "
                        "unless you need reentrant checkpointing (tfmem's checkpointing does not).",
                        type(model).__name__,
                    )
                    return


def _lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:]
