"""Least-peak checkpointing of a linear chain: one level of checkpoints.

Two exact solvers return the least peak, ties broken by the least recompute:

``dp`` (O(n^2) time, vectorised): ``f(l)``, the least peak of the suffix that
starts at checkpoint ``l`` (not counting the checkpoints before ``l``), obeys
``f(l) = min(S(l), min_r max(R(l, r), a(l) + f(r)))`` with ``R`` and ``S``
the local costs of a recomputed or last segment. ``f(0)`` is the least peak.

``linear`` (one sweep, O(n log n) in practice): the same recursion, but
``min_r max(R(l, r), a(l) + f(r))`` is kept in a heap instead of rescanned.
For a fixed end ``r`` the candidate's cost only grows as ``l`` moves left
(``R`` does not grow with ``l``: a longer segment holds and recomputes at least
as much), so stale heap keys are lower bounds; the top is re-evaluated until
its key is exact, and then it is the minimum. Each evaluation is O(1) with
sparse-table range maxima over per-stage prefix terms. On heterogeneous random
chains a stage needs few re-evaluations (timings in
``benchmarks/results/chain_scaling.md``).


Ties (least recompute at the least peak) are broken by one more pass over
the chain at the optimal peak ``P``: ``v(r)``, the least bytes of
checkpoints before ``r`` over feasible prefixes that end at checkpoint ``r``,
obeys ``v(r) = min{v(l) + a(l) : v(l) + R(l, r) <= P}``; holding fewer
checkpoint bytes never hurts what follows, so the minimum is all that matters.
Every stage before the last segment is recomputed once, so the plan whose
last segment starts earliest recomputes least, but for what early stop
leaves out of each recompute (``Chain.last_save_*``), which depends on where
every segment ends: there the least recompute comes from Pareto sets of
(kept bytes, recomputed FLOPs) per boundary, as for ``store=True`` (exact,
O(n^2 p)), on chains of up to ``EXACT_STAGES`` stages. ``linear`` computes
``v`` in O(n) amortised with a monotone queue (an ``l`` beaten by a later
``l'`` with ``v(l') + a(l') <= v(l) + a(l)`` is never needed again), ``dp``
with an O(n^2) scan.

Example:
    >>> from remat.chain import peak_of, random_chain
    >>> from remat.solvers.checkpoints import min_peak
    >>> chain = random_chain(12, seed=0)
    >>> best = min_peak(chain)
    >>> best.peak_bytes == peak_of(chain, best.checkpoints) <= peak_of(chain, [])
    True
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import Literal

import numpy as np

from remat.chain.cost import check_offload, check_store, make_solution, peak_of
from remat.chain.model import Chain, ChainSolution
from remat.chain.terms import UNREACHABLE, SegmentTerms, selective_terms_of
from remat.chain.time import Speed
from remat.solvers.offload import least_peak_offloaded, prefix_feasible_offloaded
from remat.solvers.stored import least_recompute_labels, stored_plan

__all__ = ["EXACT_STAGES", "min_peak", "min_recompute", "pareto_front", "plan_within", "prefix_feasible_quadratic"]

#: Chains with early stop of up to this many stages get the exact least recompute (Pareto sets,
#: O(n^2 p)); longer ones the plan whose last segment starts earliest (O(n)).
EXACT_STAGES = 1000


def min_peak(
    chain: Chain,
    method: Literal["dp", "linear"] = "linear",
    *,
    offload: bool = False,
    store: bool = False,
    speed: Speed | None = None,
) -> ChainSolution:
    """Checkpoints with the least peak; among those, the least recompute.

    Args:
        chain: the chain to plan.
        method: ``"dp"`` (exact O(n^2) dynamic program) or ``"linear"``
            (binary search on the peak with an O(n) test; much faster on
            long chains). Both return the optimum.
        offload: kept activations wait in host memory; always solved by the
            O(n^2) dynamic program (``method`` is not used).
        store: over the plans of ``min_recompute(..., store=True)`` (stored
            and selective segments): the least budget it meets, found by
            bisection from the plain least peak (both kinds may lower it: a
            stored segment holds its saved tensors, but has no recompute
            phase, which holds the gradients too).
        speed: the device's rates: among the least-peak plans, the one whose
            recomputes are predicted fastest (FLOPs, operators, bytes and one
            region each, :mod:`remat.chain.time`) rather than the least FLOPs
            (not with ``store``).
    """
    chain = chain.run_as(offload=offload)
    if store:
        check_store(chain, offload)
        terms, selective = SegmentTerms(chain), selective_terms_of(chain)
        best = stored_plan(chain, min_peak(chain, method).peak_bytes, terms, selective)
        low = chain.base_bytes  # nothing fits below what lives all step
        while low < best.peak_bytes:
            middle = (low + best.peak_bytes) // 2
            found = stored_plan(chain, middle, terms, selective)
            if found is None:
                low = middle + 1
            else:
                best = found
        return best
    terms = SegmentTerms(chain)
    check_offload(chain, offload)
    if offload:
        cps = _least_recompute_at(terms, least_peak_offloaded(terms), prefix_feasible_offloaded, True, speed)
        return make_solution(chain, cps, "offload_dp", terms, offload=True)
    if method == "dp" or (method == "linear" and terms.carries):
        # The sweep's range maxima assume each activation is read by the next stage only.
        cps = _least_recompute_at(terms, _least_peak_dp(terms), prefix_feasible_quadratic, speed=speed)
    elif method == "linear":
        cps = _least_recompute_at(terms, _least_peak_sweep(terms), _prefix_feasible_linear, speed=speed)
    else:
        raise ValueError(f"unknown method {method!r}: use 'dp' or 'linear'")
    return make_solution(chain, cps, method, terms)


def min_recompute(
    chain: Chain,
    budget_bytes: int,
    method: Literal["dp", "linear"] = "linear",
    *,
    offload: bool = False,
    store: bool = False,
    speed: Speed | None = None,
) -> ChainSolution | None:
    """Checkpoints with the least recompute whose peak is at most ``budget_bytes``.

    ``None`` when no plan fits (``min_peak`` then gives the least peak there
    is). Exact over the plans of this module: every stage before the last
    segment is recomputed once, so the least recompute is the feasible plan
    whose last segment starts earliest, which the feasibility pass finds; with
    early stop, Pareto sets (see :func:`plan_within`). With ``offload`` (kept
    activations in host memory), an O(n^2) pass.

    With ``speed`` (the device's rates), the plan whose recomputes are predicted
    fastest rather than the least FLOPs (not with ``store``).

    With ``store=True`` the plans may also run middle segments normally
    (``ChainSolution.stored``), keeping their saved tensors instead of
    recomputing them, which pays at generous budgets; on a chain with
    selective costs, stored and last segments may also run selectively
    (``ChainSolution.selective``). Then ``method`` is
    unused: a dynamic program over boundaries keeps, per boundary, the
    Pareto set of (bytes kept before it, FLOPs recomputed so far) of feasible
    prefixes, which is exact because what a prefix leaves to the rest of the
    plan is its kept bytes alone. O(n^2 p) for Pareto sets of size p: meant
    for chains of up to a few hundred stages.

    Example:
        >>> from remat.chain import random_chain
        >>> from remat.solvers.baselines import store_all
        >>> from remat.solvers.checkpoints import min_peak, min_recompute
        >>> chain = random_chain(20, seed=1)
        >>> budget = (min_peak(chain).peak_bytes + store_all(chain).peak_bytes) // 2
        >>> plan = min_recompute(chain, budget)
        >>> plan.peak_bytes <= budget and plan.recompute_flops <= min_peak(chain).recompute_flops
        True
    """
    return _recompute_solver(chain, method, offload, store, speed)(budget_bytes)


def _recompute_solver(
    chain: Chain, method: str, offload: bool, store: bool, speed: Speed | None
) -> Callable[[int], ChainSolution | None]:
    """:func:`min_recompute` of ``chain`` as a function of the budget, its terms built once."""
    chain = chain.run_as(offload=offload)
    terms = SegmentTerms(chain)
    feasible = {"dp": prefix_feasible_quadratic, "linear": _prefix_feasible_linear}.get(method)
    if feasible is None:
        raise ValueError(f"unknown method {method!r}: use 'dp' or 'linear'")
    check_offload(chain, offload)
    if terms.carries:
        feasible = prefix_feasible_quadratic
    if offload:
        feasible, method = prefix_feasible_offloaded, "offload_dp"
    if store:
        check_store(chain, offload)
        selective = selective_terms_of(chain)
        return lambda budget_bytes: stored_plan(chain, budget_bytes, terms, selective)

    def solve(budget_bytes: int) -> ChainSolution | None:
        cps = plan_within(terms, budget_bytes - chain.base_bytes, feasible, offload, speed)
        return None if cps is None else make_solution(chain, cps, method, terms, offload)

    return solve



def pareto_front(
    chain: Chain,
    *,
    offload: bool = False,
    store: bool = False,
    below: int | None = None,
    until: Callable[[ChainSolution], bool] | None = None,
    step_bytes: int = 1,
) -> list[ChainSolution]:
    """Every plan worth having: for each peak, the least recompute, from storing everything to the least peak.

    Peaks strictly decrease along the list and recompute strictly increases:
    no plan of this module has both a peak and a recompute at most those of a
    plan on the front, one of them lower. Found by :func:`min_recompute` at
    ever lower budgets, each just below the last plan's peak (with
    ``offload``, of the plans whose kept activations wait in host memory).

    Example:
        >>> from remat.chain import random_chain
        >>> from remat.solvers.checkpoints import min_peak, pareto_front
        >>> front = pareto_front(random_chain(12, seed=3))
        >>> front[0].recompute_flops, front[-1].peak_bytes == min_peak(random_chain(12, seed=3)).peak_bytes
        (0, True)

    With ``store=True``, over the plans of ``min_recompute(..., store=True)``. With
    ``below``, only the plans whose peak is at most ``below`` bytes (the walk starts
    there); ``until(solution)`` true ends the walk after that plan (the plans after it
    recompute at least as much). With ``step_bytes``, each budget is that far below the last
    plan's peak: a sample of the front, a plan at least every ``step_bytes`` of peak.
    """
    front: list[ChainSolution] = []
    solve = _recompute_solver(chain, "linear", offload, store, None)
    solution = solve(peak_of(chain, []) if below is None else below)
    while solution is not None:
        # Budgets only go down: a plan with a lower peak that recomputes no more
        # than the ones before it replaces them (early stop makes recompute
        # depend on where segments end, not only on where the last one starts).
        while front and front[-1].recompute_flops >= solution.recompute_flops:
            front.pop()
        front.append(solution)
        if until is not None and until(solution):
            break
        solution = solve(solution.peak_bytes - max(step_bytes, 1))
    return front



def _least_peak_dp(terms: SegmentTerms) -> int:
    """f(0) of the right-to-left recursion in the module docstring."""
    n = terms.n
    f = np.zeros(n + 1, dtype=np.int64)
    for l in range(n - 1, -1, -1):
        recompute, last = terms.row(l)
        best = last
        if recompute.size:
            best = min(best, int(np.maximum(recompute, terms.a_in[l] + f[l + 1 : n]).min()))
        f[l] = best
    return int(f[0])


def prefix_feasible_quadratic(terms: SegmentTerms, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """v(r) and its argmin for every r, O(n^2): the reference for the linear test."""
    n = terms.n
    v = np.full(n, UNREACHABLE, dtype=np.int64)
    parent = np.full(n, -1, dtype=np.int64)
    v[0] = 0
    for l in range(n - 1):
        if v[l] >= UNREACHABLE:
            continue
        recompute, _ = terms.row(l)
        candidate = v[l] + terms.a_in[l]
        better = (v[l] + recompute <= limit) & (candidate < v[l + 1 : n])
        idx = np.nonzero(better)[0] + l + 1
        v[idx] = candidate
        parent[idx] = l
    return v, parent


def _prefix_feasible_linear(terms: SegmentTerms, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Same result as the quadratic version, with a monotone queue.

    ``v(r)`` is the least bytes of checkpoints before ``r`` over feasible
    prefixes that end at checkpoint ``r``; ``u(l) = v(l) + a(l)`` is what a
    segment starting at ``l`` adds to it. The queue keeps ``l`` and ``u(l)``
    increasing; its front's range maxima are extended by one stage per step.
    """
    n, big = terms.n, UNREACHABLE
    a_in, f_ns, Q, E, T_ns, T_bw = terms.lists
    rmq_ns, _, rmq_bw = terms.range_max
    held = terms.held
    v = [big] * n
    parent = [-1] * n
    v[0] = 0
    queue: deque[int] = deque([0])
    front = upto = -1
    mx_ns = mx_bw = 0
    for r in range(1, n):
        chosen = -1
        while queue:
            l = queue[0]
            if l == front and upto == r - 1:
                if r >= l + 2 and T_ns[r] > mx_ns:
                    mx_ns = T_ns[r]
                if T_bw[r] > mx_bw:
                    mx_bw = T_bw[r]
            else:
                front = l
                mx_ns = rmq_ns.query(l + 2, r)
                mx_bw = rmq_bw.query(l + 1, r)
            upto = r
            u = v[l] + a_in[l]
            # The forward and backward parts only grow with r: past the limit
            # once, this l never fits again.
            cost = u + max(f_ns[l + 1], mx_ns, held + mx_bw - Q[l])
            if cost > limit:
                queue.popleft()
                continue
            cost = u + E[r] + terms.recompute_part(l, r)
            if cost <= limit:
                chosen = l
                break
            # The recompute part also holds g(r): it may rule this l out for
            # this r only, so look further along without dropping it.
            for k in range(1, len(queue)):
                l = queue[k]
                u = v[l] + a_in[l]
                rc = E[r] + terms.recompute_part(l, r)
                mono = max(f_ns[l + 1], rmq_ns.query(l + 2, r), held + rmq_bw.query(l + 1, r) - Q[l])
                cost = u + max(rc, mono)
                if cost <= limit:
                    chosen = l
                    break
            break
        if chosen >= 0:
            v[r] = vr = v[chosen] + a_in[chosen]
            parent[r] = chosen
            key = vr + a_in[r]
            while queue and v[queue[-1]] + a_in[queue[-1]] >= key:
                queue.pop()
            queue.append(r)
    return np.array(v, dtype=np.int64), np.array(parent, dtype=np.int64)



