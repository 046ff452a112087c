"""Offloaded checkpoints: the least peak and the feasibility pass when kept activations wait in host memory.

Offload: kept activations may wait in host memory instead (pinned, copied
out and back asynchronously). Then no checkpoint before a segment is on the
device while it runs: the segment input ``a(l)`` is there for its forward,
comes back for its recompute and stays through its backward, as ``R`` counts
it. The prefix term goes: ``f(l) = min(S(l), min_r max(R(l, r), f(r)))``
(``peak_of``: the most of ``R`` and ``S`` over the segments), and the heap sweep's argument
(costs that only grow as ``l`` moves left) no longer holds, so both the least
peak and the feasibility pass are O(n^2) scans (``offload=True`` in
``peak_of``, ``min_peak``, ``min_recompute`` and ``pareto_front``).

"""

from __future__ import annotations

import numpy as np

from remat.chain.terms import UNREACHABLE, SegmentTerms

__all__ = ["least_peak_offloaded", "prefix_feasible_offloaded"]


def least_peak_offloaded(terms: SegmentTerms) -> int:
    """f(0) of ``f(l) = min(S(l), min_r max(R(l, r), f(r)))``: no checkpoint bytes carried."""
    n = terms.n
    f = np.zeros(n + 1, dtype=np.int64)
    for l in range(n - 1, -1, -1):
        best = terms.last_segment(l)
        if l + 1 < n:
            best = min(best, int(np.maximum(terms.row(l)[0], f[l + 1 : n]).min()))
        f[l] = best
    return int(f[0])


def prefix_feasible_offloaded(terms: SegmentTerms, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Which checkpoints ``r`` end a prefix whose segments all fit ``limit``, O(n^2).

    In the shape of :func:`prefix_feasible_quadratic` for :func:`plan_within`:
    ``v(r)`` is 0 where reachable (no checkpoint bytes stay on the device).
    """
    n = terms.n
    v = np.full(n, UNREACHABLE, dtype=np.int64)
    parent = np.full(n, -1, dtype=np.int64)
    v[0] = 0
    for l in range(n - 1):
        if v[l]:
            continue
        reached = np.nonzero((terms.row(l)[0] <= limit) & (v[l + 1 : n] > 0))[0] + l + 1
        v[reached] = 0
        parent[reached] = l
    return v, parent
