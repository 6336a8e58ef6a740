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
from tfmem.techniques._fields import type_problem
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
        if problem := type_problem("freeze.layers", self.layers, int, "freeze: {layers: 6}"):
            out.append(problem)
        elif self.layers < 0:
            out.append(f"`freeze.layers` must be 0 or more (the number of leading encoder layers to freeze), got {self.layers}.")
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

    modules: list[nn.Module] = []
    if config.embeddings:
        modules += backbone.embedding_modules().values()
        _warn_if_input_grads_forced(model, backbone)
    modules += backbone.layers[: config.layers]

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
