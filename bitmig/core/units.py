"""Human sizes: parse "64K", "16T", "1.5M"; format bytes with binary units."""

from __future__ import annotations

import re

_SUFFIX = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a byte count with an optional binary suffix (K, M, G, T, P, E; KiB, KB...)."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    m = _RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (expected e.g. 512, 64K, 1M, 16T)")
    number, suffix = m.groups()
    value = float(number) * (1 << _SUFFIX[suffix.upper()])
    if value != int(value):
        raise ValueError(f"size is not a whole number of bytes: {text!r}")
    return int(value)


def format_size(n: int | float) -> str:
    """Format bytes with the largest binary unit that keeps the number >= 1 (e.g. 512 GiB)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            if unit == "B" or n == int(n):
                return f"{int(n)} {unit}" if n == int(n) else f"{n:.1f} {unit}"
            return f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
