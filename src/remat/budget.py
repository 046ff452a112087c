"""Memory budgets: parsing sizes, and the error for a budget no plan can meet."""

from __future__ import annotations

import re

__all__ = ["InfeasibleBudget", "parse_bytes"]

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_FORMS = "an int of bytes or a string like '20GiB', '512MiB', '1.5GB' (GB = 10^9 B, GiB = 2^30 B)"


class InfeasibleBudget(ValueError):
    """No plan fits the budget; ``least_peak_bytes`` is the best any plan reaches."""

    def __init__(self, budget_bytes: int, least_peak_bytes: int):
        from remat.report import format_bytes

        self.budget_bytes = budget_bytes
        self.least_peak_bytes = least_peak_bytes
        super().__init__(
            f"no plan fits a budget of {format_bytes(budget_bytes)} ({budget_bytes} B): the least "
            f"achievable step peak is {format_bytes(least_peak_bytes)} ({least_peak_bytes} B); "
            "raise the budget or lower the batch size (remat.max_batch finds the largest that fits)"
        )


def parse_bytes(size: int | str) -> int:
    """Bytes from an int or a size string.

    Example:
        >>> parse_bytes("20GiB"), parse_bytes("512 MiB"), parse_bytes("1.5GB"), parse_bytes(4096)
        (21474836480, 536870912, 1500000000, 4096)
    """
    if isinstance(size, bool):
        raise ValueError(f"budget must be {_FORMS}, got {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"budget must be positive: {_FORMS}, got {size}")
        return size
    if isinstance(size, str):
        match = _SIZE.match(size)
        if match and match.group(2).lower() in _UNITS:
            value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
            if value > 0:
                return value
    raise ValueError(f"budget must be {_FORMS}, got {size!r}")
