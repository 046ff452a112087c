"""Choose a plan: the best of the chain's families, then of the same plans with remade values;
within a budget, the one predicted fastest (or, for the ``"flops"`` objective, the least recompute)."""

from __future__ import annotations

import dataclasses
import math
import time

from remat.budget import InfeasibleBudget
from remat.plan import Plan
from remat.chain.cost import make_solution
from remat.chain.model import ChainSolution
from remat.chain.time import Work, recompute_weights
from remat.planner.compiled import compiled_choice, simulate_compiled
from remat.planner.families import fastest_within, front, lower_envelope, solve_chain
from remat.planner.profiled import Costs, Objective, ProfiledModel, by_time, sort_key
from remat.planner.remade import best_remade, simulate_remade
from remat.validate import check_choice

__all__ = ["PATIENCE", "PEAK_TOLERANCE", "pareto_plans", "solve"]

#: The least-peak plan gives way to one predicted faster whose step peak is at most this
#: fraction above it: a few KiB of a large model's step (a remade value that lowers the
#: peak by 9 KiB of 660 MiB, at 10% more step time) are below what the allocator's rounding
#: and fragmentation let anyone see.
PEAK_TOLERANCE = 1e-3


#: Plans of the Pareto front, below a budget, that a walk down it prices past the fastest so far
#: before it stops (see ``_fitting_front``): plans further down recompute more, and where
#: their FLOPs are too cheap to bound their time, a long walk costs a stored-segments solve per
#: plan (EfficientNet-B0 at batch 64: 452 plans, 95 s, the fastest the 4th).
PATIENCE = 24


def solve(
    profiled: ProfiledModel,
    budget_bytes: int | None,
    offload: bool = False,
    costs: Costs = "flops",
    remake: bool = True,
    compiled: str = "",
    objective: Objective = "time",
) -> Plan:
    """The least-peak plan (the fastest within :data:`PEAK_TOLERANCE` of it), or the least
    predicted step time within ``budget_bytes`` (see :func:`remat.plan`).

    Within a budget the candidates are the least recompute the families find, the same
    with remade values, every plan of the chain's Pareto front that fits, and the one-level
    plan whose recomputes are predicted fastest: the least recompute is not the fastest
    where its regions, dispatch modes and operators without FLOPs cost more than the FLOPs
    a plan with fewer of them recomputes (:mod:`remat.chain.time`). With ``objective="flops"``
    the least recompute (ties: the fastest), at the least peak too.

    ``compiled`` (one of :data:`remat.execute.compiled.BACKENDS`): plans a compiled module runs
    (no nested checkpoints, offload or remade values), chosen by simulated compiled steps."""
    check_choice("costs", costs, ("flops", "profile"))
    check_choice("objective", objective, ("time", "flops"))
    key = sort_key(objective)
    if compiled:
        if offload:
            raise ValueError("compiled plans do not offload: pass offload=False, or compile=False to offload")
        remake = False
    step = profiled.baseline
    if budget_bytes is not None and step is not None and step.optimizer_peak_bytes > budget_bytes:
        # The optimizer's step() runs with every gradient made, whatever the plan.
        least = solve(profiled, None, offload, costs, remake, compiled, objective)
        raise InfeasibleBudget(budget_bytes, least.predicted_peak_bytes)
    try:
        chosen = solve_chain(profiled, budget_bytes, offload, costs, nested=not compiled, ties_by_time=objective == "time")
    except InfeasibleBudget:
        chosen = None
    timed_choice = budget_bytes is not None and not offload and objective == "time"
    fitting = _fitting_front(profiled, budget_bytes, chosen, costs) if timed_choice else []
    if timed_choice and costs == "flops":
        fitting += [p for p in (fastest_within(profiled, budget_bytes),) if p is not None]
    chain_plan = chosen
    if remake and not offload and costs == "flops":
        timed = [
            p.predicted_seconds for p in (chain_plan, *fitting) if p is not None and p.predicted_seconds is not None
        ]
        chosen = best_remade(profiled, chosen, budget_bytes, objective, to_beat=min(timed, default=None))
    if chosen is None:
        least = solve(profiled, None, offload, costs, remake, compiled, objective)
        raise InfeasibleBudget(budget_bytes, least.predicted_peak_bytes)
    start = time.perf_counter()
    if budget_bytes is None:
        # The least peak, or a plan predicted faster within the tolerance: the chain's plan
        # without remade values, or storing everything (offload plans stand alone).
        candidates = [chosen]
        if not offload:
            stored_all = make_solution(profiled.planned(profiled.chain), (), "store everything")
            store = profiled.to_plan(stored_all, 0.0, None, recompute_seconds=0.0 if costs == "profile" else None)
            limit = chosen.predicted_peak_bytes * (1 + PEAK_TOLERANCE)
            candidates += [p for p in (chain_plan, store) if p.predicted_peak_bytes <= limit]
    else:
        candidates = [chosen, *fitting]
    if compiled:
        best = compiled_choice(profiled, candidates, budget_bytes, compiled, PEAK_TOLERANCE, key)
    else:
        best = min(candidates, key=key)
    # Pricing the candidates counts as solve time, whichever plan won.
    return dataclasses.replace(best, solve_seconds=chosen.solve_seconds + time.perf_counter() - start)


