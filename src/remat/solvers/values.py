"""Least-recompute schedules of op chains that drop and remake single values.

The solvers of :mod:`remat.solvers.chain` choose segments: a recomputed
segment holds its input (the checkpoint) until its backward is done, and a
stored segment keeps everything its ops save, its input included. The exact
integer program of :mod:`remat.solvers.ilp` is not bound by segments: it
drops any one value after its last forward use and remakes it from the
nearest value still in memory when some backward op needs it, at a time of
its choosing (early, while the gradients in flight are small). On random op
chains that freedom is worth a mean of 6% of a forward pass in recompute at
the same budget (``make bench-gap``).

This module finds such schedules by a dynamic program over nested
subproblems, in the model of :mod:`remat.solvers.opgraph` (op ``v`` reads
``x_{v-1}``; its backward ``B_v`` needs ``x_{v-1}`` and/or ``x_v``):

``part(s, t, keep, source, top, owed)`` runs the backward ops
``B_t, .., B_s`` given the *anchor* ``x_{s-1}`` in memory and none of
``x_s..x_t`` (but ``x_t`` itself if ``top``). ``keep``: the caller needs the
anchor afterwards; ``source``: the nearest value below the anchor that stays
in memory throughout (-1: the graph input), from which a dropped anchor is
remade; ``owed``: a value ``x_v`` an enclosing part dropped, to be remade
from ``x_p`` before this part ends: at its start, at its end, or at the start
of one of its parts that runs later in the backward (early enough that the
gradients in flight are still small, late enough not to hold ``x_v`` long).
A part either

* runs ``F_s`` and keeps what ``B_s`` needs: the anchor (or drops it and
  owes its remake to the rest), then ``part(s+1, t)`` with ``x_s`` as the
  anchor, then ``B_s``; or
* runs ``F_s..F_{c-1}`` keeping only ``x_{c-1}``, then ``part(c, t)`` from
  it, then ``part(s, c-1)`` again from the anchor (as Beaumont et al.'s
  heterogeneous-chain algorithm, 2019, at the level of single values).

Each part's result is, for every number of bytes its callers may hold, the
least recompute: a step function kept as its Pareto points (bytes needed
beyond what callers hold, FLOPs), so one run gives every budget's answer.
Sums and minima of step functions are linear merges. The plan read back
releases every value after its last use and is checked by
:func:`remat.solvers.opgraph.simulate`. Not proven optimal, it matches the
integer program's proven optimum at every budget where HiGHS proved one on
the chains of the gap benchmark (``make bench-gap``; ``tests/test_values.py``).

Time grows as about ``n^5`` in the worst case (30 ops: 4 s, 38 ops: 140 s on
one core), hence :data:`MAX_OPS`. A reference, and the model of a value-level
executor to come: :func:`remat.optimize` does not run these schedules yet (its
executor recomputes whole segments).

Example:
    >>> from remat.solvers.opgraph import OpGraph, simulate
    >>> from remat.solvers.values import least_recompute_front
    >>> graph = OpGraph.random_chain(8, seed=1)
    >>> front = least_recompute_front(graph)
    >>> front[0].recompute_flops, front[-1].recompute_flops > 0
    (0, True)
    >>> all(simulate(graph, p.schedule).peak_bytes == p.peak_bytes for p in front)
    True
"""

from __future__ import annotations

import dataclasses
import functools
from operator import itemgetter

from remat.solvers.opgraph import OpGraph, Schedule, gradient_profile, release_after_last_use, simulate

__all__ = ["MAX_OPS", "ValuePlan", "least_recompute_front", "min_recompute_values"]

MAX_OPS = 50  # beyond this the O(n^5) program runs for many minutes

# A Pareto point: (bytes needed beyond what the callers hold, FLOPs of all
# forward runs, the actions as a tree of nested tuples of ("F" | "B", op)).
_Point = tuple
_BY_BYTES = itemgetter(0, 1)
_REMAKE = ("R",)  # a leaf: the owed remake of the nearest enclosing ("owe", v, p, tree) node


@dataclasses.dataclass(frozen=True)
class ValuePlan:
    """A schedule of an op chain and what it costs under :func:`~remat.solvers.opgraph.simulate`."""

    peak_bytes: int
    recompute_flops: int
    schedule: Schedule


def least_recompute_front(graph: OpGraph) -> list[ValuePlan]:
    """Every schedule on the memory/recompute Pareto front of the op chain ``graph``.

    Sorted from the least recompute (highest peak) to the least peak.
    Raises ``ValueError`` if ``graph`` is not a chain (op ``v`` reading
    exactly op ``v - 1``) or has more than :data:`MAX_OPS` ops.
    """
    plans = [_plan(graph, point) for point in _Parts(graph).front()]
    front: list[ValuePlan] = []
    for plan in sorted(plans, key=lambda p: (p.recompute_flops, p.peak_bytes)):
        if not front or plan.peak_bytes < front[-1].peak_bytes:
            front.append(plan)
    return front


