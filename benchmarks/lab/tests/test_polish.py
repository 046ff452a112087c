"""Local search over value schedules (lab.polish) against the simulator and the program it polishes."""

from __future__ import annotations

import itertools

import pytest

from remat.solvers.checkpoints import pareto_front
from lab.opgraph import OpGraph, schedule_of_steps, simulate, to_chain
from lab.polish import _changes, _Scorer, polish
from lab.values import least_recompute_front, min_recompute_values


@pytest.mark.parametrize("seed", range(3))
def test_the_search_scores_every_change_as_simulate_measures_it(seed):
    graph = OpGraph.random_dag(12 + seed, seed)
    score = _Scorer(graph)
    for plan in least_recompute_front(graph)[::2]:
        steps = [(step.op, step.backward) for step in plan.schedule.steps]
        assert score(steps) == (plan.recompute_flops, plan.peak_bytes)
        for changed in itertools.islice(_changes(graph, steps), 0, None, 7):
            cost = simulate(graph, schedule_of_steps(graph, changed))
            assert score(changed) == (cost.recompute_flops, cost.peak_bytes)


@pytest.mark.parametrize("seed", range(6))
def test_polished_schedules_fit_and_never_recompute_more(seed):
    graph = OpGraph.random_dag(10 + 2 * seed, seed)
    front = least_recompute_front(graph)
    budgets = sorted({p.peak_bytes for p in pareto_front(to_chain(graph), store=True)})
    for budget in budgets[:: max(1, len(budgets) // 3)]:
        start = min((p for p in front if p.peak_bytes <= budget), key=lambda p: p.recompute_flops, default=None)
        if start is None:
            continue
        descended = polish(graph, start.schedule, budget, patience=0)
        best = min_recompute_values(graph, budget, front, patience=20)  # descends from it and others, then kicks
        for plan in (descended, best):
            cost = simulate(graph, plan.schedule)
            assert (cost.peak_bytes, cost.recompute_flops) == (plan.peak_bytes, plan.recompute_flops)
            assert plan.peak_bytes <= budget
        assert best.recompute_flops <= descended.recompute_flops <= start.recompute_flops


def test_remakes_two_cheap_values_where_the_program_remakes_one_costly_one():
    # DAG seed 8 (18 ops): the program remakes x8 (336 KFLOP) for B9; the ILP's optimum keeps x8
    # and remakes x7 (38 KFLOP) for B8 and x0 (18 KFLOP) for B1, which the search reaches by
    # dropping F8 for F7, then remaking x0.
    graph = OpGraph.random_dag(18, seed=8)
    budget = pareto_front(to_chain(graph), store=True)[2].peak_bytes  # 183,304 bytes
    start = min((p for p in least_recompute_front(graph) if p.peak_bytes <= budget), key=lambda p: p.recompute_flops)
    plan = polish(graph, start.schedule, budget)
    remade = lambda p: sorted(s.op for s in p.schedule.steps[graph.n :] if not s.backward)  # noqa: E731
    assert (start.recompute_flops, remade(start)) == (344_064, [8])
    assert (plan.recompute_flops, remade(plan)) == (57_344, [0, 7])


def test_a_schedule_over_the_budget_is_refused():
    graph = OpGraph.random_dag(12, seed=0)
    plan = least_recompute_front(graph)[0]
    with pytest.raises(ValueError, match="above the budget"):
        polish(graph, plan.schedule, plan.peak_bytes - 1)


def test_kicks_reach_a_schedule_several_changes_away():
    # DAG seed 5 (15 ops) at its least store-front peak: the start remakes ops 1 to 4 for B5 and
    # no single change from there fits and recomputes less; the ILP's optimum (2,869,248 FLOPs)
    # keeps x2 and remakes ops 0, 3, 4, 5 and 8 for B9.
    graph = OpGraph.random_dag(15, seed=5)
    budget = pareto_front(to_chain(graph), store=True)[-1].peak_bytes  # 155,656 bytes
    start = min((p for p in least_recompute_front(graph) if p.peak_bytes <= budget), key=lambda p: p.recompute_flops)
    remade = lambda p: sorted(s.op for s in p.schedule.steps[graph.n :] if not s.backward)  # noqa: E731
    descended = polish(graph, start.schedule, budget, patience=0)
    assert (descended.recompute_flops, remade(descended)) == (3_006_464, [1, 2, 3, 4, 8, 10])
    kicked = polish(graph, start.schedule, budget)
    assert kicked.peak_bytes <= budget
    assert (kicked.recompute_flops, remade(kicked)) == (2_869_248, [0, 3, 4, 5, 8, 10])
    assert polish(graph, start.schedule, budget).schedule == kicked.schedule  # seeded draws
