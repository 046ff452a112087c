"""Nested checkpoints: recompute some segments more than once, for lower peaks.

The plans of :mod:`remat.solvers.checkpoints` recompute each segment once, from its
checkpoint, and then hold all of it; a long segment of large activations sets
the peak. Here the recompute of a segment ``(l, r]`` may itself keep
checkpoints ``c1 < .. < ck`` (``ChainSolution.inner``): it runs ``(l, ck]``
without saving, ``(ck, r]`` normally, and recomputes ``(l, c1], ..,
(c(k-1), ck]`` again when the backward reaches them, each of which may nest in
turn (as Griewank's revolve, and the heterogeneous-chain algorithm of
Beaumont et al., 2019). The executor nests ``torch.utils.checkpoint``
(non-reentrant checkpoints nest: an inner checkpoint's inputs are saved by the
outer one). ``peak_of(chain, checkpoints, inner=...)`` gives the exact peak.

Recompute is no longer fixed by where the last segment starts, so peak and
recompute trade off at every level. The dynamic program below minimises the
recomputed FLOPs for every memory limit on a grid of ``slots`` steps at once:

* ``B(l, r, m)``: the least FLOPs of segment ``(l, r]``'s recompute and
  backward within ``m`` (its input ``a(l)`` counted): recompute it whole
  (``recompute_phase <= m``), or keep a first inner checkpoint ``c``: run
  ``(l, c]`` without saving next to ``g(r)`` and what the backward holds
  (``a(l) + E(r) + forward_unsaved(l, c) <= m``), go on with ``G_r(c, m - a(l))``
  and later do ``B(l, c, m)``;
* ``G_r(c, m)``: the rest of that recompute from inner checkpoint ``c``: run
  ``(c, r]`` normally (``run_inside(c, r) <= m``), or keep a next ``c2``;
* ``T(l, m)``: the top level, from checkpoint ``l``: the last segment
  (``S(l) <= m``), or a recomputed segment ``(l, c]`` then ``T(c, m - a(l))``.

Sizes rounded up to the grid make every plan found fit its limit, but miss
plans within a few grid steps of it (a budget equal to a plan's peak, say);
rounded down, the program finds those, and some that do not fit. Both are
solved, every plan found is evaluated exactly (``peak_of``), and the best
that fits wins, with the best plan without nesting as a candidate too.
O(n^3 slots) time, O(n^2 slots) memory: for chains of up to ``MAX_STAGES``
stages, which bounds the program's time. Plain chains only (single-tensor boundaries).

Example:
    >>> from remat.solvers.checkpoints import min_peak
    >>> from remat.solvers.nested import min_peak_nested
    >>> from remat.chain import random_chain
    >>> chain = random_chain(30, seed=4)
    >>> single = min_peak(chain)
    >>> nested = min_peak_nested(chain, max_recompute_flops=2 * int(chain.fwd_flops.sum()))
    >>> nested.peak_bytes <= single.peak_bytes
    True
"""

from __future__ import annotations

import numpy as np

from remat.chain.cost import make_solution
from remat.chain.model import Chain, ChainSolution
from remat.chain.terms import SegmentTerms
from remat.solvers.baselines import store_all
from remat.solvers.checkpoints import min_peak, min_recompute

__all__ = ["MAX_STAGES", "min_peak_nested", "min_recompute_nested"]

MAX_STAGES = 100  # bounds the O(n^3 slots) program's time; longer chains raise
_INF = np.int64(1) << 61


