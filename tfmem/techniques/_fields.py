"""Checks shared by the technique config pieces, and the one way messages quote a user's value.

Checks return problems instead of raising, so a recipe can report everything wrong with it at once.
Every value a message quotes goes through `quote`: a recipe can hold anything (a 72-million-character
alias expansion, a 20,000-deep dict, an integer of 10,000 digits), and a message must stay one short line
that is cheap to build.
"""

from __future__ import annotations

import reprlib
import unicodedata
from collections.abc import Mapping, Set
from typing import Any

QUOTE_CHARS = 80  # longest quoted value in a message, ellipsis included
# A ceiling for counts (accumulation steps, frozen layers): far above any real model or batch, low
# enough that 2**64 or 10**100 is refused as a typo rather than carried into arithmetic.
MAX_COUNT = 65_536


class _BoundedRepr(reprlib.Repr):
    """`reprlib` limits, applied to subclasses too and to integers before they are turned into digits."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 4
        self.maxstring = self.maxother = QUOTE_CHARS
        self.maxlong = 40

    def repr1(self, x: Any, level: int) -> str:
        # reprlib dispatches on the exact type name, so a dict or list subclass would get a full repr().
        if isinstance(x, bool) or x is None:
            return repr(x)
        if isinstance(x, int):
            if x.bit_length() > 128:  # repr() of a huge int is slow, and refused past 4,300 digits
                return f"<an integer of about {int(x.bit_length() * 0.30103) + 1} digits>"
            return self.repr_int(x, level)
        if isinstance(x, str):
            return self.repr_str(x, level)
        if isinstance(x, Mapping):
            return self.repr_dict(dict(_first(x.items(), self.maxdict + 1)), level)
        if isinstance(x, (list, tuple)):
            items = list(_first(x, self.maxlist + 1))
            return self.repr_tuple(tuple(items), level) if isinstance(x, tuple) else self.repr_list(items, level)
        if isinstance(x, Set):
            return self.repr_set(set(_first(x, self.maxset + 1)), level)
        return super().repr1(x, level)

    def repr_dict(self, x: dict, level: int) -> str:
        # reprlib sorts the keys; keep the user's order (and unorderable keys).
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        pieces = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}" for k, v in list(x.items())[: self.maxdict]]
        more = ", ..." if len(x) > self.maxdict else ""
        return "{" + ", ".join(pieces) + more + "}"


def _first(items: Any, n: int) -> list[Any]:
    out = []
    for item in items:
        if len(out) >= n:
            break
        out.append(item)
    return out


_REPR = _BoundedRepr()


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)` for a message: at most `limit` characters, cheap for any size or depth of value.

    >>> quote(list(range(1000)))
    '[0, 1, 2, 3, ...]'
    >>> len(quote("x" * 10_000)) <= 80
    True
    >>> quote(10**100)
    '<an integer of about 101 digits>'
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # a user object whose __repr__ fails must not hide the real problem
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def type_problem(field: str, value: Any, expected: type | tuple[type, ...], example: str) -> str | None:
    """Return a problem line when `value` is not of `expected` type, else None.

    `bool` is rejected where an `int` is expected: YAML's `yes` becomes True, and True == 1 would
    otherwise slip through as "one accumulation step".
    """
    expected_types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in expected_types:
        ok = False
    else:
        ok = isinstance(value, expected_types)
    if ok:
        return None
    names = " or ".join(t.__name__ for t in expected_types)
    hint = ""
    if isinstance(value, str) and int in expected_types and _looks_sexagesimal(value):
        hint = " (tfmem reads YAML 1.2 integers: `1:30` is text, not YAML 1.1's base-60 number 90)"
    return f"`{field}` must be {names}, got {quote(value)} ({type(value).__name__}){hint}; for example `{example}`."


def count_problem(field: str, value: Any, *, minimum: int, example: str, meaning: str) -> str | None:
    """A problem line unless `value` is an int from `minimum` to `MAX_COUNT`; `meaning` says what it counts."""
    if problem := type_problem(field, value, int, example):
        return problem
    if value < minimum:
        return f"`{field}` must be {minimum} or more ({meaning}), got {quote(value)}."
    if value > MAX_COUNT:
        return f"`{field}` is {quote(value)}; tfmem accepts at most {MAX_COUNT} ({meaning}), for example `{example}`."
    return None


def text_problem(field: str, value: Any, *, max_chars: int, example: str, required: bool = False) -> str | None:
    """A problem line unless `value` is a one-line printable string of at most `max_chars` characters.

    Control characters (NUL, newlines, escapes) and lone surrogates are refused: names and descriptions
    end up in terminals, tables and file names, where they would corrupt the output or fail to encode.
    """
    if problem := type_problem(field, value, str, example):
        return problem
    if required and not value.strip():
        return f"`{field}` must be a non-empty string, got {quote(value)}; for example `{example}`."
    if len(value) > max_chars:
        return f"`{field}` is {len(value)} characters long; keep it to {max_chars} or fewer, for example `{example}`."
    for index, char in enumerate(value):
        category = unicodedata.category(char)
        if category in ("Cc", "Cs", "Zl", "Zp"):
            what = "a lone surrogate" if category == "Cs" else f"the control character {char!r}"
            return (
                f"`{field}` contains {what} at position {index} ({quote(value)}); use printable text on one line, "
                f"for example `{example}`."
            )
    return None


def _looks_sexagesimal(text: str) -> bool:
    parts = text.strip().lstrip("+-").split(":")
    return len(parts) > 1 and all(p.replace("_", "").isdigit() for p in parts)
