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
    optimizer: adamw                      # adamw | adamw-8bit | adafactor (the last two change what is learned)
    tf32: false                           # true: fp32 matmuls on TF32 tensor cores (CUDA 8.0+)
    group_by_length: false                # true: batches of similar length, less padding

Layering: this module imports the techniques and nothing above them. The convenience methods that hand
the recipe to a framework (`apply`, `prepare_model`, `training_arguments`, ...) import their adapter
inside the method, when called, so `tfmem.recipe` never loads an adapter and the adapters, which take a
Recipe, name it only for type checking (tests/test_layering.py pins this).

Adding a key: give `Recipe` a field holding the technique's config piece, and add one `_Key` to
`tfmem.recipe_keys.KEYS` (its docstring shows how). `from_dict`, `to_dict`, `to_yaml`'s comments, the type
checks of `Recipe(...)`, and the unknown-key hints all follow from that entry.

Files: which file a name means, reading a file's data and writing commented YAML are in
`tfmem.recipe_io` (paths, text and plain data); this module turns that data into a Recipe and back.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tfmem.errors import RecipeError
from tfmem.files import write_text_atomic
from tfmem.recipe_io import commented_yaml, read_json_data, read_yaml_data, recipe_path
from tfmem.recipe_keys import KEY_NAMES, KEY_OF_ATTRIBUTE, KEYS, OMIT, nesting_problems, unknown_keys
from tfmem.techniques._fields import quote
from tfmem.techniques.accumulation import AccumulationConfig
from tfmem.techniques.architecture import ModulePaths
from tfmem.techniques.checkpointing import CheckpointingConfig
from tfmem.techniques.freezing import FreezeConfig
from tfmem.techniques.grouping import GroupingConfig
from tfmem.techniques.micro_batch import AutoMicroBatchConfig
from tfmem.techniques.optimizer import OptimizerConfig
from tfmem.techniques.precision import PrecisionConfig
from tfmem.techniques.tf32 import TF32Config

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import Trainer, TrainingArguments


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
        accumulation, checkpointing, precision, freeze, modules, micro_batch, optimizer, tf32, grouping:
            the technique pieces.

    A recipe never changes once built; `recipe.replace(gradient_accumulation_steps=8)` derives a
    validated copy. `Recipe(...)` built directly is checked like `from_dict`, with the same messages.
    """

    name: str = "custom"
    description: str = ""
    accumulation: AccumulationConfig = field(default_factory=AccumulationConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    modules: ModulePaths = field(default_factory=ModulePaths)
    micro_batch: AutoMicroBatchConfig = field(default_factory=AutoMicroBatchConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    tf32: TF32Config = field(default_factory=TF32Config)
    grouping: GroupingConfig = field(default_factory=GroupingConfig)

    def __post_init__(self) -> None:
        # Built directly (`Recipe(freeze=...)`, `dataclasses.replace`) or by `from_dict`: the same checks,
        # the same messages, so a wrong type fails here and not later as an AttributeError in an adapter.
        problems = []
        for key in KEYS:
            value = getattr(self, key.attribute)
            if not isinstance(value, key.piece) and key.piece is not str:  # text keys' checks say it in YAML terms
                problems.append(
                    f"`{key.attribute}` must be {key.piece.__name__}, got {quote(value)} ({type(value).__name__}); "
                    f"build recipes from their public keys, e.g. `Recipe.from_dict({{'{key.name}': ...}})` or "
                    f"`recipe.replace({key.name}=...)`."
                )
            else:
                problems += key.check(value)
        if problems:
            raise RecipeError(list(dict.fromkeys(problems)))

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

    @property
    def group_by_length(self) -> bool:
        return self.grouping.enabled

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
        if problems := nesting_problems(data):
            raise RecipeError(problems, source=source)
        problems = unknown_keys(data, KEY_NAMES, prefix="")
        pieces: dict[str, Any] = {}
        for key in KEYS:
            if key.name in data:
                try:
                    pieces[key.attribute] = key.read(data[key.name])
                except RecipeError as e:
                    problems.extend(e.problems)
        if problems:
            raise RecipeError(problems, source=source)
        try:
            return cls(**pieces)
        except RecipeError as e:
            raise RecipeError(e.problems, source=source) from None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data under the public keys; `Recipe.from_dict` inverts it exactly."""
        out: dict[str, Any] = {}
        for key in KEYS:
            value = key.write(getattr(self, key.attribute))
            if value is not OMIT:
                out[key.name] = value
        return out

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some public keys changed, validated like any other recipe (a Recipe never changes).

        A mapping given for `freeze` or `modules` updates that section; other values replace the key's.

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
        text = commented_yaml(self.to_dict())
        if path is not None:
            write_text_atomic(Path(path), text)
        return text

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Recipe:
        """Load a recipe from a YAML file (or a JSON file: JSON is YAML). Safe loading only: no code runs.

        Any file answers at once: see `tfmem.recipe_file` for the limits (size, UTF-8, no aliases, no
        duplicate keys, nesting depth, regular files only).

        Raises:
            FileNotFoundError: the file does not exist.
            RecipeError: the file cannot be read as a recipe file, is not valid YAML, or the recipe in it
                is invalid.
        """
        path = Path(path)
        return cls.from_dict(read_yaml_data(path), source=str(path))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Recipe:
        """Load a recipe from a JSON file."""
        path = Path(path)
        return cls.from_dict(read_json_data(path), source=str(path))

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str]) -> Recipe:
        """Load a shipped recipe by name (see `tfmem recipes`) or a recipe file by path.

        Raises:
            RecipeError: no shipped recipe has that name and no such file exists; the message lists the names.
        """
        path = recipe_path(name_or_path)
        return cls.from_json(path) if path.suffix.lower() == ".json" else cls.from_yaml(path)

    # -- handing the recipe to a framework --------------------------------------------------------

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Freeze and checkpoint `model` in place as the recipe says, and return it.

        Framework-neutral: used by both adapters. See `tfmem.prepare.prepare_model`.
        """
        from tfmem.prepare import prepare_model

        return prepare_model(model, self)

    def accelerator_kwargs(self, device: torch.device | str | None = None, fsdp_plugin: Any = None) -> dict[str, Any]:
        """Keyword arguments for `accelerate.Accelerator`, checked against the device it will use.

        With an accelerate `FullyShardedDataParallelPlugin` (FSDP2), the kwargs carry a copy of it adjusted
        for the recipe (see `tfmem.adapters.fsdp`).

        Example:
            >>> Recipe.from_dict({"gradient_accumulation_steps": 2}).accelerator_kwargs(device="cpu")
            {'gradient_accumulation_steps': 2, 'mixed_precision': 'no'}
        """
        from tfmem.adapters.accelerate import accelerator_kwargs

        return accelerator_kwargs(self, device=device, fsdp_plugin=fsdp_plugin)

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

    def create_optimizer(self, params, lr: float, **kwargs: Any) -> torch.optim.Optimizer:
        """The recipe's optimizer for an accelerate loop, built as the Trainer builds it.

        Args:
            params: the model (for adamw-8bit its embeddings' state then stays 32-bit, as the Trainer
                keeps it), or its parameters or parameter groups. Parameters that do not require a
                gradient (frozen by the recipe) are left out.
            lr: the learning rate; **kwargs: the optimizer's own (weight_decay, betas, ...).

        Example:
            >>> net = __import__("torch").nn.Linear(4, 2)
            >>> type(Recipe.from_dict({"optimizer": "adafactor"}).create_optimizer(net, lr=1e-3)).__name__
            'Adafactor'

        Raises:
            RecipeError: adamw-8bit without bitsandbytes (`pip install tfmem[8bit]`) or on a device it
                does not run on.
        """
        from tfmem.techniques.optimizer import build_optimizer

        return build_optimizer(self.optimizer, params, lr=lr, **kwargs)

    def tf32_matmul(self):
        """A context manager that turns TF32 on for the block when the recipe says `tf32: true`, and
        restores the previous setting afterwards; check the device with `accelerator_kwargs(device)` first."""
        from tfmem.techniques.tf32 import tf32_matmul

        return tf32_matmul(self.tf32.enabled)

    def batch_sampler(self, lengths, batch_size: int, *, seed: int = 0):
        """A length-grouped `batch_sampler` for an accelerate loop's DataLoader when `group_by_length` is on,
        else None (then use `batch_size=` as usual).

        Args:
            lengths: tokens per sample, or the dataset (its `length` or `input_ids` column).
            batch_size: the micro-batch (what the DataLoader yields); windows of
                `gradient_accumulation_steps` micro-batches are grouped together.
        """
        if not self.grouping.enabled:
            return None
        from tfmem.techniques.grouping import LengthGroupedBatchSampler

        return LengthGroupedBatchSampler(lengths, batch_size, self.gradient_accumulation_steps, seed=seed)

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
        if self.optimizer.name != "adamw":
            parts.append(self.optimizer.name)
        if self.tf32.enabled:
            parts.append("tf32")
        if self.grouping.enabled:
            parts.append("group by length")
        return ", ".join(parts) or "no techniques (baseline)"


def _refuse_assignment(self: Recipe, name: str, value: Any = None) -> None:
    key = KEY_OF_ATTRIBUTE.get(name)
    change = f"`recipe.replace({key}=...)`" if key else "`recipe.replace(<key>=...)` with a recipe key"
    raise dataclasses.FrozenInstanceError(
        f"a Recipe cannot be changed (cannot assign to `{name}`); derive a changed copy instead: {change}, "
        "validated like any recipe, e.g. `recipe.replace(gradient_accumulation_steps=8)`."
    )


# Set after the class is built: `@dataclass(frozen=True)` refuses a __setattr__ in the class body, and its
# own says only "cannot assign to field". Construction, copy and pickle do not go through __setattr__.
Recipe.__setattr__ = _refuse_assignment  # type: ignore[method-assign, assignment]
Recipe.__delattr__ = _refuse_assignment  # type: ignore[method-assign, assignment]