def min_recompute_values(graph: OpGraph, budget_bytes: int) -> ValuePlan | None:
    """The schedule of the op chain ``graph`` with the least recompute whose peak fits ``budget_bytes``.

    ``None`` if none fits. This solves for every budget at once: for several
    budgets, call :func:`least_recompute_front` once instead.

    Example:
        >>> from remat.solvers.opgraph import OpGraph
        >>> graph = OpGraph.random_chain(8, seed=1)
        >>> min_recompute_values(graph, 1) is None
        True
    """
    fitting = [p for p in _Parts(graph).front() if p[0] <= budget_bytes]
    if not fitting:
        return None
    return _plan(graph, min(fitting, key=itemgetter(1)))


# -- step functions as Pareto lists: bytes ascending, FLOPs strictly descending ------


def _least(points: list[_Point]) -> list[_Point]:
    kept: list[_Point] = []
    for point in sorted(points, key=_BY_BYTES):
        if not kept or point[1] < kept[-1][1]:
            kept.append(point)
    return kept


def _add(first: list[_Point], second: list[_Point]) -> list[_Point]:
    """Run ``first`` then ``second``: the larger need, the summed FLOPs, at every number of bytes."""
    if not first or not second:
        return []
    if len(first) == 1 or len(second) == 1:
        alone, many = (first, second) if len(first) == 1 else (second, first)
        need, flops, acts = alone[0]
        merged: list[_Point] = []
        for other_need, other_flops, other_acts in many:
            pair = (acts, other_acts) if alone is first else (other_acts, acts)
            point = (max(need, other_need), flops + other_flops, pair)
            if merged and merged[-1][0] == point[0]:
                merged[-1] = point  # a later point of `many` costs less at the same need
            else:
                merged.append(point)
        return merged
    i = j = 0
    need = max(first[0][0], second[0][0])
    merged = []
    while True:
        while i + 1 < len(first) and first[i + 1][0] <= need:
            i += 1
        while j + 1 < len(second) and second[j + 1][0] <= need:
            j += 1
        merged.append((need, first[i][1] + second[j][1], (first[i][2], second[j][2])))
        nexts = [x[0] for x in (first[i + 1 : i + 2] + second[j + 1 : j + 2])]
        if not nexts:
            return merged
        need = min(nexts)


def _then(*parts: list[_Point]) -> list[_Point]:
    result: list[_Point] = [(0, 0, ())]
    for part in parts:
        result = _add(result, part)
    return result


def _shift(part: list[_Point], held: int) -> list[_Point]:
    """``part`` run while ``held`` more bytes are in memory."""
    return [(need + held, flops, acts) for need, flops, acts in part]


def _step(need: int, flops: int = 0, acts: tuple = ()) -> list[_Point]:
    return [(need, flops, acts)]


