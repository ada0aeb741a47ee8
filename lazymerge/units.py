"""Byte counts: parsing the sizes users type, formatting the sizes we print. One place for both."""
from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_size(value: str | int) -> int:
    """Bytes from `2GB` (decimal), `2GiB` or `2G` (binary), `500MB`, `1.5G` or a plain integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS:
            raise ValueError(f"invalid size {value!r}: expected e.g. 5GB, 2GiB, 500MB, 1.5G or a byte count")
        size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"invalid size {value!r}: must be positive")
    return size


def human(n: float | int | None) -> str:
    """A byte count for people: `512 B`, `1.50 KiB`, ..., `3.25 TiB` ("-" for None)."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError
