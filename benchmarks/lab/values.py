"""Least-recompute schedules of op graphs that drop and remake single values.

The solvers of :mod:`remat.solvers.checkpoints` choose segments: a recomputed
segment holds its input (the checkpoint) until its backward is done, and a
stored segment keeps everything its ops save, its input included. The exact
integer program of :mod:`lab.ilp` is not bound by segments: it
drops any one value after its last forward use and remakes it from the
nearest value still in memory when some backward op needs it, at a time of
its choosing (early, while the gradients in flight are small). On random op
chains that freedom is worth a mean of 6% of a forward pass in recompute at
the same budget (``make bench-gap``).

This module finds such schedules by a dynamic program over nested
subproblems, in the model of :mod:`lab.opgraph` (op ``v`` reads
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
:func:`lab.opgraph.simulate`. Not proven optimal, it matches the
integer program's proven optimum at every budget where HiGHS proved one on
the chains of the gap benchmark (``make bench-gap``; ``tests/test_values.py``).

DAGs (residual and branching blocks) are planned as chains of *units* three
times, and the best schedules kept:

* op by op, in topological order: ``x_v`` then stands for every value in
  memory after op ``v`` (``x_v`` and the values that skip over it to a later
  reader). Counted in full for each held ``x_v``, a skipping value held in two
  of them is counted twice: the program over-counts inside blocks, never
  under-counts, and the plan's simulated peak may be below its figure;
* op by op again, each held ``x_v`` charged only for the values made after
  the nearest value held below it (``x_p``, held throughout: what ``x_v``
  adds to memory), and a unit may keep of its anchor only what its backward
  reads (the rest then neither remakes from the anchor nor counts on it).
  Closer to the truth, still never under it; neither count is exact, and
  each ranks some schedules the other misses above the rest;
* stage by stage, between the single values that cut the graph
  (:func:`~lab.opgraph.linear_cuts`): a stage's forward keeps the
  values its backward needs inside it (run ``"S"``) or only its output
  (``"F"``); a stage holding inner values is not run again before its
  backward, so no remake passes through it.

On 30 random DAGs of 10 to 39 ops the best of the three is a mean 1.4% of a
forward above the ILP's proven optimum (max 7.0%, equal at 32 of 68 budgets;
before the second family: mean 2.4%, max 17.2%), against 12.8% for remat's
segment solvers (``make bench-gap``). At one budget, :func:`min_recompute_values`
then improves the best of them by local search (:mod:`lab.polish`):
mean 0.2%, max 6.4%, equal at 57 of 68.

Time grows as about ``n^5`` in the worst case (30 ops: 4 s, 38 ops: 140 s on
one core), hence :data:`MAX_OPS`. A reference, and the model of a value-level
executor to come: :func:`remat.optimize` does not run these schedules yet (its
executor recomputes whole segments, and remakes cheap values one by one).

Example:
    >>> from lab.opgraph import OpGraph, simulate
    >>> from lab.values import least_recompute_front
    >>> graph = OpGraph.random_chain(8, seed=1)
    >>> front = least_recompute_front(graph)
    >>> front[0].recompute_flops, front[-1].recompute_flops > 0
    (0, True)
    >>> all(simulate(graph, p.schedule).peak_bytes == p.peak_bytes for p in front)
    True
"""

from __future__ import annotations

import functools
from operator import itemgetter

from lab.opgraph import (
    OpGraph,
    Schedule,
    ValuePlan,
    gradient_profile,
    schedule_of_steps,
    simulate,
    stage_backward_peak,
    stage_forward_peak,
    stages,
)
from lab.polish import PATIENCE, polish

__all__ = ["MAX_OPS", "POLISHED", "ValuePlan", "least_recompute_front", "min_recompute_values"]

#: Fitting schedules of the front :func:`min_recompute_values` polishes: from another start the
#: local search may end lower (DAG seed 17 of ``make bench-gap``: 7.0% of a forward above the
#: ILP from the first, equal from the second).
POLISHED = 4
MAX_OPS = 50  # units (ops, or stages of a DAG): beyond this the O(n^5) program runs for many minutes

