"""Recipe: an immutable, validated combination of memory techniques.

A Recipe composes one config piece per technique and knows how to read and write itself. It does not
train: `apply`, `prepare_model` and `accelerator_kwargs` hand it to an adapter, which translates it into
the framework's own machinery.

The YAML/dict keys are a public contract:

    name: bert-base-8gb
    description: one line for `tfmem recipes`
    gradient_accumulation_steps: 4        # micro-batch = effective batch / 4
    gradient_checkpointing: true
    mixed_precision: bf16                 # no | fp16 | bf16
    freeze:
      embeddings: true
      layers: 6                           # the first 6 encoder layers
    modules:                              # only for architectures tfmem cannot read by itself
      embeddings: bert.embeddings
      layers: bert.encoder.layer
    auto_micro_batch: true                # on out-of-memory, halve the micro-batch and retry
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tfmem.errors import RecipeError
from tfmem.files import write_text_atomic
from tfmem.techniques.accumulation import AccumulationConfig
from tfmem.techniques.architecture import ModulePaths
from tfmem.techniques.checkpointing import CheckpointingConfig
from tfmem.techniques.freezing import FreezeConfig
from tfmem.techniques.micro_batch import AutoMicroBatchConfig
from tfmem.techniques.precision import PrecisionConfig

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import Trainer, TrainingArguments

TOP_LEVEL_KEYS = (
    "name",
    "description",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "mixed_precision",
    "freeze",
    "modules",
    "auto_micro_batch",
)
FREEZE_KEYS = ("embeddings", "layers")
MODULES_KEYS = ("embeddings", "layers")


@dataclass(frozen=True)
class Recipe:
    """A named, validated combination of memory techniques.

    Build one from a dict, a YAML/JSON file or a shipped name rather than field by field:

        >>> r = Recipe.from_dict({"name": "mine", "gradient_accumulation_steps": 4, "mixed_precision": "bf16"})
        >>> r.gradient_accumulation_steps, r.mixed_precision
        (4, 'bf16')
        >>> Recipe.from_dict(r.to_dict()) == r
        True

    Attributes:
        name: identifies the recipe in tables and logs.
        description: one line saying what it saves and what it costs.
        accumulation, checkpointing, precision, freeze, modules: the technique pieces.
    """

    name: str = "custom"
    description: str = ""
    accumulation: AccumulationConfig = field(default_factory=AccumulationConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    modules: ModulePaths = field(default_factory=ModulePaths)
    micro_batch: AutoMicroBatchConfig = field(default_factory=AutoMicroBatchConfig)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.name, str) or not self.name.strip():
            problems.append(f"`name` must be a non-empty string, got {self.name!r}; for example `name: bert-base-8gb`.")
        if not isinstance(self.description, str):
            problems.append(f"`description` must be a string, got {self.description!r}.")
        problems += self.modules.problems()
        if problems:
            raise RecipeError(problems)

    # -- flat views of the public keys ------------------------------------------------------------

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.accumulation.steps

    @property
    def gradient_checkpointing(self) -> bool:
        return self.checkpointing.enabled

    @property
    def mixed_precision(self) -> str:
        return self.precision.mode

    @property
    def auto_micro_batch(self) -> bool:
        return self.micro_batch.enabled

    # -- dict / YAML / JSON -----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> Recipe:
        """Build a recipe from the public keys, reporting every problem at once.

        Args:
            data: a mapping with the keys shown in the module docstring; all are optional except that
                a recipe is usually named.
            source: where the data came from (a file path), quoted in error messages.

        Raises:
            RecipeError: listing every unknown key, wrong type and bad value.
        """
        if not isinstance(data, Mapping):
            raise RecipeError(
                f"a recipe must be a mapping of keys such as `gradient_accumulation_steps: 4`, got {type(data).__name__}.",
                source=source,
            )
        problems = _unknown_keys(data, TOP_LEVEL_KEYS, prefix="")
        pieces: dict[str, Any] = {}

        def build(key: str, factory, *args, **kwargs) -> None:
            try:
                pieces[key] = factory(*args, **kwargs)
            except RecipeError as e:
                problems.extend(e.problems)

        if "gradient_accumulation_steps" in data:
            build("accumulation", AccumulationConfig, data["gradient_accumulation_steps"])
        if "gradient_checkpointing" in data:
            build("checkpointing", CheckpointingConfig, data["gradient_checkpointing"])
        if "mixed_precision" in data:
            build("precision", PrecisionConfig, data["mixed_precision"])
        if "auto_micro_batch" in data:
            build("micro_batch", AutoMicroBatchConfig, data["auto_micro_batch"])
        for key, known, factory in (("freeze", FREEZE_KEYS, FreezeConfig), ("modules", MODULES_KEYS, ModulePaths)):
            if key not in data or data[key] is None:
                continue
            section = data[key]
            if not isinstance(section, Mapping):
                problems.append(
                    f"`{key}` must be a mapping such as `{key}: {{{known[0]}: ..., {known[1]}: ...}}`, got {section!r}."
                )
                continue
            problems += _unknown_keys(section, known, prefix=f"{key}.")
            build(key, factory, **{k: v for k, v in section.items() if k in known})
        for key in ("name", "description"):
            if key in data:
                pieces[key] = data[key]
        if problems:
            raise RecipeError(problems, source=source)
        try:
            return cls(**pieces)
        except RecipeError as e:
            raise RecipeError(e.problems, source=source) from None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data under the public keys; `Recipe.from_dict` inverts it exactly."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["gradient_accumulation_steps"] = self.accumulation.steps
        out["gradient_checkpointing"] = self.checkpointing.enabled
        out["mixed_precision"] = self.precision.mode
        out["freeze"] = {"embeddings": self.freeze.embeddings, "layers": self.freeze.layers}
        modules = {k: getattr(self.modules, k) for k in MODULES_KEYS if getattr(self.modules, k) is not None}
        if modules:
            out["modules"] = modules
        if self.micro_batch.enabled:
            out["auto_micro_batch"] = True
        return out

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some public keys changed, validated like any other recipe.

        Example:
            >>> Recipe.from_dict({"name": "a"}).replace(gradient_accumulation_steps=2).gradient_accumulation_steps
            2
        """
        data = self.to_dict()
        for key, value in changes.items():
            if key in ("freeze", "modules") and isinstance(value, Mapping):
                data[key] = {**data.get(key, {}), **value}
            else:
                data[key] = value
        return Recipe.from_dict(data)

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """The recipe as commented YAML; written atomically to `path` when one is given.

        The comments say what each setting saves and costs, so a file the planner writes reads like a
        shipped one. Comments are ignored on loading: `Recipe.from_yaml` round-trips it exactly.
        """
        text = _commented_yaml(self.to_dict())
        if path is not None:
            write_text_atomic(Path(path), text)
        return text

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Recipe:
        """Load a recipe from a YAML file (or a JSON file: JSON is YAML). Safe loading only: no code runs.

        Raises:
            FileNotFoundError: the file does not exist.
            RecipeError: the file is not valid YAML, or the recipe in it is invalid.
        """
        path = Path(path)
        text = _read(path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise RecipeError(f"the file is not valid YAML{where}: {getattr(e, 'problem', e)}.", source=str(path)) from None
        if data is None:
            raise RecipeError("the file is empty; a recipe needs at least a `name`.", source=str(path))
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Recipe:
        """Load a recipe from a JSON file."""
        path = Path(path)
        try:
            data = json.loads(_read(path))
        except json.JSONDecodeError as e:
            raise RecipeError(f"the file is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}.", source=str(path)) from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str]) -> Recipe:
        """Load a shipped recipe by name (see `tfmem recipes`) or a recipe file by path.

        Raises:
            RecipeError: no shipped recipe has that name and no such file exists; the message lists the names.
        """
        from tfmem.shipped import shipped_recipe_names, shipped_recipe_path

        text = str(name_or_path)
        path = Path(text)
        if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists():
            if path.suffix.lower() == ".json":
                return cls.from_json(path)
            return cls.from_yaml(path)
        shipped = shipped_recipe_path(text)
        if shipped is None:
            names = shipped_recipe_names()
            close = difflib.get_close_matches(text, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(
                f"no shipped recipe is named {text!r} and no such file exists.{hint} "
                f"Shipped recipes: {', '.join(names)}; or give the path of a .yaml file."
            )
        return cls.from_yaml(shipped)

    # -- handing the recipe to a framework --------------------------------------------------------

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Freeze and checkpoint `model` in place as the recipe says, and return it.

        Framework-neutral: used by both adapters. See `tfmem.prepare.prepare_model`.
        """
        from tfmem.prepare import prepare_model

        return prepare_model(model, self)

    def accelerator_kwargs(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """Keyword arguments for `accelerate.Accelerator`, checked against the device it will use.

        Example:
            >>> Recipe.from_dict({"gradient_accumulation_steps": 2}).accelerator_kwargs(device="cpu")
            {'gradient_accumulation_steps': 2, 'mixed_precision': 'no'}
        """
        from tfmem.adapters.accelerate import accelerator_kwargs

        return accelerator_kwargs(self, device=device)

    def training_arguments(self, args: TrainingArguments) -> TrainingArguments:
        """A copy of `args` that carries this recipe, for building a Trainer yourself.

        Pair it with `prepare_model(model)` and `compute_loss_func=recipe.compute_loss_func(model)`; or
        build the Trainer as usual and call `apply(trainer)`, which does all three.
        """
        from tfmem.adapters.trainer import training_arguments

        return training_arguments(self, args)

    def compute_loss_func(self, model: nn.Module, args: TrainingArguments | None = None):
        """The Trainer `compute_loss_func` that keeps accumulated gradients exact (None when not needed).

        Pass the `args` the Trainer will get to leave it out when nothing accumulates.
        """
        from tfmem.adapters.trainer import compute_loss_func

        return compute_loss_func(self, model, args)

    def apply(self, trainer: Trainer) -> Trainer:
        """Apply the recipe to a constructed `transformers.Trainer` that has not started training.

        All or nothing: every check runs before anything changes, so an error leaves the trainer as it was.

        Raises:
            RecipeError: the recipe contradicts the trainer's arguments, does not fit the model or device,
                or the trainer's optimizer already exists.
        """
        from tfmem.adapters.trainer import apply_recipe

        return apply_recipe(self, trainer)

    def micro_batch_splitter(self, model: nn.Module):
        """A `MicroBatchSplitter` for an accelerate loop when `auto_micro_batch` is on, else None."""
        from tfmem.techniques.micro_batch import MicroBatchSplitter

        return MicroBatchSplitter(model) if self.micro_batch.enabled else None

    def summary(self) -> str:
        """One line naming the techniques, for tables."""
        parts = []
        if self.accumulation.steps > 1:
            parts.append(f"accumulate x{self.accumulation.steps}")
        if self.checkpointing.enabled:
            parts.append("checkpointing")
        if self.precision.mode != "no":
            parts.append(self.precision.mode)
        if self.freeze.embeddings:
            parts.append("freeze embeddings")
        if self.freeze.layers:
            parts.append(f"freeze {self.freeze.layers} layers")
        if self.micro_batch.enabled:
            parts.append("auto micro-batch")
        return ", ".join(parts) or "no techniques (baseline)"


def _unknown_keys(data: Mapping[str, Any], known: tuple[str, ...], prefix: str) -> list[str]:
    problems = []
    for key in data:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f"did you mean `{prefix}{close[0]}`?" if close else f"known keys: {', '.join(prefix + k for k in known)}."
        problems.append(f"unknown key `{prefix}{key}`; {hint}")
    return problems


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"recipe file {str(path)!r} does not exist; check the path, or run `tfmem recipes` for shipped names.") from None


_COMMENTS = {
    "gradient_accumulation_steps": "micro-batch = effective batch / this; 1 = no accumulation",
    "gradient_checkpointing": "true recomputes layer activations in backward: less memory, ~30% more compute",
    "mixed_precision": "no | fp16 | bf16; bf16 needs compute capability 8.0+ on GPU",
    "freeze": "frozen parts get no gradient and no optimizer state (changes what is learned)",
    "modules": "only for architectures tfmem cannot read by itself",
    "auto_micro_batch": "on out-of-memory, halve the micro-batch and retry (effective batch unchanged)",
}


def _commented_yaml(data: dict[str, Any]) -> str:
    lines = []
    for key, value in data.items():
        comment = f"  # {_COMMENTS[key]}" if key in _COMMENTS else ""
        if isinstance(value, dict):
            lines.append(f"{key}:{comment}")
            for sub, subvalue in value.items():
                lines.append(f"  {sub}: {_scalar(subvalue)}")
        else:
            lines.append(f"{key}: {_scalar(value)}{comment}")
    return "\n".join(lines) + "\n"


def _scalar(value: Any) -> str:
    # yaml.safe_dump of a scalar quotes exactly what needs quoting (e.g. "no", which YAML would read as False).
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()
