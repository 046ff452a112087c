"""Choose a plan: the best of the chain's families, then of the same plans with remade values."""

from __future__ import annotations

import time

from remat.budget import InfeasibleBudget
from remat.plan import Plan
from remat.planner.families import front, lower_envelope, solve_chain
from remat.planner.profiled import Costs, ProfiledModel
from remat.planner.remade import best_remade, simulate_remade
from remat.validate import check_choice

__all__ = ["pareto_plans", "solve"]


def solve(
    profiled: ProfiledModel, budget_bytes: int | None, offload: bool = False, costs: Costs = "flops", remake: bool = True
) -> Plan:
    """The least-peak plan, or the least recompute within ``budget_bytes`` (see :func:`remat.plan`)."""
    check_choice("costs", costs, ("flops", "profile"))
    try:
        chosen = solve_chain(profiled, budget_bytes, offload, costs)
    except InfeasibleBudget:
        chosen = None
    if remake and not offload and costs == "flops":
        chosen = best_remade(profiled, chosen, budget_bytes, front(profiled) if budget_bytes is not None else [])
    if chosen is None:
        least = solve(profiled, None, offload, costs, remake)
        raise InfeasibleBudget(budget_bytes, least.predicted_peak_bytes)
    return chosen


def pareto_plans(profiled: ProfiledModel, remake: bool = True) -> list[Plan]:
    """Every plan worth having, from the lowest peak that recomputes nothing to the least peak
    (see :func:`remat.pareto`)."""
    start = time.perf_counter()
    solutions = front(profiled)
    seconds = (time.perf_counter() - start) / len(solutions)  # the whole front's solve time, shared out
    plans = [profiled.to_plan(solution, seconds, None) for solution in solutions]
    if remake:
        remade = [r for r in (simulate_remade(profiled, p) for p in plans) if r is not None]
        plans = lower_envelope(plans + remade, lambda p: p.predicted_peak_bytes)
    return plans
