"""Exact least-recompute schedules of small op graphs by integer programming.

A Checkmate-style mixed-integer program (Jain et al., 2020) over the memory
model of :mod:`lab.opgraph`, solved with HiGHS (``pip install
remat[ilp]``). It is the reference that measures how far remat's chain
solvers are from the best schedule of any kind.

Stages ``t = 0..2n-1``: stage ``t < n`` runs forward op ``t``; stage
``n + k`` runs backward op ``B_{n-1-k}`` (backward ops run once each, in the
fixed order, so gradient memory at every stage is a known constant). Binary
variables:

* ``R[t, v]``: forward op ``v`` runs in stage ``t`` (``R[t, t] = 1`` in the
  forward stages; the loss is never recomputed);
* ``S[t, v]``: value ``x_v`` is kept in memory from stage ``t-1`` into ``t``
  (the loss is kept through the backward);

and continuous ``F[t, i, k]`` (value ``i`` released right after step ``k`` of
stage ``t``) and ``U[t, k]`` (bytes of forward values at that step).
Constraints:

* an op's inputs are there: ``R[t, v] <= R[t, u] + S[t, u]`` for ``u -> v``,
  and a backward op's saved values are: ``R[t, u] + S[t, u] >= 1``;
* only what is there is kept: ``S[t+1, v] <= S[t, v] + R[t, v]``, and
  nothing is computed twice at once: ``R[t, v] + S[t, v] <= 1``;
* a value is released at most at its last use in the stage and only if it is
  not kept: ``F[t, i, k] <= R[t, k]``, ``<= 1 - S[t+1, i]``,
  ``<= 1 - R[t, j]`` for every later reader ``j``. Bounds that are 0 or 1
  make a fractional ``F`` pointless, so ``F`` need not be integral;
* memory: ``U`` starts at the kept bytes, adds each op's output, subtracts what
  is released after each step, and with ``base_bytes``, the stage's gradients
  and the backward op's allocations stays within the budget at every step.

The objective is the FLOPs of all ``R`` beyond one run of each op. The plan
read back releases every value as early as the constraints allow, and
:func:`lab.opgraph.simulate` checks it.

Example:
    >>> from lab.ilp import min_recompute_ilp
    >>> from lab.opgraph import OpGraph, chain_schedule, simulate
    >>> graph = OpGraph.random_chain(6, seed=0)
    >>> store_all = simulate(graph, chain_schedule(graph, ())).peak_bytes
    >>> result = min_recompute_ilp(graph, store_all, time_limit_s=10)
    >>> result.status, result.recompute_flops
    ('optimal', 0)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from lab.opgraph import OpGraph, Schedule, Step, gradient_profile, simulate

__all__ = ["IlpResult", "min_recompute_ilp"]


@dataclasses.dataclass(frozen=True)
class IlpResult:
    """What HiGHS found for one budget.

    Attributes:
        status: ``"optimal"`` (proven), ``"time_limit"`` (stopped early; the
            plan, if any, is the best found and ``bound_flops`` a proven lower
            bound) or ``"infeasible"`` (no schedule fits the budget).
        recompute_flops: recomputed FLOPs of the plan found, or ``None``.
        bound_flops: proven lower bound on the least recompute.
        schedule: the plan, releasing every value as early as it may.
        peak_bytes: the plan's peak under :func:`~lab.opgraph.simulate`.
        seconds: wall time of the solve.
    """

    status: Literal["optimal", "time_limit", "infeasible"]
    recompute_flops: int | None
    bound_flops: float
    schedule: Schedule | None
    peak_bytes: int | None
    seconds: float


class _Model:
    """Columns and sparse rows, handed to HiGHS in one piece."""

    def __init__(self) -> None:
        self.cost: list[float] = []
        self.lower: list[float] = []
        self.upper: list[float] = []
        self.integer: list[bool] = []
        self.rows: list[tuple[list[int], list[float], float, float]] = []

    def var(self, lower: float = 0.0, upper: float = 1.0, cost: float = 0.0, integer: bool = True) -> int:
        self.cost.append(cost)
        self.lower.append(lower)
        self.upper.append(upper)
        self.integer.append(integer)
        return len(self.cost) - 1

    def row(self, terms: dict[int, float], lower: float = -np.inf, upper: float = np.inf) -> None:
        self.rows.append((list(terms), list(terms.values()), lower, upper))

    def solve(self, time_limit_s: float):
        import highspy

        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = len(self.cost), len(self.rows)
        lp.col_cost_ = np.asarray(self.cost)
        lp.col_lower_ = np.asarray(self.lower)
        lp.col_upper_ = np.asarray(self.upper)
        lp.row_lower_ = np.asarray([r[2] for r in self.rows])
        lp.row_upper_ = np.asarray([r[3] for r in self.rows])
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_ = np.cumsum([0] + [len(r[0]) for r in self.rows]).astype(np.int32)
        lp.a_matrix_.index_ = np.asarray([c for r in self.rows for c in r[0]], dtype=np.int32)
        lp.a_matrix_.value_ = np.asarray([v for r in self.rows for v in r[1]], dtype=np.float64)
        kinds = highspy.HighsVarType
        lp.integrality_ = [kinds.kInteger if i else kinds.kContinuous for i in self.integer]
        h = highspy.Highs()
        h.silent()
        h.setOptionValue("time_limit", float(time_limit_s))
        h.setOptionValue("threads", 1)
        h.setOptionValue("mip_rel_gap", 0.0)  # objectives are integers: prove the optimum
        h.setOptionValue("mip_abs_gap", 0.5)
        h.passModel(lp)
        h.run()
        return h


def min_recompute_ilp(graph: OpGraph, budget_bytes: int, time_limit_s: float = 60.0) -> IlpResult:
    """The schedule of ``graph`` with the least recomputed FLOPs whose peak is at most ``budget_bytes``.

    Every schedule of the model in :mod:`lab.opgraph` is allowed:
    any value may be dropped and recomputed any number of times, in the
    forward or the backward. Exponential in the worst case: meant for graphs
    of a few tens of ops, with ``time_limit_s`` as a safety net (the result
    then says so).

    Example:
        >>> from lab.opgraph import OpGraph
        >>> min_recompute_ilp(OpGraph.random_chain(4, seed=0), 1, time_limit_s=5).status
        'infeasible'
    """
    n, loss = graph.n, graph.n - 1
    out = graph.out_bytes
    readers: list[list[int]] = [[] for _ in range(n)]
    for v, ins in enumerate(graph.inputs):
        for u in ins:
            readers[u].append(v)
    stages = 2 * n
    backward_op = [None] * n + [n - 1 - k for k in range(n)]
    grads_before, grads_step = gradient_profile(graph)

    m = _Model()
    R: dict[tuple[int, int], int] = {}
    S: dict[tuple[int, int], int] = {}
    for t in range(stages):
        for v in range(n):
            if t < n and v <= t:
                fixed = 1.0 if v == t else 0.0
                R[t, v] = m.var(lower=fixed, cost=float(graph.flops[v]))
            elif t >= n and v != loss:
                R[t, v] = m.var(cost=float(graph.flops[v]))
            if 0 < t and (v < t or t >= n):
                S[t, v] = m.var(lower=1.0 if (t >= n and v == loss) else 0.0)

    def there(t: int, v: int) -> dict[int, float]:
        return {col: 1.0 for col in (R.get((t, v)), S.get((t, v))) if col is not None}

    for t in range(stages):
        b = backward_op[t]
        for v in range(n):
            if (t, v) in R:
                for u in graph.inputs[v]:
                    terms = there(t, u)
                    terms[R[t, v]] = terms.get(R[t, v], 0.0) - 1.0
                    m.row(terms, lower=0.0)
                if (t, v) in S:
                    m.row({R[t, v]: 1.0, S[t, v]: 1.0}, upper=1.0)
            if (t + 1, v) in S:
                terms = {S[t + 1, v]: -1.0, **there(t, v)}
                m.row(terms, lower=0.0)
        if b is not None:
            for u in graph.saved_by(b):
                m.row(there(t, u), lower=1.0)

        # Memory, step by step: forward ops in order, then the backward op.
        limit = budget_bytes - graph.base_bytes - grads_before[t]
        ops = [v for v in range(n) if (t, v) in R]
        steps = ops + ([None] if b is not None else [])
        previous = None
        for k in steps:
            step_limit = limit - (grads_step[t] if k is None else 0)
            u_col = m.var(lower=0.0, upper=max(step_limit, 0), integer=False)
            terms = {u_col: 1.0}
            if previous is None:
                for v in range(n):
                    if (t, v) in S:
                        terms[S[t, v]] = -float(out[v])
            else:
                prev_col, prev_frees = previous
                terms[prev_col] = -1.0
                for col, nbytes in prev_frees:
                    terms[col] = terms.get(col, 0.0) + float(nbytes)
            if k is not None:
                terms[R[t, k]] = terms.get(R[t, k], 0.0) - float(out[k])
            m.row(terms, lower=0.0, upper=0.0)
            if step_limit < 0:
                m.row({u_col: 1.0}, upper=-1.0)  # the budget is below this step's fixed bytes
            previous = (u_col, _frees(m, graph, readers, R, S, t, k, b))

    h = m.solve(time_limit_s)
    return _result(graph, h, R, S, backward_op)


def _frees(m: _Model, graph: OpGraph, readers, R, S, t: int, k: int | None, b: int | None):
    """Release variables after step ``k`` of stage ``t`` (``None``: the backward op ``b``)."""
    loss = graph.n - 1
    candidates = graph.saved_by(b) if k is None else (*graph.inputs[k], k)
    frees = []
    for i in candidates:
        if i == loss or (k is not None and b is not None and i in graph.saved_by(b)):
            continue  # the loss is held; the backward op still reads it
        f = m.var(integer=False)
        if k is not None:
            m.row({f: 1.0, R[t, k]: -1.0}, upper=0.0)
            for j in readers[i]:
                if j > k and (t, j) in R:
                    m.row({f: 1.0, R[t, j]: 1.0}, upper=1.0)
        if (t + 1, i) in S:
            m.row({f: 1.0, S[t + 1, i]: 1.0}, upper=1.0)
        frees.append((f, graph.out_bytes[i]))
    return frees


def _result(graph: OpGraph, h, R, S, backward_op) -> IlpResult:
    import highspy

    seconds = h.getRunTime()
    status = h.getModelStatus()
    info = h.getInfo()
    if status == highspy.HighsModelStatus.kInfeasible:
        return IlpResult("infeasible", None, float("inf"), None, None, seconds)
    if status == highspy.HighsModelStatus.kOptimal:
        kind = "optimal"
    elif status == highspy.HighsModelStatus.kTimeLimit:
        kind = "time_limit"
    else:
        raise RuntimeError(f"HiGHS stopped with status {h.modelStatusToString(status)}")
    bound = float(info.mip_dual_bound) - sum(graph.flops)
    if info.primal_solution_status == 0:  # no feasible plan found in time
        return IlpResult(kind, None, bound, None, None, seconds)
    x = np.asarray(h.getSolution().col_value)
    ran = {key for key, col in R.items() if x[col] > 0.5}
    kept = {key for key, col in S.items() if x[col] > 0.5}
    schedule = _schedule(graph, ran, kept, backward_op)
    cost = simulate(graph, schedule)
    return IlpResult(kind, cost.recompute_flops, max(bound, 0.0), schedule, cost.peak_bytes, seconds)


def _schedule(graph: OpGraph, ran: set, kept: set, backward_op) -> Schedule:
    """Steps of a solution, each value released right after its last use in its stage unless kept."""
    n, loss = graph.n, graph.n - 1
    steps: list[Step] = []
    present: set[int] = set()
    for t, b in enumerate(backward_op):
        ops = [v for v in range(n) if (t, v) in ran]
        stage = [(v, False) for v in ops] + ([(b, True)] if b is not None else [])
        keep = {v for v in range(n) if (t + 1, v) in kept} | {loss}
        reads = [set(graph.saved_by(v)) if bw else set(graph.inputs[v]) | {v} for v, bw in stage]
        for index, (v, bw) in enumerate(stage):
            if not bw:
                present.add(v)
            later = set().union(*reads[index + 1:])
            free = sorted(u for u in present if u not in keep and u not in later
                          and (u in reads[index] or index == len(stage) - 1))
            present.difference_update(free)
            steps.append(Step(v, bw, tuple(free)))
    return Schedule(tuple(steps))