def _fitting_front(profiled: ProfiledModel, budget_bytes: int, chosen: Plan | None, costs: Costs) -> list[Plan]:
    """The plans of the chain's Pareto front that fit ``budget_bytes``, timed.

    Each walk starts at the budget and goes down the front, where recompute only grows. It
    stops at a plan whose recompute FLOPs alone, over the model's own step, are predicted
    slower than the fastest plan found: every plan after it is (:class:`remat.chain.time.Work`
    adds up, and a chain plan's work is the model's step and at least its recompute's FLOPs).
    Where FLOPs are a small part of the step (depthwise convolutions), that bound comes late,
    and a walk also stops after :data:`PATIENCE` plans none of which is predicted faster.
    """
    speed = profiled.speed
    if speed is None or costs != "flops":
        return [_timed(profiled, s, budget_bytes, costs) for s in front(profiled, below=budget_bytes, envelope=False)]
    timed: dict[ChainSolution, Plan] = {}  # by the solution itself: an id may be reused once the walk drops one
    fastest = by_time(chosen)[0] if chosen is not None and chosen.predicted_seconds is not None else math.inf
    since_fastest, last_recompute = 0, -1

    def slower_from_here(solution: ChainSolution) -> bool:
        nonlocal fastest, since_fastest, last_recompute
        if solution.recompute_flops < last_recompute:  # the next walk (front() walks two chains)
            since_fastest = 0
        last_recompute = solution.recompute_flops
        timed[solution] = plan = _timed(profiled, solution, budget_bytes, costs)
        seconds = by_time(plan)[0]
        since_fastest = 0 if seconds < fastest else since_fastest + 1
        fastest = min(fastest, seconds)
        floor = speed.seconds(profiled.baseline.work + Work(flops=solution.recompute_flops))
        return floor > fastest or since_fastest >= PATIENCE

    solutions = front(profiled, below=budget_bytes, until=slower_from_here, envelope=False)
    return [timed.get(s) or _timed(profiled, s, budget_bytes, costs) for s in solutions]


def _timed(profiled: ProfiledModel, solution: ChainSolution, budget_bytes: int, costs: Costs) -> Plan:
    """The plan of a front ``solution``, with the measured times of what it recomputes if ``costs="profile"``."""
    recompute_seconds = None
    if costs == "profile":
        source = profiled.source_of(solution)
        weights = recompute_weights(source.chain, solution.checkpoints, solution.stored, solution.inner)
        recompute_seconds = float(weights @ source.stage_seconds())
    return profiled.to_plan(solution, 0.0, budget_bytes, recompute_seconds=recompute_seconds)


def pareto_plans(profiled: ProfiledModel, remake: bool = True, compiled: str = "") -> list[Plan]:
    """Every plan worth having, from the lowest peak that recomputes nothing to the least peak
    (see :func:`remat.pareto`); with ``compiled``, the front's plans compiled (simulated)."""
    start = time.perf_counter()
    solutions = front(profiled)
    seconds = (time.perf_counter() - start) / len(solutions)  # the whole front's solve time, shared out
    plans = [profiled.to_plan(solution, seconds, None) for solution in solutions]
    if compiled:
        simulated = [simulate_compiled(profiled, plan, compiled) for plan in plans]
        return lower_envelope(simulated, lambda p: p.predicted_peak_bytes)
    if remake:
        remade = [r for r in (simulate_remade(profiled, p) for p in plans) if r is not None]
        plans = lower_envelope(plans + remade, lambda p: p.predicted_peak_bytes)
    return plans
