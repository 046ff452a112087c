"""Plans run compiled (:mod:`remat.execute.compiled`), each priced by one simulated step of its
compiled graphs: the fastest predicted candidate whose compiled step fits."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from remat.budget import InfeasibleBudget
from remat.plan import Plan
from remat.planner.profiled import ProfiledModel, by_time

__all__ = ["MAX_COMPILED_TRIES", "compiled_choice", "simulate_compiled"]

#: Candidates over the budget once compiled that a budget plan tries at most (each costs a
#: compile and a step on fake tensors) before it gives up on the budget.
MAX_COMPILED_TRIES = 6


def simulate_compiled(profiled: ProfiledModel, plan: Plan, backend: str) -> Plan:
    """``plan`` to run compiled with ``backend``: its peak, recompute and time from one step of
    its compiled graphs under ``aot_eager`` (on fake tensors, or the device with ``profile="device"``)."""
    simulated = profiled.module(dataclasses.replace(plan, compiled="aot_eager"))
    step = profiled.step(simulated)
    flops = step.forward_flops + step.backward_flops
    baseline = profiled.baseline.forward_flops + profiled.baseline.backward_flops
    plan = dataclasses.replace(plan, compiled=backend, predicted_peak_bytes=step.peak_bytes, recompute_flops=flops - baseline)
    return profiled.timed(plan, step)


def compiled_choice(
    profiled: ProfiledModel, candidates: list[Plan], budget_bytes: int | None, backend: str, tolerance: float,
    key: Callable[[Plan], tuple] = by_time,
) -> Plan:
    """The candidates compiled and simulated. Within ``budget_bytes``: the best by ``key``
    (predicted fastest) first, the first whose compiled step fits (at most
    :data:`MAX_COMPILED_TRIES` misses). Without: the best within ``tolerance`` of the least
    compiled peak."""
    if budget_bytes is None:
        simulated = [simulate_compiled(profiled, plan, backend) for plan in candidates]
        limit = min(p.predicted_peak_bytes for p in simulated) * (1 + tolerance)
        return min((p for p in simulated if p.predicted_peak_bytes <= limit), key=key)
    # A compiled step may hold a little more than the chain model says (functional BatchNorm's
    # statistics, an activation made out of place): after a miss, only candidates with at
    # least that much room are tried.
    least, margin, tried = None, 0, 0
    for plan in sorted(candidates, key=key):
        if plan.predicted_peak_bytes + margin > budget_bytes:
            continue
        compiled = simulate_compiled(profiled, plan, backend)
        if compiled.predicted_peak_bytes <= budget_bytes:
            return compiled
        least = min(least or compiled, compiled, key=lambda p: p.predicted_peak_bytes)
        margin = max(margin, compiled.predicted_peak_bytes - plan.predicted_peak_bytes)
        tried += 1
        if tried == MAX_COMPILED_TRIES:
            break
    raise InfeasibleBudget(budget_bytes, least.predicted_peak_bytes)
