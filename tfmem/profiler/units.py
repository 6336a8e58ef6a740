"""Bytes for people: formatting and parsing sizes such as `200MiB` or `1.5GB`."""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 2**20, "mb": 1000**2, "mib": 2**20,
    "g": 2**30, "gb": 1000**3, "gib": 2**30,
    "t": 2**40, "tb": 1000**4, "tib": 2**40,
}


class SizeError(ValueError):
    """A size string could not be read."""


def parse_bytes(text: str, *, field: str = "--max-memory", allow_zero: bool = False) -> int:
    """Read a size such as `200MiB`, `1.5GB`, `2G` or `1048576` as bytes (`K/M/G` alone are binary).

    A bare number is a count of bytes, so it must be whole: `--budget 1.5` is refused (did you mean
    1.5GiB?) rather than read as one byte. Fractions with a unit round down to whole bytes. With
    `allow_zero`, zero in any unit (`0`, `0GiB`, `0.0MB`) reads as 0 (an overhead may be none).

    Raises:
        SizeError: not a size, not positive (negative, with `allow_zero`), or a fraction of a byte; the message names the field and
            the value and shows a valid form.

    Example:
        >>> parse_bytes("200MiB"), parse_bytes("1.5GB"), parse_bytes("2G"), parse_bytes("1048576")
        (209715200, 1500000000, 2147483648, 1048576)
    """
    match = re.fullmatch(r"\s*([+-]?)\s*([0-9]+\.?[0-9]*|\.[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(3).lower() if match else None
    if not match or unit not in _UNITS:
        raise SizeError(f"{field} {text!r} is not a size; write it like 8GiB, 200MiB, 1.5GB or a whole number of bytes.")
    # Fraction, not float: "1.1GB" is exactly 1100000000 bytes.
    number = Fraction(match.group(2)) * (-1 if match.group(1) == "-" else 1)
    if number == 0 and allow_zero:
        return 0
    if number <= 0:
        raise SizeError(f"{field} {text!r} must be " + ("zero or positive" if allow_zero else "positive")
                        + "; write it like 8GiB.")
    if _UNITS[unit] == 1 and number.denominator != 1:
        raise SizeError(f"{field} {text!r} is not a whole number of bytes (a number without a unit counts bytes); "
                        f"give a unit, e.g. {match.group(2)}GiB or 8GiB.")
    value = int(number * _UNITS[unit])
    if value <= 0:
        raise SizeError(f"{field} {text!r} is less than one byte; write it like 8GiB.")
    return value


def format_bytes(n: int | float | None) -> str:
    """A byte count in the largest binary unit that keeps it at least 1, e.g. `61.2 MiB`.

    Example:
        >>> format_bytes(64_172_851), format_bytes(512), format_bytes(None)
        ('61.2 MiB', '512 B', '-')
    """
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