class _Parts:
    """The dynamic program of the module docstring, for one graph."""

    def __init__(self, graph: OpGraph):
        n = graph.n
        if any(graph.inputs[v] != ((v - 1,) if v else ()) for v in range(n)):
            raise ValueError("least_recompute_front plans op chains only: op v must read exactly op v - 1")
        if n > MAX_OPS:
            raise ValueError(f"least_recompute_front plans chains of up to {MAX_OPS} ops, not {n}")
        self.n = n
        self.out, self.flops = graph.out_bytes, graph.flops
        self.saves_input = [bool(ins) for ins in graph.saves_inputs]
        # The loss is held by the caller to the end: its backward always has it.
        self.saves_output = [*graph.saves_output[:-1], True]
        before, allocated = gradient_profile(graph)
        loss = self.out[n - 1]
        # Fixed bytes at B_b (base, gradients, the loss) and before it (forward recomputes).
        self.at_backward = [graph.base_bytes + before[2 * n - 1 - b] + allocated[2 * n - 1 - b]
                            + (loss if b < n - 1 else 0) for b in range(n)]
        self.before_backward = [graph.base_bytes + before[2 * n - 1 - b] + (loss if b < n - 1 else 0)
                                for b in range(n)]
        self.before_backward[n - 1] = graph.base_bytes  # the forward pass: no gradients yet
        self.part = functools.lru_cache(maxsize=None)(self._part)  # per graph, freed with it

    def front(self) -> list[_Point]:
        """Pareto points of the whole step, FLOPs counted beyond one forward pass."""
        total = sum(self.flops)
        return [(need, flops - total, acts) for need, flops, acts in self.part(0, self.n - 1, False, -1, False, None)]

    def anchor(self, s: int) -> int:
        return self.out[s - 1] if s >= 1 else 0

    def remake_cost(self, v: int, p: int) -> tuple[int, int]:
        """FLOPs of ``F_{p+1}..F_v`` from ``x_p``, and their peak over what is present (``x_p`` aside)."""
        out = self.out
        peak = max((out[k - 1] if k > p + 1 else 0) + out[k] for k in range(p + 1, v + 1))
        return sum(self.flops[p + 1 : v + 1]), peak

    def remake(self, owed: tuple[int, int], present: int, fixed: int) -> list[_Point]:
        """The owed remake next to ``present`` bytes (its FLOPs are counted where it is owed)."""
        return _step(present + owed[1] + fixed, 0, (_REMAKE,))

    def _part(self, s: int, t: int, keep: bool, source: int, top: bool, owed: tuple[int, int] | None) -> list[_Point]:
        """Pareto points of one part; ``owed`` as (bytes of the value, peak of its remake)."""
        out, flops = self.out, self.flops
        anchor, above = self.anchor(s), (out[t] if top else 0)
        own_output = out[s] if self.saves_output[s] else 0
        options: list[_Point] = []
        if owed is not None:  # remake the owed value now, before anything else
            now = self.remake(owed, anchor + above, self.before_backward[t])
            options += _then(now, _shift(self.part(s, t, keep, source, top, None), owed[0]))
            # ... or at the end, after B_s, where only a kept anchor is ours
            at_end = self.remake(owed, anchor if keep else 0, self.before_backward[s - 1]) if s else []
        else:
            at_end = _step(0)
        if s == t:
            forward = _step(0)
            if self.saves_output[s] and not top:
                forward = _step(anchor + out[s] + self.before_backward[t], flops[s], (("F", s),))
            held = anchor if self.saves_input[s] or keep else 0
            backward = _step(held + own_output + self.at_backward[s], 0, (("B", s),))
            return _least(options + _then(forward, backward, at_end))

        # Run F_s and keep what B_s needs.
        needed = self.saves_input[s] or keep
        forward = _step(anchor + above + out[s] + self.before_backward[t], flops[s], (("F", s),))
        held = anchor if needed else 0
        child_source = s - 1 if needed or s == 0 else source

        def backward(extra: int) -> list[_Point]:
            return _step(extra + own_output + self.at_backward[s], 0, (("B", s),))

        rest = _shift(self.part(s + 1, t, self.saves_output[s], child_source, top, None), held)
        options += _then(forward, rest, backward(held), at_end)
        if needed and s >= 1:  # drop the anchor; the rest remakes it from x_source
            flops_owed, peak = self.remake_cost(s - 1, source)
            rest = self.part(s + 1, t, self.saves_output[s], source, top, (anchor, peak))
            rest = [(need, cost + flops_owed, ("owe", s - 1, source, acts)) for need, cost, acts in rest]
            options += _then(forward, rest, backward(anchor), at_end)

        # Run F_s..F_{c-1} keeping only x_{c-1}; (c, t] from it, then (s, c-1] again.
        need = run = 0
        for c in range(s + 1, t + 1):
            k = c - 1
            need = max(need, anchor + above + (out[k - 1] if k > s else 0) + out[k] + self.before_backward[t])
            run += flops[k]
            forward = _step(need, run, tuple(("F", j) for j in range(s, c)))
            for hand_over in {False, self.saves_output[k]}:  # keep x_{c-1} for B_{c-1}
                upper = self.part(c, t, hand_over, s - 1, top, None)
                lower = self.part(s, k, keep, source, hand_over, owed)
                options += _then(forward, _shift(upper, anchor), lower)
        return _least(options)


def _plan(graph: OpGraph, point: _Point) -> ValuePlan:
    actions: list[tuple[str, int]] = []
    # (tree, the owed remake its _REMAKE leaves stand for)
    stack: list[tuple[tuple, tuple[int, int] | None]] = [(point[2], None)]
    while stack:
        node, owed = stack.pop()
        if node is _REMAKE:
            v, p = owed
            actions += [("F", k) for k in range(p + 1, v + 1)]
        elif node and node[0] == "owe":
            stack.append((node[3], (node[1], node[2])))
        elif node and isinstance(node[0], str):
            actions.append(node)
        else:
            stack.extend((child, owed) for child in reversed(node))
    schedule = _schedule(graph, actions)
    cost = simulate(graph, schedule)
    if cost.peak_bytes > point[0] or cost.recompute_flops != point[1]:
        raise AssertionError(f"plan costs {cost}, the program counted {point[:2]}")
    return ValuePlan(cost.peak_bytes, cost.recompute_flops, schedule)


def _schedule(graph: OpGraph, actions: list[tuple[str, int]]) -> Schedule:
    """The steps of ``actions``, each value released right after its last use."""
    current: dict[int, int] = {}  # op -> its latest instance
    op_of: list[int] = []
    uses: list[list[int]] = []
    for kind, v in actions:
        if kind == "F":
            reads = [current[v - 1]] if v else []
            current[v] = len(op_of)
            op_of.append(v)
            uses.append(reads + [current[v]])
        else:
            uses.append([current[u] for u in graph.saved_by(v)])
    steps = [(v, kind == "B") for kind, v in actions]
    return release_after_last_use(graph, steps, uses, op_of)
