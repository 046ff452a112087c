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

from collections.abc import Sequence

__all__ = ["format_bytes", "format_table"]

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
