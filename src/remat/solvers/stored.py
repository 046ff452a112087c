"""Stored and selective segments: plans whose middle segments may run normally (keeping their
saved tensors instead of being recomputed), and whose stored and last segments may run
selectively, found by Pareto sets of (kept bytes, recomputed FLOPs) per boundary."""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np

from remat.chain.cost import handed_over, make_solution
from remat.chain.model import Chain, ChainSolution
from remat.chain.terms import SegmentTerms
from remat.chain.time import Speed

__all__ = ["least_recompute_labels", "stored_plan"]


def stored_plan(chain: Chain, budget_bytes: int, terms: SegmentTerms, selective: SegmentTerms | None) -> ChainSolution | None:
    """``min_recompute(..., store=True)`` on terms built once (the least-peak bisection asks many budgets)."""
    plan = _plan_with_stored(terms, budget_bytes - chain.base_bytes, selective, chain.selective_last)
    if plan is None:
        return None
    return make_solution(chain, plan[0], "store", terms, stored=plan[1], selective=plan[2], selective_terms=selective)


def least_recompute_labels(
    terms: SegmentTerms, limit: int, offload: bool = False, speed: Speed | None = None
) -> tuple[tuple[int, ...], tuple, tuple] | None:
    """The least-recompute plan of recomputed segments only within ``limit`` (over base bytes),
    exact however recompute depends on the segments (early stop), by the Pareto sets below;
    with ``offload``, no kept activation stays on the device. With ``speed``, recompute is
    the predicted time of each segment's recompute and region
    (:meth:`SegmentTerms.recompute_seconds_row`), not its FLOPs."""
    cost_row = None if speed is None else (lambda l: terms.recompute_seconds_row(l, speed))
    return _plan_with_stored(terms, limit, store=False, offload=offload, cost_row=cost_row)


def _plan_with_stored(
    terms: SegmentTerms, limit: int, selective: SegmentTerms | None = None, selective_last: bool = False,
    store: bool = True, offload: bool = False, cost_row: Callable[[int], np.ndarray] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """Least-recompute (checkpoints, stored starts, selective starts) within ``limit``, by Pareto
    sets per boundary.

    A label is a prefix plan ending at a boundary ``r``: its kept bytes, its recomputed
    FLOPs, the label it extends and how the segment ending at ``r`` runs ("recomputed",
    "stored" or "selective"). The labels at ``r`` are grouped by that last segment's kind:
    a stored segment must be followed by a kept segment (stored or last) run the other way,
    or by a recomputed one. With ``selective`` (the terms of the chain run selectively),
    stored segments may run so, and the last one with ``selective_last``; without ``store``,
    every segment but the last is recomputed. Labels are kept as arrays (:class:`_Labels`),
    made a row of boundaries at a time.
    """
    n = terms.n
    kinds = {"stored": terms, **({"selective": selective} if selective is not None else {})}
    labels = _Labels()
    best = None  # (recomputed FLOPs, label, whether the last segment runs selectively)
    befores = (None, *kinds) if store else (None,)  # without store, every label ends in a recomputed segment
    for l in range(n):
        for before in befores:
            kept, recomputed, ids = labels.front(before, l)
            if not len(ids):
                continue
            for kind, kind_terms in kinds.items():
                if kind == before:
                    continue
                handed = handed_over(kinds[before] if before else None, kind_terms, l)
                if kind != "selective" or selective_last:
                    # kept bytes ascending, FLOPs descending: the last that fits recomputes least
                    fits = int(np.searchsorted(kept, limit - handed - kind_terms.last_segment(l), side="right"))
                    if fits and (best is None or recomputed[fits - 1] < best[0]):
                        best = (recomputed[fits - 1], int(ids[fits - 1]), kind == "selective")
                if not store:
                    continue
                peaks, keeps = kind_terms.stored_row(l)
                counts = np.searchsorted(kept, limit - handed - peaks, side="right")
                # (a last segment of the loss alone would follow r = n - 1)
                for k in np.flatnonzero(counts).tolist():
                    m = int(counts[k])
                    labels.add(kind, l + 1 + k, kept[:m] + (handed + int(keeps[k])), recomputed[:m], ids[:m])
            peaks, _ = terms.row(l)
            counts = np.searchsorted(kept, limit - peaks, side="right")
            a_l = 0 if offload else int(terms.a_in[l])
            costs = terms.recompute_flops_row(l) if cost_row is None else cost_row(l)
            for k in np.flatnonzero(counts).tolist():
                m = int(counts[k])
                labels.add(None, l + 1 + k, kept[:m] + a_l, recomputed[:m] + int(costs[k]), ids[:m])
    if best is None:
        return None
    _, label, last_selective = best
    parent, boundary, kind = labels.facts(label)
    checkpoints, stored, chosen = [], [], [boundary] if last_selective else []
    while parent >= 0:
        checkpoints.append(boundary)
        facts = labels.facts(parent)  # start = the boundary of the label this one extends
        if kind is not None:
            stored.append(facts[1])
            if kind == "selective":
                chosen.append(facts[1])
        parent, boundary, kind = facts
    return tuple(reversed(checkpoints)), tuple(reversed(stored)), tuple(sorted(chosen))


_NO_LABELS = (np.zeros(0, dtype=np.int64),) * 3


class _Labels:
    """The labels of :func:`_plan_with_stored`, made in rows: each row is labels extending
    some labels (their ids) to one boundary by one kind of segment. Label 0 is the empty
    plan at boundary 0."""

    def __init__(self):
        self.starts = [0]  # per row: the id of its first label
        self.rows: list[tuple[np.ndarray, int, str | None]] = [(np.array([-1]), 0, None)]  # (parents, boundary, kind)
        # Per (kind, boundary), the labels made so far: their kept bytes, recomputed FLOPs and ids, in parts.
        self.waiting: dict[tuple[str | None, int], tuple[list[np.ndarray], ...]] = {
            (None, 0): tuple([np.zeros(1, dtype=np.int64)] for _ in range(3))
        }

    def add(self, kind: str | None, boundary: int, kept: np.ndarray, recomputed: np.ndarray, parents: np.ndarray) -> None:
        first = self.starts[-1] + len(self.rows[-1][0])
        self.starts.append(first)
        self.rows.append((parents, boundary, kind))
        made = self.waiting.setdefault((kind, boundary), ([], [], []))
        made[0].append(kept)
        made[1].append(recomputed)
        made[2].append(np.arange(first, first + len(parents)))

    def front(self, kind: str | None, boundary: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The labels at ``boundary`` whose last segment runs as ``kind`` that no other beats on
        both kept bytes and FLOPs (the first made of equal ones), by kept bytes ascending."""
        made = self.waiting.pop((kind, boundary), None)
        if made is None:
            return _NO_LABELS
        kept, recomputed, ids = (parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in made)
        order = np.lexsort((recomputed, kept))  # stable: the first made wins ties
        kept, recomputed, ids = kept[order], recomputed[order], ids[order]
        keep = np.empty(len(recomputed), dtype=bool)
        keep[0] = True
        np.less(recomputed[1:], np.minimum.accumulate(recomputed)[:-1], out=keep[1:])
        return kept[keep], recomputed[keep], ids[keep]

    def facts(self, label: int) -> tuple[int, int, str | None]:
        """``label``'s parent (-1 for the empty plan), boundary and last segment's kind."""
        row = bisect.bisect_right(self.starts, label) - 1
        parents, boundary, kind = self.rows[row]
        return int(parents[label - self.starts[row]]), boundary, kind