def plan_within(
    terms: SegmentTerms, limit: int, feasible, offload: bool = False, speed: Speed | None = None
) -> tuple[int, ...] | None:
    """The plan with the least recompute (with ``speed``, predicted recompute time) whose peak
    is <= limit, if any: with early stop or ``speed``, by Pareto sets (see the module
    docstring) on chains of up to ``EXACT_STAGES`` stages, else the plan with the earliest
    last segment."""
    if (terms.early_stop or speed is not None) and terms.n <= EXACT_STAGES:
        plan = least_recompute_labels(terms, limit, offload, speed)
        return None if plan is None else plan[0]
    v, parent = feasible(terms, limit)
    fits = np.nonzero(v + terms.S <= limit)[0]
    if not fits.size:
        return None
    m = int(fits[0])
    cps = []
    while m > 0:
        cps.append(m)
        m = int(parent[m])
    return tuple(reversed(cps))


def _least_recompute_at(
    terms: SegmentTerms, limit: int, feasible, offload: bool = False, speed: Speed | None = None
) -> tuple[int, ...]:
    cps = plan_within(terms, limit, feasible, offload, speed)
    if cps is None:
        raise AssertionError("internal error: the least peak has no plan")
    return cps


def _least_peak_sweep(terms: SegmentTerms) -> int:
    """Least peak over ``base_bytes`` by the right-to-left recursion, in one sweep.

    ``f(l) = min(S(l), a(l) + min_r c_r(l))`` with
    ``c_r(l) = max(R0(l, r), f(r))``. Each ``c_r`` only grows as ``l`` moves
    left (``R0`` does not grow with ``l``), so a heap keyed by lower bounds of
    the ``c_r`` works: raise the top's key until it is exact, and it is the
    minimum. Each ``c_r`` is a max of O(1) range maxima (sparse tables).
    """
    n = terms.n
    a_in, f_ns, Q, E, _, _ = terms.lists
    ns_levels, _, bw_levels = (t.levels for t in terms.range_max)
    floor_log2 = [0] + [k.bit_length() - 1 for k in range(1, n + 2)]
    held = terms.held
    S = terms.S.tolist()
    f = [0] * (n + 1)

    def cost_above(l: int, r: int, key: int) -> int:
        """c_r(l) if it equals ``key``, else a lower bound of it above ``key``."""
        c = f[r]
        if c > key:
            return c
        # stages l+1..r: backward, and forward without saving
        k = floor_log2[r - l]
        level, hi = bw_levels[k], r - (1 << k) + 1
        x = held + max(level[l + 1], level[hi]) - Q[l]
        if x > c:
            c = x
            if c > key:
                return c
        x = f_ns[l + 1]
        if r >= l + 2:
            k = floor_log2[r - l - 1]
            level, hi = ns_levels[k], r - (1 << k) + 1
            x = max(x, level[l + 2], level[hi])
        return max(c, x, E[r] + terms.recompute_part(l, r))

    heap: list[tuple[int, int]] = []
    for l in range(n - 1, -1, -1):
        if l + 1 < n:
            heapq.heappush(heap, (cost_above(l, l + 1, -1), l + 1))
        best = S[l]
        while heap:
            key, r = heap[0]
            current = cost_above(l, r, key)
            if current == key:
                best = min(best, a_in[l] + key)
                break
            heapq.heapreplace(heap, (current, r))
        f[l] = best
    return f[0]