class _Costs:
    """Every segment's local costs in bytes, the same at any grid step."""

    def __init__(self, chain: Chain):
        if chain.carries:
            raise ValueError("nested checkpoints are planned only for chains of single-tensor boundaries")
        if chain.n > MAX_STAGES:
            raise ValueError(f"nested plans are solved for chains of up to {MAX_STAGES} stages, not {chain.n}")
        self.chain = chain
        self.terms = t = SegmentTerms(chain.run_as(nested=True))
        n = chain.n
        # forward_unsaved(l, c), recompute_phase(l, r), run_inside(c, r) for all pairs.
        self.unsaved = np.zeros((n + 1, n + 1), dtype=np.int64)
        self.phase = np.zeros((n + 1, n + 1), dtype=np.int64)
        self.inside = np.zeros((n + 1, n + 1), dtype=np.int64)
        for l in range(n):
            for r in range(l + 1, n + 1):
                self.unsaved[l, r] = t.forward_unsaved(l, r)
                if r < n:
                    self.phase[l, r] = t.recompute_phase(l, r)
                    self.inside[l, r] = t.run_inside(l, r)


class _Program:
    """The tables of the dynamic program at one grid step ``q`` (bytes)."""

    def __init__(self, costs: _Costs, limit: int, slots: int, round_up: bool = True):
        self.chain = chain = costs.chain
        self.terms = t = costs.terms
        self.unsaved, self.phase, self.inside = costs.unsaved, costs.phase, costs.inside
        self.n = n = chain.n
        self.slots = slots
        self.q = max(1, -(-max(limit, 1) // slots))
        self.round_up = round_up
        self.flops = np.concatenate([[0], np.cumsum(chain.fwd_flops)]).astype(np.int64)
        self.memory = np.arange(slots + 1)
        units = self.units
        self.a = [units(x) for x in t.a_in]
        self.E = [int(x) for x in t.E]
        self.B = np.full((n + 1, n + 1, slots + 1), _INF, dtype=np.int64)
        for r in range(1, n):
            G = self.rest(r)
            for l in range(r - 1, -1, -1):
                self.B[l, r] = self.phase_options(l, r, G).min(axis=0)
        self.T = np.full((n + 1, slots + 1), _INF, dtype=np.int64)
        for l in range(n - 1, -1, -1):
            self.T[l] = self.top_options(l).min(axis=0)

    def units(self, nbytes) -> int:
        return int(-(-int(nbytes) // self.q)) if self.round_up else int(nbytes) // self.q

    def _shifted(self, table: np.ndarray, by: int) -> np.ndarray:
        """``out[..., m] = table[..., m - by]`` (infinite below ``by``)."""
        out = np.full_like(table, _INF)
        if by <= self.slots:
            out[..., by:] = table[..., : self.slots + 1 - by]
        return out

    def _fits(self, nbytes) -> np.ndarray:
        """Per grid limit m (rows: one per entry of ``nbytes``): whether it fits."""
        need = np.array([self.units(x) for x in np.atleast_1d(nbytes)])
        return self.memory[None, :] >= need[:, None]

    def rest(self, r: int) -> np.ndarray:
        """``G_r(c, m)`` for every c < r (rows), with r fixed."""
        G = np.full((r + 1, self.slots + 1), _INF, dtype=np.int64)
        for c in range(r - 1, 0, -1):
            G[c] = self.rest_options(c, r, G).min(axis=0)
        return G

    def rest_options(self, c: int, r: int, G: np.ndarray) -> np.ndarray:
        """Candidates for ``G_r(c, .)``: row 0 runs (c, r] normally, row j keeps c + j next."""
        return self._options(c, r, G, self.inside[c, r])

    def phase_options(self, l: int, r: int, G: np.ndarray) -> np.ndarray:
        """Candidates for ``B(l, r, .)``: row 0 recomputes it whole, row j keeps l + j first."""
        return self._options(l, r, G, self.phase[l, r])

    def _options(self, l: int, r: int, G: np.ndarray, whole_bytes: int) -> np.ndarray:
        """Row 0: (l, r] run in one go (``whole_bytes`` at its peak); row j: (l, l + j] run
        without saving next to what the backward holds at r, then ``G_r(l + j)`` with a(l)
        kept, then (l, l + j] recomputed later. FLOPs: every recompute of each stage."""
        flops = self.flops
        whole = np.where(self._fits(whole_bytes)[0], flops[r] - flops[l], _INF)
        nxt = np.arange(l + 1, r)
        if not nxt.size:
            return whole[None, :]
        fits = self._fits(self.terms.a_in[l] + self.E[r] + self.unsaved[l, nxt])
        cost = (flops[nxt] - flops[l])[:, None] + self.B[l, nxt] + self._shifted(G[nxt], self.a[l])
        return np.minimum(np.vstack([whole[None, :], np.where(fits, cost, _INF)]), _INF)

    def top_options(self, l: int) -> np.ndarray:
        """Candidates for ``T(l, .)``: row 0 is the last segment, row j keeps l + j."""
        n = self.n
        last = np.where(self._fits(self.terms.S[l])[0], 0, _INF)
        nxt = np.arange(l + 1, n)
        if not nxt.size:
            return last[None, :]
        fits = self._fits(self.terms.a_in[l] + self.unsaved[l, nxt]) & (self.B[l, nxt] < _INF)
        cost = self.B[l, nxt] + self._shifted(self.T[nxt], self.a[l])
        return np.minimum(np.vstack([last[None, :], np.where(fits, cost, _INF)]), _INF)

    # -- the plan behind a table entry -------------------------------------------
    def plan(self, m: int) -> ChainSolution:
        checkpoints: list[int] = []
        inner: list[tuple[int, int, tuple[int, ...]]] = []
        l = 0
        while True:
            choice = int(np.argmin(self.top_options(l)[:, m]))
            if choice == 0:
                break
            c = l + choice
            checkpoints.append(c)
            self._phase_plan(l, c, m, inner)
            m -= self.a[l]
            l = c
        return make_solution(self.chain, checkpoints, "nested", inner=tuple(sorted(inner)))

    def _phase_plan(self, l: int, r: int, m: int, inner: list) -> None:
        G = self.rest(r)
        choice = int(np.argmin(self.phase_options(l, r, G)[:, m]))
        if choice == 0:
            return
        cs = [l + choice]
        self._phase_plan(l, cs[0], m, inner)
        m -= self.a[l]
        while True:
            c = cs[-1]
            choice = int(np.argmin(self.rest_options(c, r, G)[:, m]))
            if choice == 0:
                break
            cs.append(c + choice)
            self._phase_plan(c, c + choice, m, inner)
            m -= self.a[c]
        inner.append((l, r, tuple(cs)))


def min_recompute_nested(chain: Chain, budget_bytes: int, slots: int = 400) -> ChainSolution | None:
    """The least recompute with nested checkpoints within ``budget_bytes`` (``None``: none found).

    The plan of :func:`remat.solvers.checkpoints.min_recompute` is a candidate, so
    this never does worse; the grid has ``slots`` steps between 0 and the budget.
    """
    limit = budget_bytes - chain.base_bytes
    candidates = [min_recompute(chain, budget_bytes)]
    if limit > 0:
        costs = _Costs(chain)
        for round_up in (True, False):
            program = _Program(costs, limit, slots, round_up)
            m = min(limit // program.q, slots)
            if program.T[0, m] < _INF:
                candidates.append(program.plan(m))
    fitting = [c for c in candidates if c is not None and c.peak_bytes <= budget_bytes]
    return min(fitting, key=lambda c: (c.recompute_flops, c.peak_bytes), default=None)


def min_peak_nested(chain: Chain, max_recompute_flops: int, slots: int = 400) -> ChainSolution:
    """The least peak with nested checkpoints that recomputes at most ``max_recompute_flops``.

    Among plans of that peak (on the grid of ``slots`` steps up to the peak
    of the least-peak plan without nesting), the least recompute.
    """
    single = min_peak(chain)
    upper = single if single.recompute_flops <= max_recompute_flops else store_all(chain)
    candidates = [upper]
    costs = _Costs(chain)
    for round_up in (True, False):
        program = _Program(costs, upper.peak_bytes - chain.base_bytes, slots, round_up)
        within = np.nonzero(program.T[0] <= max_recompute_flops)[0]
        if within.size:
            candidates.append(program.plan(int(within[0])))
    return min(candidates, key=lambda c: (c.peak_bytes, c.recompute_flops))
