"""The public recipe keys, one `_Key` entry each: how a key is read, checked and written.

`tfmem.recipe.Recipe` is built from these entries: `from_dict`, `to_dict`, the comments of `to_yaml`,
the type checks of `Recipe(...)` and the unknown-key hints all follow from `KEYS`.

Adding a key (say `optimizer`, for a new `techniques/optimizer.py` with an `OptimizerConfig`):

1. give `Recipe` a field holding the piece: `optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)`;
2. add one entry here: `_scalar_key("optimizer", "optimizer", OptimizerConfig, lambda c: c.name, "comment")`
   (`_section_key` for a mapping such as `freeze:`; return `_OMIT` from the writer to leave a default out);
3. a flat property on `Recipe` if callers read it often, and the adapters' use of it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tfmem.errors import RecipeError
from tfmem.recipe_file import MAX_DEPTH
from tfmem.techniques._fields import quote, text_problem
from tfmem.techniques.accumulation import AccumulationConfig
from tfmem.techniques.architecture import ModulePaths
from tfmem.techniques.checkpointing import CheckpointingConfig
from tfmem.techniques.freezing import FreezeConfig
from tfmem.techniques.grouping import GroupingConfig
from tfmem.techniques.micro_batch import AutoMicroBatchConfig
from tfmem.techniques.optimizer import OptimizerConfig
from tfmem.techniques.precision import PrecisionConfig
from tfmem.techniques.tf32 import TF32Config

OMIT = object()  # `_Key.write` returns it to leave the key out of `to_dict` (a default not worth writing)
MAX_UNKNOWN_KEYS_SHOWN = 10  # a file of 100,000 unknown keys gets ten lines and a count, not 100,000 lines


@dataclass(frozen=True)
class _Key:
    """One public recipe key: the `Recipe` field it fills, and how it is read, checked and written.

    Attributes:
        name: the key in YAML / dicts.
        attribute: the `Recipe` field holding its value (a technique's config piece, or a plain str).
        piece: that field's type; `Recipe(...)` refuses anything else.
        read: public value -> field value; raises RecipeError naming the key.
        write: field value -> public value, or `OMIT` to leave the key out.
        check: problems of a field value of the right type (config pieces check themselves when built).
        comment: what the setting saves and costs, written beside it by `to_yaml`.
    """

    name: str
    attribute: str
    piece: type
    read: Callable[[Any], Any]
    write: Callable[[Any], Any]
    check: Callable[[Any], list[str]] = lambda value: list(getattr(value, "problems", list)())
    comment: str = ""


def _text_check(name: str, max_chars: int, example: str, required: bool) -> Callable[[Any], list[str]]:
    def check(value: Any) -> list[str]:
        problem = text_problem(name, value, max_chars=max_chars, example=example, required=required)
        return [problem] if problem else []

    return check


def _text_key(name: str, *, max_chars: int, example: str, required: bool, omit_empty: bool) -> _Key:
    check = _text_check(name, max_chars, example, required)

    def read(value: Any) -> Any:
        if problems := check(value):
            raise RecipeError(problems)
        return value

    return _Key(name, name, str, read, lambda v: OMIT if omit_empty and not v else v, check)


def _scalar_key(name: str, attribute: str, piece: type, write: Callable[[Any], Any], comment: str) -> _Key:
    return _Key(name, attribute, piece, piece, write, comment=comment)


def _section_key(name: str, piece: type, subkeys: tuple[str, ...], write: Callable[[Any], Any], comment: str) -> _Key:
    """A key whose value is a mapping of `subkeys`, read into `piece(**mapping)`; null means the defaults."""

    def read(section: Any) -> Any:
        if section is None:
            return piece()
        if not isinstance(section, Mapping):
            raise RecipeError(
                f"`{name}` must be a mapping such as `{name}: {{{subkeys[0]}: ..., {subkeys[1]}: ...}}`, got {quote(section)}."
            )
        problems = unknown_keys(section, subkeys, prefix=f"{name}.")
        try:
            built = piece(**{k: v for k, v in section.items() if k in subkeys})
        except RecipeError as e:
            problems += e.problems
        if problems:
            raise RecipeError(problems)
        return built

    return _Key(name, name, piece, read, write, comment=comment)


KEYS: tuple[_Key, ...] = (
    _text_key("name", max_chars=200, example="name: bert-base-8gb", required=True, omit_empty=False),
    _text_key("description", max_chars=1000, example="description: one line", required=False, omit_empty=True),
    _scalar_key(
        "gradient_accumulation_steps", "accumulation", AccumulationConfig, lambda c: c.steps,
        "micro-batch = effective batch / this; 1 = no accumulation",
    ),
    _scalar_key(
        "gradient_checkpointing", "checkpointing", CheckpointingConfig, lambda c: c.enabled,
        "true recomputes layer activations in backward: less memory, ~30% more compute",
    ),
    _scalar_key(
        "mixed_precision", "precision", PrecisionConfig, lambda c: c.mode,
        "no | fp16 | bf16; bf16 needs compute capability 8.0+ on GPU",
    ),
    _section_key(
        "freeze", FreezeConfig, ("embeddings", "layers"), lambda c: {"embeddings": c.embeddings, "layers": c.layers},
        "frozen parts get no gradient and no optimizer state (changes what is learned)",
    ),
    _section_key(
        "modules", ModulePaths, ("embeddings", "layers"),
        lambda c: {k: v for k, v in (("embeddings", c.embeddings), ("layers", c.layers)) if v is not None} or OMIT,
        "only for architectures tfmem cannot read by itself",
    ),
    _scalar_key(
        "auto_micro_batch", "micro_batch", AutoMicroBatchConfig, lambda c: True if c.enabled else OMIT,
        "on out-of-memory, halve the micro-batch and retry (effective batch unchanged)",
    ),
    # Written only when set, like auto_micro_batch: recipes from before these keys read back unchanged.
    _scalar_key(
        "optimizer", "optimizer", OptimizerConfig, lambda c: c.name if c.name != "adamw" else OMIT,
        "adamw | adamw-8bit | adafactor; the last two keep less state and change what is learned",
    ),
    _scalar_key(
        "tf32", "tf32", TF32Config, lambda c: True if c.enabled else OMIT,
        "fp32 matmuls on TF32 tensor cores: 2.5-3x faster, same memory; CUDA 8.0+ only",
    ),
    _scalar_key(
        "group_by_length", "grouping", GroupingConfig, lambda c: True if c.enabled else OMIT,
        "batches of similar length: less padding; samples' order is less random",
    ),
)
KEY_NAMES = tuple(k.name for k in KEYS)
COMMENTS = {k.name: k.comment for k in KEYS if k.comment}
KEY_OF_ATTRIBUTE = {k.attribute: k.name for k in KEYS}


def unknown_keys(data: Mapping[Any, Any], known: tuple[str, ...], prefix: str) -> list[str]:
    unknown = [key for key in data if key not in known]
    problems = []
    listed = False  # the known keys are listed once, not on every line
    for key in unknown[:MAX_UNKNOWN_KEYS_SHOWN]:
        shown = key_label(key, prefix)
        close = difflib.get_close_matches(str(key)[:100], known, n=1) if isinstance(key, str) else []
        if close:
            problems.append(f"unknown key {shown}; did you mean `{prefix}{close[0]}`?")
        elif not listed:
            problems.append(f"unknown key {shown}; known keys: {', '.join(prefix + k for k in known)}.")
            listed = True
        else:
            problems.append(f"unknown key {shown}.")
    if len(unknown) > MAX_UNKNOWN_KEYS_SHOWN:
        problems.append(f"... and {len(unknown) - MAX_UNKNOWN_KEYS_SHOWN} more unknown keys.")
    return problems


def key_label(key: Any, prefix: str = "") -> str:
    """A key as messages show it: `freeze.layers` when it is short printable text, else bounded repr."""
    return f"`{prefix}{key}`" if isinstance(key, str) and len(key) <= 60 and key.isprintable() else quote(key, 60)


def nesting_problems(data: Mapping[Any, Any]) -> list[str]:
    """A problem per top-level key whose value nests deeper than a recipe file may (or refers to itself).

    Walks each container at most once per depth it is reached at, so a structure built from shared
    references (the dict an alias bomb expands to) costs its distinct containers, not its expansion.
    """
    problems = []
    for key, value in data.items():
        stack: list[tuple[Any, int]] = [(value, 2)]
        deepest_seen: dict[int, int] = {}
        while stack:
            item, depth = stack.pop()
            if not isinstance(item, (Mapping, list, tuple, set, frozenset)):
                continue
            if depth > MAX_DEPTH:
                problems.append(
                    f"{key_label(key)} is nested more than {MAX_DEPTH} levels deep (or refers to itself); a recipe has "
                    "two levels at most, e.g. `freeze: {layers: 6}`."
                )
                break
            if deepest_seen.get(id(item), 0) >= depth:
                continue
            deepest_seen[id(item)] = depth
            children = [c for pair in item.items() for c in pair] if isinstance(item, Mapping) else list(item)
            stack.extend((child, depth + 1) for child in children)
    return problems
