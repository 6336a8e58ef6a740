"""Reading a recipe file: whatever the file holds, a `RecipeError` or the data, in well under a second.

A recipe is a dozen lines, so anything far from that shape is refused before it can cost time or
memory, each with a message naming the file and the fix:

- only regular files are opened (a FIFO or `/dev/zero` would block or never end), at most
  `MAX_RECIPE_BYTES`, and the text must be UTF-8;
- YAML anchors and aliases are refused: a 450-byte "alias bomb" expands into millions of nodes, and
  a recipe has nothing worth sharing;
- nesting deeper than `MAX_DEPTH`, and more than `MAX_NODES` values, are refused before PyYAML builds
  anything (its composer recurses, and 30,000 values in a 64 KiB file take it most of a second);
- a key given twice is refused (PyYAML keeps the last one silently, so `gradient_accumulation_steps: 0`
  followed by `: 4` would pass, and a second `freeze:` would drop the first);
- integers are read as YAML 1.2 reads them: `1:30` is the text "1:30", not YAML 1.1's base-60 number 90,
  and `010` is ten; a value that cannot be read (`!!int abc`) names its line.

JSON files get the same limits (duplicate keys, depth). Booleans keep PyYAML's YAML 1.1 reading
(`yes`/`no`), which the shipped files and `Recipe.to_yaml` rely on.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from tfmem.errors import RecipeError
from tfmem.techniques._fields import quote

MAX_RECIPE_BYTES = 64 * 1024  # the shipped recipes are under 1 KiB
MAX_DEPTH = 16  # a recipe needs 2 (`freeze:` -> `layers:`)
MAX_NODES = 1000  # keys, values and collections; a full recipe has about 20

_LOADER_BASE: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when installed: same results, faster


def read_recipe_text(path: Path) -> str:
    """The text of the recipe file at `path`, checked to be a small regular UTF-8 file.

    Raises:
        FileNotFoundError: no file at `path` (the message suggests `tfmem recipes`).
        RecipeError: anything else wrong with the file: a directory, FIFO or device, a symlink loop,
            a NUL in the path, no permission, too large, not UTF-8.
    """
    source = str(path)
    if "\x00" in source:
        raise RecipeError("the path contains a NUL character; give the path of a .yaml file.", source=quote(source))
    try:
        info = os.stat(path)  # follows links: a link to a regular file is fine, a link to /dev/zero is not
    except FileNotFoundError:
        raise FileNotFoundError(
            f"recipe file {source!r} does not exist; check the path, or run `tfmem recipes` for shipped names."
        ) from None
    except OSError as e:
        raise RecipeError(_os_problem(e), source=source) from None
    _check_regular(info, source)
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO since the stat, opening it still returns at once.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise RecipeError(_os_problem(e), source=source) from None
    with os.fdopen(fd, "rb") as f:
        _check_regular(os.fstat(f.fileno()), source)
        data = f.read(MAX_RECIPE_BYTES + 1)
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"the file is {_size(max(info.st_size, len(data)))}, larger than a recipe file may be "
            f"({_size(MAX_RECIPE_BYTES)}); a recipe is a dozen lines: is this the right file?",
            source=source,
        )
    return decode_utf8(data, source)


def decode_utf8(data: bytes, source: str) -> str:
    """`data` as UTF-8 text (a UTF-8 byte-order mark is allowed), or a RecipeError saying what it looks like."""
    encoding = _bom_encoding(data)
    if encoding is None and data.count(0) >= len(data) / 5:  # ASCII-range text in UTF-16/32, without a mark
        encoding = "UTF-16 or UTF-32 (a fifth or more of its bytes are NUL)"
    if encoding is None:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise RecipeError(
                f"the file is not UTF-8 text (byte {quote(data[e.start:e.start + 1])} at offset {e.start} is not "
                "valid UTF-8; Latin-1 or Windows-1252 files look like this); recipe files must be UTF-8: "
                "save it as UTF-8 in your editor.",
                source=source,
            ) from None
        if "\x00" not in text:
            return text
        encoding = "binary data (it holds NUL bytes)"
    raise RecipeError(f"the file is {encoding}, not UTF-8; recipe files must be UTF-8: save it as UTF-8 in your editor.", source=source)


def load_yaml(text: str, source: str) -> Any:
    """Parse recipe YAML (JSON included) with the limits of the module docstring.

    Raises:
        RecipeError: the text is not valid YAML, or breaks one of the limits; the message names the line.
    """
    try:
        _check_events(text, source)
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass: no code runs
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        if "nesting depth" in problem:  # libyaml's own limit, met while it scans ahead of our depth check
            raise RecipeError(_depth_problem(where.removeprefix(" at ") or "the start"), source=source) from None
        raise RecipeError(f"the file is not valid YAML{where}: {_bounded(problem)}.", source=source) from None


def load_json(text: str, source: str) -> Any:
    """Parse recipe JSON: duplicate keys and nesting deeper than `MAX_DEPTH` are refused.

    Raises:
        RecipeError: the text is not valid JSON or breaks a limit.
    """
    # The depth is checked on the text first: `json.loads` recurses, and 20,000 nested `[` overflow it.
    depth = deepest = 0
    in_string = escaped = False
    for index, char in enumerate(text):
        if in_string:
            escaped = not escaped and char == "\\"
            in_string = escaped or char != '"'
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                line = text.count("\n", 0, index) + 1
                raise RecipeError(_depth_problem(f"line {line}"), source=source)
        elif char in "]}":
            depth -= 1
        deepest = max(deepest, depth)
    try:
        return json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as e:
        raise RecipeError(f"the file is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}.", source=source) from None
    except _DuplicateKey as e:
        raise RecipeError(f"the key {e.key} appears twice in one mapping; keep one of them.", source=source) from None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(_key_text(key))
        out[key] = value
    return out


# -- YAML ------------------------------------------------------------------------------------------

_INT_12 = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
# YAML 1.1's float pattern, less its base-60 branch (`1:30.5`); decimal and exponent forms stay.
_FLOAT_12 = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class _RecipeLoader(_LOADER_BASE):  # type: ignore[misc, valid-type]
    """PyYAML's safe loader with YAML 1.2 integers, no merge keys and no duplicate keys."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (
            "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:merge")]
        for first, resolvers in _LOADER_BASE.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"the key {_key_text(key)} appears twice in one mapping (lines {first_line[key]} and {line}); "
                        "keep one of them",
                        key_node.start_mark,
                    )
                first_line[key] = line
            except TypeError:  # an unhashable key: PyYAML's own error below names it
                break
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as e:  # e.g. `!!int abc`, `!!float x`, a 5,000-digit int
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {quote(getattr(node, 'value', ''))} as {node.tag.rsplit(':', 1)[-1]} ({_bounded(str(e))})",
                node.start_mark,
            ) from None

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = str(self.construct_scalar(node)).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-")
        base = 8 if digits.startswith("0o") else 16 if digits.startswith("0x") else 10
        return sign * int(digits[2:] if base != 10 else digits, base)