# A Pareto point: (bytes needed beyond what the callers hold, FLOPs of all
# forward runs, the actions as a tree of nested tuples of ("F" | "S" | "I" | "B", unit)).
_Point = tuple
_BY_BYTES = itemgetter(0, 1)
_REMAKE = ("R",)  # a leaf: the owed remake of the nearest enclosing ("owe", v, p, tree) node


def least_recompute_front(graph: OpGraph) -> list[ValuePlan]:
    """Every schedule on the memory/recompute Pareto front of the op graph ``graph`` that
    the program finds, with its cost under :func:`~lab.opgraph.simulate`.

    Sorted from the least recompute (highest peak) to the least peak. A DAG is
    planned three times, op by op (two ways of counting held values) and stage
    by stage (see the module docstring), and the best schedules kept. Raises
    ``ValueError`` if it has more than :data:`MAX_OPS` ops and stages.
    """
    ops, stage_ops = [range(v, v + 1) for v in range(graph.n)], stages(graph)
    # (units, whether held values are charged against those held below them; see _Parts)
    families = [(ops, False)] if len(stage_ops) == graph.n else [(ops, False), (ops, True), (stage_ops, False)]
    plannable = [(units, charged) for units, charged in families if len(units) <= MAX_OPS]
    if not plannable:
        raise ValueError(
            f"least_recompute_front plans graphs of up to {MAX_OPS} ops or {MAX_OPS} stages, "
            f"not {graph.n} ops in {len(stage_ops)} stages"
        )
    plans = []
    for units, charged in plannable:
        parts = _Parts(graph, units, charged)
        plans += [_plan(parts, point) for point in parts.front()]
    front: list[ValuePlan] = []
    for plan in sorted(plans, key=lambda p: (p.recompute_flops, p.peak_bytes)):
        if not front or plan.peak_bytes < front[-1].peak_bytes:
            front.append(plan)
    return front


def min_recompute_values(
    graph: OpGraph, budget_bytes: int, front: list[ValuePlan] | None = None, patience: int = PATIENCE
) -> ValuePlan | None:
    """The least recompute found within ``budget_bytes``: the :data:`POLISHED` fitting schedules
    of :func:`least_recompute_front` that recompute least, each improved one change at a time
    by :func:`lab.polish.polish`, and the best of them kicked and improved again
    until ``patience`` kicks in a row find nothing better (0: no kicks, faster); ``None`` if
    none fits.

    ``front``: the graph's :func:`least_recompute_front`, to plan several budgets from one run.

    Example:
        >>> from lab.opgraph import OpGraph
        >>> graph = OpGraph.random_chain(8, seed=1)
        >>> min_recompute_values(graph, 1) is None
        True
    """
    front = least_recompute_front(graph) if front is None else front
    fitting = sorted((p for p in front if p.peak_bytes <= budget_bytes), key=lambda p: p.recompute_flops)
    polished = [polish(graph, plan.schedule, budget_bytes, patience=0) for plan in fitting[:POLISHED]]
    best = min(polished, key=lambda p: (p.recompute_flops, p.peak_bytes), default=None)
    if best is None or not patience:
        return best
    return polish(graph, best.schedule, budget_bytes, patience=patience)


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


def _live_after(graph: OpGraph, v: int) -> set[int]:
    """The values in memory between op ``v`` and op ``v + 1`` of a plain forward pass."""
    last = graph.last_consumer
    return {u for u in range(v + 1) if last[u] > v or u == v} if v >= 0 else set()


