"""The chain's plan families: one level of checkpoints on the chain as captured, and nested
checkpoints, stored and selective segments on the chain cut only at single tensors."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from remat.budget import InfeasibleBudget
from remat.chain.cost import largest_retained, recompute_flops_of, single_tensor_boundaries
from remat.chain.model import ChainSolution
from remat.chain.time import early_stop_shares
from remat.plan import Plan
from remat.planner.profiled import Costs, ProfiledModel
from remat.solvers.checkpoints import min_peak, min_recompute, pareto_front
from remat.solvers.nested import MAX_STAGES as MAX_NESTED_STAGES
from remat.solvers.nested import min_peak_nested, min_recompute_nested

__all__ = ["fastest_within", "front", "lower_envelope", "solve_chain"]


def solve_chain(
    profiled: ProfiledModel, budget_bytes: int | None, offload: bool, costs: Costs, nested: bool = True,
    ties_by_time: bool = True,
) -> Plan:
    """The best plan of the chain cost model's families (no remade values; ``nested``: nested
    checkpoints among them); with ``ties_by_time``, the least peak's ties go to the recompute
    predicted fastest, else to the least FLOPs."""
    chain = profiled.planned(profiled.chain)
    if costs == "profile":
        # The solvers weigh recompute by the chain's forward costs: nanoseconds here.
        nanoseconds = np.round(profiled.stage_seconds() * 1e9)
        if chain.early_stop:  # the stopped stages' share, of their FLOPs, now of their time
            chain = dataclasses.replace(
                chain, last_save_flops=np.round(nanoseconds * early_stop_shares(chain)).astype(np.int64)
            )
        chain = dataclasses.replace(chain, fwd_flops=nanoseconds.astype(np.int64))
    start = time.perf_counter()
    if budget_bytes is None:
        # Ties go to the recompute predicted fastest: with early stop, the least FLOPs at the
        # least peak may take twice the segments, each a region. (Within a budget, the least
        # FLOPs here; remat.planner.choose then weighs the front below the budget and
        # fastest_within by time.)
        speed = profiled.speed if costs == "flops" and ties_by_time else None
        solution = min_peak(chain, offload=offload, speed=speed)
    else:
        solution = min_recompute(chain, budget_bytes, offload=offload)
    profiled_plain = profiled.plain_profiled is not None
    if not offload and costs == "flops":
        solution = _on_plain_chain(profiled, solution, budget_bytes, nested)
    if solution is None:
        # The nested least-peak plan may be below every plan the budget search's
        # grid (or the one-level family) reaches: it is the plan if it fits.
        least = solve_chain(profiled, None, offload, costs, nested, ties_by_time)
        if least.predicted_peak_bytes > budget_bytes:
            raise InfeasibleBudget(budget_bytes, least.predicted_peak_bytes)
        return dataclasses.replace(least, budget_bytes=budget_bytes)
    seconds = time.perf_counter() - start
    if not profiled_plain and profiled.plain_profiled is not None:  # its capture counts as capture, not solve
        seconds -= profiled.plain_profiled.capture_seconds
    recompute_seconds = None
    if costs == "profile":
        recompute_seconds = solution.recompute_flops / 1e9
        solution = dataclasses.replace(
            solution, recompute_flops=recompute_flops_of(profiled.chain, solution.checkpoints, solution.stored)
        )
    return profiled.to_plan(solution, seconds, budget_bytes, offload, recompute_seconds)


def fastest_within(profiled: ProfiledModel, budget_bytes: int) -> Plan | None:
    """The one-level plan whose recomputes are predicted fastest within ``budget_bytes`` (None
    if none fits, or without the device's rates). Where operators without FLOPs take much of
    the time (BatchNorm on a CPU) or regions cost more than a small block's FLOPs, it
    recomputes more FLOPs than the least-recompute plan, in less time."""
    if profiled.speed is None:
        return None
    start = time.perf_counter()
    solution = min_recompute(profiled.planned(profiled.chain), budget_bytes, speed=profiled.speed)
    if solution is None:
        return None
    return profiled.to_plan(solution, time.perf_counter() - start, budget_bytes)


def front(
    profiled: ProfiledModel,
    below: int | None = None,
    until: Callable[[ChainSolution], bool] | None = None,
    envelope: bool = True,
    step_bytes: int = 1,
) -> list[ChainSolution]:
    """The chain's Pareto front of plans (peak descending, recompute ascending), with the stored
    and selective segments of the chain cut at single tensors where that chain is small enough.
    ``below``, ``until`` and ``step_bytes`` bound and sample each walk
    (:func:`remat.solvers.checkpoints.pareto_front`).
    Without ``envelope``, the plans of both walks, those the other walk's beat on peak and
    FLOPs too (one may still be faster: fewer regions or selective stages)."""
    front = pareto_front(profiled.chain, below=below, until=until, step_bytes=step_bytes)
    if profiled.plain().chain.n <= MAX_NESTED_STAGES:
        richer = pareto_front(profiled.plain().selective_chain(), store=True, below=below, until=until, step_bytes=step_bytes)
        front += [s for s in richer if s.stored or s.selective]
        if envelope:
            front = lower_envelope(front, lambda s: s.peak_bytes)
    return front


def _on_plain_chain(
    profiled: ProfiledModel, solution: ChainSolution | None, budget_bytes: int | None, nested_allowed: bool = True
) -> ChainSolution | None:
    """``solution``, or a plan on the chain cut only at single tensors that does
    better: nested checkpoints (a lower peak, or less recompute within the budget;
    they recompute at most one forward, plans without recompute less), or stored
    and selective segments (a lower peak, or less recompute within the budget).
    Ties keep ``solution``."""
    # The single-tensor cuts are the carried chain's boundaries that nothing live crosses.
    cuts = [0, *single_tensor_boundaries(profiled.chain), profiled.chain.n]
    if len(cuts) > MAX_NESTED_STAGES:
        return solution
    # Profiling the plain chain is only worth it if none of its stages (between two
    # cuts) retains, for its own backward, more than the peak to beat.
    to_beat = solution.peak_bytes if budget_bytes is None else budget_bytes
    if profiled.chain.base_bytes + largest_retained(profiled.planned(profiled.chain), cuts) >= to_beat:
        return solution
    chain = profiled.planned(profiled.plain().chain)
    if chain.n > MAX_NESTED_STAGES:
        return solution
    forward = int(chain.fwd_flops[:-1].sum())
    richer = profiled.planned(profiled.plain().selective_chain())
    nested = None
    if budget_bytes is None:
        if nested_allowed:
            nested = min_peak_nested(chain, max_recompute_flops=forward)
        stored = min_peak(richer, store=True)
    else:
        if nested_allowed:
            nested = min_recompute_nested(chain, budget_bytes)
        stored = min_recompute(richer, budget_bytes, store=True)
    candidates = [
        solution,
        nested if nested is not None and nested.inner and nested.recompute_flops <= forward else None,
        stored if stored is not None and (stored.stored or stored.selective) else None,
    ]
    if budget_bytes is None:
        return min((c for c in candidates if c is not None), key=lambda c: (c.peak_bytes, c.recompute_flops))
    return min((c for c in candidates if c is not None), key=lambda c: c.recompute_flops, default=None)


def lower_envelope(items: list, peak: Callable[[Any], int]) -> list:
    """The plans (or chain solutions) no other beats on both ``peak`` and recompute, by peak descending."""
    front: list = []
    for item in sorted(items, key=lambda x: (x.recompute_flops, peak(x))):
        if not front or peak(item) < peak(front[-1]):
            front.append(item)
    return front
