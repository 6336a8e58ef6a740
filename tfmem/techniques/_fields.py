"""Type checks shared by the technique config pieces.

Checks return problems instead of raising, so a recipe can report everything wrong with it at once.
"""

from __future__ import annotations

from typing import Any


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
    return f"`{field}` must be {names}, got {value!r} ({type(value).__name__}); for example `{example}`."
