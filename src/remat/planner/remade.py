"""Plans run with remade values (:mod:`remat.execute.remake`), each priced by one simulated step:
the best remade plan for the least peak or a budget, and the search over remade costly calls."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable

from remat.chain.cost import make_solution
from remat.chain.model import ChainSolution
from remat.chain.time import Work
from remat.execute.remake import CostlyCall, costly_calls
from remat.measure.step import step_model
from remat.plan import Plan
from remat.planner.families import front
from remat.planner.profiled import Objective, ProfiledModel, sort_key

__all__ = ["FRONT_SAMPLES", "MAX_COSTLY_KINDS", "MAX_TRADES", "best_remade", "costly_calls_of", "costly_worth", "remade_costly", "simulate_remade"]

#: ones with the most output bytes; measuring what each saves costs one simulated step.
MAX_COSTLY_KINDS = 8
#: Trades of remade costly calls (:func:`_traded`) a budget plan takes at most: each
#: one tried costs a simulated step.
MAX_TRADES = 4
#: Plans of the front above a budget the time objective's remade search walks to at most
#: (see ``_cheaper_front``); each is a solve of the chain's dynamic program.
FRONT_SAMPLES = 32



def simulate_remade(profiled: ProfiledModel, plan: Plan, costly: tuple[int, ...] = ()) -> Plan | None:
    """``plan`` with cheap values remade in backward (:mod:`remat.execute.remake`), and the outputs
    of the ``costly`` calls too; its peak and recompute simulated (one step). None (with
    a warning) where the model does something remaking cannot follow.

    A plan with selective stages is also simulated with them run plainly (remaking
    does value by value what they do per stage); the lower peak is kept.
    """
    variants = [plan, dataclasses.replace(plan, selective=())] if plan.selective else [plan]
    simulated = []
    for variant in variants:
        variant = dataclasses.replace(variant, remake=True, remade_costly=costly)
        # The searches of remade_costly come back to plans they simulated before.
        runs = (variant.stage_names, variant.checkpoints, variant.inner, variant.stored, variant.selective,
                variant.offload, costly)
        if runs not in profiled.simulated:
            try:
                profiled.simulated[runs] = profiled.step(profiled.module(variant))
            except RuntimeError as error:
                warnings.warn(f"remat: planning without remade values ({error})", stacklevel=4)
                return None
        step = profiled.simulated[runs]
        flops = step.forward_flops + step.backward_flops
        baseline = profiled.baseline.forward_flops + profiled.baseline.backward_flops
        variant = dataclasses.replace(variant, predicted_peak_bytes=step.peak_bytes, recompute_flops=flops - baseline)
        simulated.append(profiled.timed(variant, step))
    return min(simulated, key=lambda p: p.predicted_peak_bytes)


def best_remade(
    profiled: ProfiledModel,
    chosen: Plan | None,
    budget_bytes: int | None,
    objective: Objective = "time",
    to_beat: float | None = None,
) -> Plan | None:
    """``chosen``, or the same plan run with remade values if that lowers the least peak.

    Within a budget, the best for ``objective`` (the least predicted step time, or the least
    recompute, see :func:`remat.planner.profiled.sort_key`) among ``chosen``, the plans of the front run
    with remade values (the one that recomputes least first, then by bisection along
    the rest), and the first remade with the outputs of its most memory-hungry matmuls
    remade too (:func:`remade_costly`). Each candidate is one or two simulated steps;
    the front is the chain's (:func:`remat.planner.families.front`), down to ``chosen``.
    With the time objective, ``to_beat`` is the least predicted step time of the plans
    without remade values (default ``chosen``'s): only the plans of the front that could
    be faster remade are simulated (:func:`_could_be_faster`). The FLOPs objective prices
    nothing before it simulates.
    """
    start = time.perf_counter()
    if objective != "time":
        to_beat = None
    elif to_beat is None and chosen is not None:
        to_beat = chosen.predicted_seconds
    if budget_bytes is None:  # the least-peak plan is there
        best = simulate_remade(profiled, chosen)
        if best is None or best.predicted_peak_bytes >= chosen.predicted_peak_bytes:
            best = chosen
    elif chosen is not None and not _remade_can_be_faster(profiled, to_beat):
        return chosen
    else:
        cheaper = _cheaper_front(profiled, chosen, budget_bytes, to_beat)

        def remade(index: int) -> Plan | None:
            return simulate_remade(profiled, cheaper[index])

        # Remade throughout, the plan that recomputes least often beats plans with recomputed
        # segments (their recompute keeps everything it saves): the remade peaks fall along
        # the rest of the front only.
        first = remade(0) if cheaper else None
        if _fits(first, budget_bytes):
            candidates = [chosen, first]
        else:
            if first is not None:
                cheaper = _could_be_faster(cheaper, remade, to_beat)
            along = _least_fitting(remade, 1, len(cheaper), budget_bytes)
            candidates = [chosen, along[1] if along else None]
            if first is not None and cheaper:
                candidates.append(remade_costly(profiled, cheaper, budget_bytes, to_beat))
        best = min((c for c in candidates if c is not None), key=sort_key(objective), default=None)
    if best is None:
        return None
    # The simulated steps count as solve time, whichever plan won.
    return dataclasses.replace(
        best, solve_seconds=(chosen.solve_seconds if chosen else 0.0) + time.perf_counter() - start
    )


def _cheaper_front(
    profiled: ProfiledModel, chosen: Plan | None, budget_bytes: int, to_beat: float | None
) -> list[Plan]:
    """The plans of the chain's front that recompute less than ``chosen`` (the whole front
    without it), by recompute ascending, as plans within ``budget_bytes``.

    With ``to_beat`` (seconds), the walk down the front also ends at the first plan that,
    remade, could not be predicted faster than that (:func:`_remade_can_be_faster`):
    remaking only adds to a plan's work, and the predicted times grow along the front
    with its recompute. The walk then takes a sample of the front, a plan every
    1/:data:`FRONT_SAMPLES` of the peaks between the budget and storing everything: the
    search bisects along it, and a step too few bytes above the budget to fit remade is
    as good as the plan next to it.
    """
    step_bytes = 1 if to_beat is None else (profiled.baseline.peak_bytes - budget_bytes) // FRONT_SAMPLES
    plans: dict[ChainSolution, Plan] = {}  # a front solution -> its plan, made once

    def plan_of(solution: ChainSolution) -> Plan:
        if solution not in plans:
            plans[solution] = profiled.to_plan(solution, 0.0, budget_bytes)
        return plans[solution]

    def until(solution: ChainSolution) -> bool:
        if chosen is not None and solution.recompute_flops >= chosen.recompute_flops:
            return True
        return to_beat is not None and not _remade_can_be_faster(profiled, to_beat, plan_of(solution))

    solutions = front(profiled, until=until, step_bytes=step_bytes)
    # Storing everything, remade, is the least peak of many models, but the front may leave it
    # out where stored or selective segments reach a lower peak at no FLOPs without remaking.
    if all(s.checkpoints or s.stored or s.selective for s in solutions):
        solutions.insert(0, make_solution(profiled.planned(profiled.chain), (), "store everything"))
    return [plan_of(s) for s in solutions if chosen is None or s.recompute_flops < chosen.recompute_flops]


def _remade_can_be_faster(profiled: ProfiledModel, seconds: float | None, plan: Plan | None = None) -> bool:
    """Whether a plan with remade values (``plan`` remade, or any) could be predicted faster than
    ``seconds``. Such a plan runs at least the model's own step (and ``plan``'s recompute), with
    every forward operator under the recorder: when that alone is predicted slower, it is not
    worth a simulated step."""
    speed = profiled.speed
    if speed is None or seconds is None:
        return True
    if plan is None:
        least = speed.seconds(profiled.baseline.work)
    elif plan.predicted_seconds is None:
        return True
    else:
        least = plan.predicted_seconds
    return least + speed.seconds(Work(recorded_ops=profiled.baseline.forward_ops)) <= seconds


def _could_be_faster(front: list[Plan], remade: Callable[[int], Plan | None], seconds: float | None) -> list[Plan]:
    """The plans of ``front`` (by recompute ascending) that might be predicted faster than
    ``seconds`` run with remade values, with ``remade(i)`` the plan ``front[i]`` remade.

    Each is priced, without a simulated step, at its own predicted time plus the least that
    remaking added to the plans simulated: the first of the front and its middle, which
    the bisection along the front starts from anyway. Remaking adds much the same to every
    plan of a front (the recorder on every forward operator, the cheap values remade where
    the plan stores), except where it also drops a plan's selective stages. The kept plans
    keep the front's order, so their peaks still fall along them.
    """
    if seconds is None or any(p.predicted_seconds is None for p in front):
        return front
    probes = [(front[i], remade(i)) for i in sorted({0, len(front) // 2})]
    added = [r.predicted_seconds - p.predicted_seconds for p, r in probes if r is not None and r.predicted_seconds is not None]
    if not added:
        return front
    return [p for p in front if p.predicted_seconds + min(added) < seconds]


def remade_costly(
    profiled: ProfiledModel, front: list[Plan], budget_bytes: int, to_beat: float | None = None
) -> Plan | None:
    """The plan of ``front`` (by recompute ascending) with costly calls remade too that fits
    the budget at the least recompute found; or None. Plans run remade and without
    selective stages. With ``to_beat`` (seconds), only the plans of the front that could be
    predicted faster so (:func:`_could_be_faster`, before any costly call is remade), and
    no search where none could be (:func:`_costly_can_be_faster`).

    Calls are remade in the order of the peak bytes their kind saves per FLOP
    (:func:`costly_worth`): attention before the first matmul of an MLP, say;
    kinds that save nothing never. For the best kind, then the best two, and so
    on: the first plan of the front that fits with every call of those kinds
    remade, then the fewest calls remade on it (both by bisection). A kind
    worth less is only tried where it lets an earlier plan of the front fit.
    The best plan found is then improved by trades of its calls (:func:`_traded`).
    """
    front = [dataclasses.replace(p, selective=(), remake=False, remade_costly=()) for p in front]
    if to_beat is not None:
        front = _could_be_faster(front, lambda i: simulate_remade(profiled, front[i]), to_beat)
        if not front:
            return None
    census: dict[int, list[CostlyCall]] = {}  # per plan of the front, its costly calls

    def census_of(index: int) -> list[CostlyCall]:
        if index not in census:
            census[index] = costly_calls_of(profiled, front[index])
        return census[index]

    if to_beat is not None and not _costly_can_be_faster(profiled, front, budget_bytes, to_beat, _by_outputs(census_of(0))):
        return None
    worth = costly_worth(profiled, front[0], census_of(0))
    best_first = sorted((kind for kind, w in worth.items() if w > 0), key=worth.get, reverse=True)
    # Measured, the bytes a kind's calls save per FLOP price the search more closely.
    if to_beat is not None and best_first and not _costly_can_be_faster(
        profiled, front, budget_bytes, to_beat, lambda to_free: to_free / worth[best_first[0]]
    ):
        return None
    rank = {kind: i for i, kind in enumerate(best_first)}
    calls: dict[int, list[CostlyCall]] = {}

    def candidates(index: int, kinds: int = len(rank)) -> list[CostlyCall]:
        """The calls of ``front[index]`` of the ``kinds`` best kinds, best first."""
        if index not in calls:
            found = [c for c in census_of(index) if c.kind in rank]
            calls[index] = sorted(found, key=lambda c: rank[c.kind])  # stable: forward order within a kind
        return [c for c in calls[index] if rank[c.kind] < kinds]

    def remade(index: int, count: int) -> Plan | None:
        return simulate_remade(profiled, front[index], tuple(sorted(c.index for c in candidates(index)[:count])))

    best, best_index, high = None, 0, len(front)
    for kinds in range(1, len(rank) + 1):
        fitting = _least_fitting(lambda i: remade(i, len(candidates(i, kinds))), 0, high, budget_bytes)
        if fitting is None:
            continue
        index, plan = fitting
        # With the kinds before alone, every call remade did not fit on this plan.
        fewer = len(candidates(index, kinds - 1)) + 1 if kinds > 1 else 1
        most = len(candidates(index, kinds))
        fewest = _least_fitting(lambda count: remade(index, count), fewer, most, budget_bytes)
        plan = fewest[1] if fewest else plan
        if best is None or plan.recompute_flops < best.recompute_flops:
            best, best_index = plan, index
        high = index
    return best if best is None else _traded(profiled, front[best_index], best, candidates(best_index), budget_bytes)


def _costly_can_be_faster(
    profiled: ProfiledModel,
    front: list[Plan],
    budget_bytes: int,
    seconds: float,
    flops_to_free: Callable[[int], float],
) -> bool:
    """Whether a plan of ``front`` (without selective stages, by recompute ascending) with costly
    calls remade could fit ``budget_bytes`` and be predicted faster than ``seconds``, where
    ``flops_to_free(b)`` estimates the least FLOPs of the calls whose remaking frees ``b`` bytes.

    An estimate, not a bound. The front's remade peaks fall along it: the last plan's,
    simulated, less the budget is what a fitting plan must free. The plan then takes at
    least the front's least predicted time, what remaking added to the first plan
    (simulated) and those FLOPs' time.
    """
    speed = profiled.speed
    first, last = simulate_remade(profiled, front[0]), simulate_remade(profiled, front[-1])
    if speed is None or first is None or last is None or any(p.predicted_seconds is None for p in [first, *front]):
        return True
    flops = flops_to_free(last.predicted_peak_bytes - budget_bytes)
    added = first.predicted_seconds - front[0].predicted_seconds
    return min(p.predicted_seconds for p in front) + added + speed.seconds(Work(flops=flops)) < seconds


def _by_outputs(calls: list[CostlyCall]) -> Callable[[int], float]:
    """``flops_to_free`` for :func:`_costly_can_be_faster` before remaking any: a remade call frees
    about its output (its copies may go too), the calls with the most output bytes per FLOP first."""

    def flops_to_free(to_free: int) -> float:
        flops = 0
        for call in sorted(calls, key=lambda c: c.flops / max(c.output_bytes, 1)):
            if to_free <= 0:
                break
            to_free -= call.output_bytes
            flops += call.flops
        return flops

    return flops_to_free


def _traded(profiled: ProfiledModel, base: Plan, found: Plan, calls: list[CostlyCall], budget_bytes: int) -> Plan:
    """``found`` (``base`` with some of ``calls`` remade: of each kind, the first in forward
    order) improved one trade at a time while it fits the budget: a remade call given up,
    or traded for a call of another kind that costs fewer FLOPs; the trade that saves
    most first, at most :data:`MAX_TRADES` taken. Kinds that save as many bytes per
    FLOP are in no useful order, and the last kind's count overshoots the bytes the
    budget needs by up to a call: trades land the mix closer."""
    kinds = _by_kind(calls)
    flops = {kind: same[0].flops for kind, same in kinds.items()}
    remade = set(found.remade_costly)
    counts = {kind: sum(c.index in remade for c in same) for kind, same in kinds.items()}
    tried = {tuple(counts.values())}  # a mix that did not fit or save before will not now
    for _ in range(MAX_TRADES):
        trades = [({give: -1}, flops[give]) for give in kinds if counts[give]]
        trades += [
            ({give: -1, take: 1}, flops[give] - flops[take])
            for give in kinds if counts[give]
            for take in kinds if counts[take] < len(kinds[take]) and flops[take] < flops[give]
        ]
        for trade, _ in sorted(trades, key=lambda t: -t[1]):
            mix = {kind: counts[kind] + trade.get(kind, 0) for kind in kinds}
            if tuple(mix.values()) in tried:
                continue
            tried.add(tuple(mix.values()))
            plan = simulate_remade(profiled, base, tuple(sorted(c.index for kind, n in mix.items() for c in kinds[kind][:n])))
            if _fits(plan, budget_bytes) and plan.recompute_flops < found.recompute_flops:
                found, counts = plan, mix
                break
        else:
            break
    return found


def costly_calls_of(profiled: ProfiledModel, plan: Plan) -> list[CostlyCall]:
    with step_model(profiled.module(plan), profiled.inputs, fake=profiled.fake) as (module, inputs):
        return costly_calls(lambda: module(*inputs))


def costly_worth(profiled: ProfiledModel, plan: Plan, calls: list[CostlyCall]) -> dict[tuple, float]:
    """Peak bytes saved per recomputed FLOP when every call of a kind (:attr:`CostlyCall.kind`)
    among ``plan``'s costly ``calls`` is remade, for the :data:`MAX_COSTLY_KINDS` kinds with
    the most output bytes (one simulated step each). A kind whose outputs are never saved
    for backward, or whose remake keeps its larger inputs alive, saves nothing."""
    kinds = _by_kind(calls)
    largest = sorted(kinds, key=lambda kind: -sum(c.output_bytes for c in kinds[kind]))[:MAX_COSTLY_KINDS]
    plain = simulate_remade(profiled, plan)
    if plain is None:
        return {}
    worth = {}
    for kind in largest:
        remade = simulate_remade(profiled, plan, tuple(c.index for c in kinds[kind]))
        if remade is not None and remade.recompute_flops > plain.recompute_flops:
            saved = plain.predicted_peak_bytes - remade.predicted_peak_bytes
            worth[kind] = saved / (remade.recompute_flops - plain.recompute_flops)
    return worth


def _by_kind(calls: list[CostlyCall]) -> dict[tuple, list[CostlyCall]]:
    """``calls`` grouped by :attr:`CostlyCall.kind`, each kind in forward order."""
    kinds: dict[tuple, list[CostlyCall]] = {}
    for call in calls:
        kinds.setdefault(call.kind, []).append(call)
    return kinds


def _fits(plan: Plan | None, budget_bytes: int) -> bool:
    return plan is not None and plan.predicted_peak_bytes <= budget_bytes


def _least_fitting(
    candidate: Callable[[int], Plan | None], low: int, high: int, budget_bytes: int
) -> tuple[int, Plan] | None:
    """The least ``i`` in ``[low, high)`` whose plan ``candidate(i)`` fits the budget, with that
    plan, found by bisection (the peaks fall as ``i`` grows); or None."""
    best = None
    while low < high:
        middle = (low + high) // 2
        plan = candidate(middle)
        if _fits(plan, budget_bytes):
            best, high = (middle, plan), middle
        else:
            low = middle + 1
    return best