_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT_12, list("-+0123456789"))
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))
_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_yaml_int)


def _check_events(text: str, source: str) -> None:
    """Refuse anchors, aliases and deep nesting from the event stream, before anything is built."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_LOADER_BASE):
        where = f"line {event.start_mark.line + 1}"
        if isinstance(event, (yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            nodes += 1
            if nodes > MAX_NODES:
                raise RecipeError(
                    f"the file holds more than {MAX_NODES} keys and values (at {where}); a recipe has about 20: "
                    "is this the right file?",
                    source=source,
                )
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            name = quote(event.anchor, 30)
            raise RecipeError(
                f"YAML anchors and aliases (`&name`, `*name`) are not allowed in recipe files ({name} at {where}); "
                "write each value out in full.",
                source=source,
            )
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise RecipeError(_depth_problem(where), source=source)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _depth_problem(where: str) -> str:
    return (
        f"the file nests mappings or lists more than {MAX_DEPTH} levels deep (at {where}); a recipe has two "
        "levels at most, e.g. `freeze: {layers: 6}`."
    )


# -- small helpers ---------------------------------------------------------------------------------


def _key_text(key: Any) -> str:
    text = str(key) if isinstance(key, str) else quote(key)
    return f"`{text}`" if len(text) <= 60 and text.isprintable() else quote(key)


def _bounded(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_regular(info: os.stat_result, source: str) -> None:
    if stat.S_ISREG(info.st_mode):
        return
    kind = (
        "a directory" if stat.S_ISDIR(info.st_mode)
        else "a named pipe (FIFO)" if stat.S_ISFIFO(info.st_mode)
        else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
        else "a socket" if stat.S_ISSOCK(info.st_mode)
        else "not a regular file"
    )
    raise RecipeError(f"the path is {kind}, not a recipe file; give the path of a .yaml file.", source=source)


def _os_problem(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "the path is a symbolic link that loops back on itself; point it at a .yaml file."
    if isinstance(error, PermissionError):
        return "you have no permission to read the file; check its permissions."
    return f"the file cannot be read ({_bounded(error.strerror or str(error))}); give the path of a readable .yaml file."


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} bytes"


def _bom_encoding(data: bytes) -> str | None:
    """The encoding a UTF-16/32 byte-order mark announces, or None (a UTF-8 mark is fine)."""
    for mark, name in (
        (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"),
        (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
        (b"\xff\xfe", "UTF-16 (little-endian)"),
        (b"\xfe\xff", "UTF-16 (big-endian)"),
    ):
        if data.startswith(mark):
            return name
    return None
