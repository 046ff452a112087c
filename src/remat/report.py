"""Plain-text tables and human-readable sizes for reports, without dependencies.

Example:
    >>> from remat.report import format_bytes, format_table
    >>> print(format_table([("peak", format_bytes(3 * 2**30)), ("ops", 120)], ["", "baseline"]))
          baseline
    ----  --------
    peak  3.00 GiB
    ops        120
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["format_bytes", "format_table", "parse_bytes"]

_UNITS = [(2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")]


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps the number >= 1.

    Example:
        >>> format_bytes(1536 * 2**20), format_bytes(5 * 2**20 + 8), format_bytes(12)
        ('1.50 GiB', '5.0 MiB', '12 B')
    """
    for size, unit in _UNITS:
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} B"


_PARSE_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
                "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """A size such as ``"24GiB"``, ``"1.5 GB"``, ``"512M"`` or ``"1000"`` in bytes.

    Binary units (KiB, MiB, GiB, TiB, and the bare K, M, G, T) are powers of
    1024; KB, MB, GB and TB are powers of 1000. Case does not matter.

    Raises:
        ValueError: the text is not a positive size.

    Example:
        >>> parse_bytes("24GiB"), parse_bytes("1.5 gb"), parse_bytes("512M"), parse_bytes("1000")
        (25769803776, 1500000000, 536870912, 1000)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match and _PARSE_UNITS.get(match.group(2).lower())
    if not unit:
        raise ValueError(f"not a size: {text!r} (expected e.g. 24GiB, 512MiB, 1.5GB or a number of bytes)")
    value = int(float(match.group(1)) * unit)
    if value <= 0:
        raise ValueError(f"a size must be positive, not {text!r}")
    return value


def format_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Align ``rows`` under ``headers``: the first column left, the others right.

    Cells are turned into text with ``str``; every row must have one cell per
    header.
    """
    cells = [[str(h) for h in headers]]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)} has {len(row)} cells for {len(headers)} headers")
        cells.append([str(c) for c in row])
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])
