"""Stored and selective segments: plans whose middle segments may run normally (keeping their
saved tensors instead of being recomputed), and whose stored and last segments may run
selectively, found by Pareto sets of (kept bytes, recomputed FLOPs) per boundary."""

from __future__ import annotations

import numpy as np

from remat.chain.cost import handed_over, make_solution
from remat.chain.model import Chain, ChainSolution
from remat.chain.terms import SegmentTerms

__all__ = ["stored_plan"]


def stored_plan(chain: Chain, budget_bytes: int, terms: SegmentTerms, selective: SegmentTerms | None) -> ChainSolution | None:
    """``min_recompute(..., store=True)`` on terms built once (the least-peak bisection asks many budgets)."""
    plan = _plan_with_stored(terms, chain.fwd_flops, budget_bytes - chain.base_bytes, selective, chain.selective_last)
    if plan is None:
        return None
    return make_solution(chain, plan[0], "store", terms, stored=plan[1], selective=plan[2], selective_terms=selective)


def _plan_with_stored(
    terms: SegmentTerms, fwd_flops: np.ndarray, limit: int, selective: SegmentTerms | None = None, selective_last: bool = False
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """Least-recompute (checkpoints, stored starts, selective starts) within ``limit``, by Pareto
    sets per boundary.

    A label is ``(kept bytes, recomputed FLOPs, previous label, boundary,
    how the segment ending there runs: "recomputed", "stored" or "selective")``.
    ``free[r]`` holds prefixes whose segment ending at ``r`` was recomputed
    (or ``r = 0``); ``after[kind][r]`` those that end with a stored segment run
    that way, which the next kept segment (stored or last) must run the other
    way. With ``selective`` (the terms of the chain run selectively), stored
    segments may run so, and the last one with ``selective_last``.
    """
    n = terms.n
    flops = np.concatenate([[0], np.cumsum(fwd_flops)]).tolist()
    kinds = {"stored": terms, **({"selective": selective} if selective is not None else {})}
    free: list[list[tuple]] = [[] for _ in range(n)]
    after: dict[str, list[list[tuple]]] = {kind: [[] for _ in range(n)] for kind in kinds}
    free[0].append((0, 0, None, 0, "recomputed"))
    best = None  # (label, whether the last segment runs selectively)
    for l in range(n):
        for before, labels in [(None, free[l]), *((kind, after[kind][l]) for kind in kinds)]:
            front = _pareto(labels)
            if not front:
                continue
            for kind, kind_terms in kinds.items():
                if kind == before:
                    continue
                handed = handed_over(kinds[before] if before else None, kind_terms, l)
                if kind != "selective" or selective_last:
                    last = handed + kind_terms.last_segment(l)
                    fits = [lab for lab in front if lab[0] + last <= limit]
                    if fits:
                        top = min(fits, key=lambda x: x[1])
                        if best is None or top[1] < best[0][1]:
                            best = (top, kind == "selective")
                for r in range(l + 1, n - 1):  # (a last segment of the loss alone would follow)
                    cost, keeps = kind_terms.stored_segment(l, r)
                    for label in front:  # kept bytes ascending: the feasible ones come first
                        if label[0] + handed + cost > limit:
                            break
                        after[kind][r].append((label[0] + handed + keeps, label[1], label, r, kind))
            recompute, _ = terms.row(l)
            a_l = int(terms.a_in[l])
            for r in range(l + 1, n):
                cost = int(recompute[r - l - 1])
                for label in front:
                    if label[0] + cost > limit:
                        break
                    free[r].append((label[0] + a_l, label[1] + flops[r] - flops[l], label, r, "recomputed"))
    if best is None:
        return None
    label, last_selective = best
    checkpoints, stored, chosen = [], [], [label[3]] if last_selective else []
    while label[2] is not None:
        checkpoints.append(label[3])
        if label[4] != "recomputed":
            stored.append(label[2][3])
            if label[4] == "selective":
                chosen.append(label[2][3])
        label = label[2]
    return tuple(reversed(checkpoints)), tuple(reversed(stored)), tuple(sorted(chosen))


def _pareto(labels: list[tuple]) -> list[tuple]:
    """Labels no other beats on both kept bytes and FLOPs, by kept bytes ascending."""
    front: list[tuple] = []
    for label in sorted(labels, key=lambda x: (x[0], x[1])):
        if not front or label[1] < front[-1][1]:
            front.append(label)
    return front
