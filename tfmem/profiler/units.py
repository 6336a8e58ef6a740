"""Bytes for people: formatting and parsing sizes such as `200MiB` or `1.5GB`."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 2**20, "mb": 1000**2, "mib": 2**20,
    "g": 2**30, "gb": 1000**3, "gib": 2**30,
    "t": 2**40, "tb": 1000**4, "tib": 2**40,
}


class SizeError(ValueError):
    """A size string could not be read."""


def parse_bytes(text: str, *, field: str = "--max-memory") -> int:
    """Read a size such as `200MiB`, `1.5GB`, `2G` or `1048576` as bytes (`K/M/G` alone are binary).

    Raises:
        SizeError: not a positive size; the message names the field and shows valid forms.

    Example:
        >>> parse_bytes("200MiB"), parse_bytes("1.5GB"), parse_bytes("2G")
        (209715200, 1500000000, 2147483648)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise SizeError(f"{field} {text!r} is not a size; write it like 200MiB, 1.5GiB, 8GB or a number of bytes.")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise SizeError(f"{field} {text!r} must be more than 0 bytes; write it like 200MiB.")
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