class _Parts:
    """The dynamic program of the module docstring, for one graph.

    A unit (an op, or a stage of a DAG) runs its forward in one of three modes:
    ``"S"`` keeps what its backward needs inside it (its *inner* saved values),
    ``"F"`` keeps only its output, ``"I"`` makes the inner values again while its
    output is still in memory. Inner values are held from an ``"S"`` run to the
    unit's backward; no remake passes through a unit that holds them.
    """

    def __init__(self, graph: OpGraph, units: list[range], charged: bool = False):
        n = len(units)
        self.graph, self.units, self.n, self.charged = graph, units, n, charged
        last_op = [ops[-1] for ops in units]
        # A unit's output x_v stands for every value in memory after it, the values that skip
        # over it (in a DAG's blocks) included: counted in full for each held x_v, or, if
        # ``charged``, held while x_p (p < v) stays in memory, only the values made after p
        # (charge[p + 1][v]; p = -1: all). Each held value charged against one held below it,
        # the sum is never below the bytes of their union. Neither count is exact, and the
        # program keeps the schedules its count ranks best: each finds some the other misses.
        live = [_live_after(graph, o) for o in last_op]
        full = [sum(graph.out_bytes[u] for u in live_v) for live_v in live]
        self.charge = (
            [full] + [[sum(graph.out_bytes[u] for u in live[v] - below) for v in range(n)] for below in live]
            if charged else [full] * (n + 1)
        )
        self.flops = [sum(graph.flops[v] for v in ops) for ops in units]
        self.inner_flops = [f - graph.flops[o] for f, o in zip(self.flops, last_op)]
        saved = [{u for v in ops for u in graph.saved_by(v)} for ops in units]
        saved_inputs = [_live_after(graph, ops.start - 1) & saved_i for ops, saved_i in zip(units, saved)]
        self.saves_input = [bool(inputs) for inputs in saved_inputs]
        # Of the anchor (everything in memory before a unit), what the unit's backward needs.
        self.saved_input = [sum(graph.out_bytes[u] for u in inputs) for inputs in saved_inputs]
        # The loss is held by the caller to the end: its backward always has it.
        self.saves_output = [*(graph.saves_output[o] for o in last_op[:-1]), True]
        self.inner = [sum(graph.out_bytes[u] for u in ops[:-1] if u in saved_i) for ops, saved_i in zip(units, saved)]
        self.run_saving = [stage_forward_peak(graph, ops, saved_i) for ops, saved_i in zip(units, saved)]
        self.run_plain = [stage_forward_peak(graph, ops, ()) for ops in units]
        before, _ = gradient_profile(graph)
        loss, base = graph.out_bytes[graph.n - 1], graph.base_bytes
        # Fixed bytes at B_b (base, gradients, what the backward allocates, the loss) and before
        # it (forward recomputes).
        self.before_backward = [base + before[2 * graph.n - 1 - o] + (loss if b < n - 1 else 0)
                                for b, o in enumerate(last_op)]
        # Inner saved values are freed after their last reader; the unit's output is held on.
        self.at_backward = [fixed + stage_backward_peak(graph, ops, ops[:-1])
                            for fixed, ops in zip(self.before_backward, units)]
        self.before_backward[n - 1] = base  # the forward pass: no gradients yet
        self.part = functools.lru_cache(maxsize=None)(self._part)  # per graph, freed with it

    def front(self) -> list[_Point]:
        """Pareto points of the whole step, FLOPs counted beyond one forward pass (the
        program's counts: :func:`_plan` simulates each)."""
        total = sum(self.flops)
        return [(need, flops - total, acts) for need, flops, acts in self.part(0, self.n - 1, False, -1, False, None)]

    def held(self, below: int, v: int) -> int:
        """Bytes of holding ``x_v`` while ``x_below`` stays in memory (``v`` = -1: the graph input)."""
        return self.charge[below + 1][v] if v >= 0 else 0

    def remake_cost(self, v: int, p: int) -> tuple[int, int]:
        """FLOPs of ``F_{p+1}..F_v`` from ``x_p``, and their peak over what is present (``x_p`` aside)."""
        peak = max((self.held(p, k - 1) if k > p + 1 else 0) + self.run_plain[k] for k in range(p + 1, v + 1))
        return sum(self.flops[p + 1 : v + 1]), peak

    def remake(self, owed: tuple[int, int], present: int, fixed: int) -> list[_Point]:
        """The owed remake next to ``present`` bytes (its FLOPs are counted where it is owed)."""
        return _step(present + owed[1] + fixed, 0, (_REMAKE,))

    def _part(
        self, s: int, t: int, keep: bool, source: int | None, top: bool, owed: tuple[int, int] | None
    ) -> list[_Point]:
        """Pareto points of one part; ``owed`` as (bytes of the value, peak of its remake);
        ``source`` None where no value below the anchor may be remade."""
        flops, inner, held = self.flops, self.inner, self.held
        below = -1 if source is None else source  # in memory while this part runs
        # x_t (if ``top``) is only counted next to the anchor, hence charged against it.
        anchor, above = held(below, s - 1), (held(s - 1, t) if top else 0)

        def own_output(anchor_kept: bool) -> int:  # x_s at B_s
            return held(s - 1 if anchor_kept else below, s) if self.saves_output[s] else 0

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
            if inner[s] and top:  # the inner values again, next to the output in memory
                forward = _step(anchor + above + self.run_saving[s] + self.before_backward[t],
                                self.inner_flops[s], (("I", s),))
            elif inner[s] or (self.saves_output[s] and not top):
                forward = _step(anchor + self.run_saving[s] + self.before_backward[t], flops[s], (("S", s),))
            kept = self.saves_input[s] or keep
            held_at_backward = (anchor if kept else 0) + own_output(kept)
            if self.charged and not keep:  # ... or only what B_s reads of it
                held_at_backward = min(held_at_backward, self.saved_input[s] + own_output(False))
            backward = _step(held_at_backward + inner[s] + self.at_backward[s], 0, (("B", s),))
            return _least(options + _then(forward, backward, at_end))

        # Run F_s and keep what B_s needs.
        needed = self.saves_input[s] or keep
        forward = _step(anchor + above + self.run_saving[s] + self.before_backward[t], flops[s], (("S", s),))
        holding = (anchor if needed else 0) + inner[s]
        child_source = None if inner[s] else (s - 1 if needed or s == 0 else source)

        def backward(extra: int, anchor_kept: bool) -> list[_Point]:
            return _step(extra + own_output(anchor_kept) + self.at_backward[s], 0, (("B", s),))

        rest = _shift(self.part(s + 1, t, self.saves_output[s], child_source, top, None), holding)
        options += _then(forward, rest, backward(holding, needed), at_end)
        if self.charged and self.saves_input[s] and not keep and self.saved_input[s] < anchor:
            # Keep only what B_s reads of the anchor: the rest neither remakes from it nor
            # counts on the values it no longer reads.
            holding = self.saved_input[s] + inner[s]
            rest = _shift(self.part(s + 1, t, self.saves_output[s], None if inner[s] else source, top, None), holding)
            options += _then(forward, rest, backward(holding, False), at_end)
        if needed and s >= 1 and source is not None:  # drop the anchor; the rest remakes it from x_source
            flops_owed, peak = self.remake_cost(s - 1, source)
            rest = self.part(s + 1, t, self.saves_output[s], None if inner[s] else source, top, (anchor, peak))
            rest = [(need + inner[s], cost + flops_owed, ("owe", s - 1, source, acts)) for need, cost, acts in rest]
            options += _then(forward, rest, backward(anchor + inner[s], True), at_end)

        # Run F_s..F_{c-1} keeping only x_{c-1}; (c, t] from it, then (s, c-1] again.
        need = run = 0
        for c in range(s + 1, t + 1):
            k = c - 1
            need = max(need, anchor + above + (held(s - 1, k - 1) if k > s else 0) + self.run_plain[k]
                       + self.before_backward[t])
            run += flops[k]
            forward = _step(need, run, tuple(("F", j) for j in range(s, c)))
            for hand_over in {False, self.saves_output[k]}:  # keep x_{c-1} for B_{c-1}
                upper = self.part(c, t, hand_over, s - 1, top, None)
                lower = self.part(s, k, keep, source, hand_over, owed)
                options += _then(forward, _shift(upper, anchor), lower)
        return _least(options)


def _plan(parts: _Parts, point: _Point) -> ValuePlan:
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
    schedule = _schedule(parts.graph, parts.units, actions)
    cost = simulate(parts.graph, schedule)
    if cost.peak_bytes > point[0] or cost.recompute_flops != point[1]:
        raise AssertionError(f"plan costs {cost}, the program counted {point[:2]}")
    return ValuePlan(cost.peak_bytes, cost.recompute_flops, schedule)


def _schedule(graph: OpGraph, units: list[range], actions: list[tuple[str, int]]) -> Schedule:
    """The op steps of the units' ``actions``, each value released right after its last use."""
    steps: list[tuple[int, bool]] = []
    for kind, unit in actions:
        ops = units[unit]
        if kind == "B":
            steps += [(v, True) for v in reversed(ops)]
        else:
            steps += [(v, False) for v in (ops[:-1] if kind == "I" else ops)]
    return schedule_of_steps(graph, steps)
