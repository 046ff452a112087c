"""The value-level program (lab.values) against the simulator, remat's chain solvers and the ILP."""

from __future__ import annotations

import pytest

from test_ilp import KiB, three_op_chain

from remat.solvers.checkpoints import min_recompute, pareto_front
from lab.opgraph import OpGraph, chain_schedule, simulate, stages, to_chain
from lab.values import MAX_OPS, _Parts, _plan, least_recompute_front, min_recompute_values


def front_budgets(graph: OpGraph) -> list[int]:
    """Peaks along remat's own front: store all, the middle, its least peak."""
    front = pareto_front(to_chain(graph), store=True)
    return sorted({front[i].peak_bytes for i in (0, len(front) // 2, len(front) - 1)})


@pytest.mark.parametrize("seed", range(8))
def test_front_is_what_simulate_measures_and_strictly_trades_memory_for_flops(seed):
    graph = OpGraph.random_chain(6 + seed, seed)
    front = least_recompute_front(graph)
    for plan in front:
        cost = simulate(graph, plan.schedule)
        assert (cost.peak_bytes, cost.recompute_flops) == (plan.peak_bytes, plan.recompute_flops)
    assert front[0].recompute_flops == 0
    assert front[0].peak_bytes <= simulate(graph, chain_schedule(graph, ())).peak_bytes
    for before, after in zip(front, front[1:]):
        assert after.peak_bytes < before.peak_bytes and after.recompute_flops > before.recompute_flops


@pytest.mark.parametrize("seed", range(10))
def test_never_worse_than_the_chain_solvers_and_never_over_budget(seed):
    graph = OpGraph.random_chain(8 + seed, seed)
    chain = to_chain(graph)
    for budget in front_budgets(graph):
        plan = min_recompute_values(graph, budget, patience=0)  # kicks only lower it further
        assert plan.peak_bytes <= budget
        assert plan.recompute_flops <= min_recompute(chain, budget, store=True).recompute_flops
    least = least_recompute_front(graph)[-1]
    assert min_recompute_values(graph, least.peak_bytes - 1) is None


def test_the_hand_made_recompute():
    # test_ilp's three-op chain: at 19 KiB + 8 B, drop x0 and remake it for B1 (10 FLOPs).
    graph = three_op_chain()
    plan = min_recompute_values(graph, 19 * KiB + 8)
    assert (plan.peak_bytes, plan.recompute_flops) == (19 * KiB + 8, 10)
    assert min_recompute_values(graph, 19 * KiB + 7) is None


def test_drops_a_value_the_next_op_saves_and_remakes_it_alone():
    # Op 3 saves its input x2 (48 KiB). remat's segments keep x2 with op 3 or recompute
    # ops 0..2 (696,320 FLOPs); remaking x2 from x1 just before B3 costs op 2 alone.
    graph = OpGraph.random_chain(11, seed=1)
    budget = front_budgets(graph)[1]
    assert min_recompute(to_chain(graph), budget, store=True).recompute_flops == 696_320
    plan = min_recompute_values(graph, budget)
    assert plan.recompute_flops == graph.flops[2] == 294_912
    remade = [step.op for step in plan.schedule.steps[graph.n:] if not step.backward]
    assert remade == [2]


def test_rejects_graphs_it_cannot_plan():
    with pytest.raises(ValueError, match=f"up to {MAX_OPS} ops or {MAX_OPS} stages"):
        least_recompute_front(OpGraph.random_chain(MAX_OPS + 1, seed=0))


@pytest.mark.parametrize("seed", range(8))
def test_dag_schedules_are_what_simulate_measures_and_beat_whole_segments(seed):
    graph = OpGraph.random_dag(10 + 2 * seed, seed)
    chain = to_chain(graph)
    front = least_recompute_front(graph)
    for plan in front:
        cost = simulate(graph, plan.schedule)
        assert (cost.peak_bytes, cost.recompute_flops) == (plan.peak_bytes, plan.recompute_flops)
    assert front[0].recompute_flops == 0
    for budget in front_budgets(graph):
        plan = min_recompute_values(graph, budget, patience=0)  # kicks only lower it further
        if plan is not None:
            assert plan.peak_bytes <= budget
            assert plan.recompute_flops <= min_recompute(chain, budget).recompute_flops


def test_drops_a_value_inside_a_residual_block_and_remakes_it_alone():
    # DAG seed 1: op 3 (in the block 1 -> 2 -> 3 -> 4 = join(3, 0)) saves x2 (32 KiB). Recomputing
    # the block's segment, or keeping it whole, costs 1,472,512 FLOPs at this budget; the ILP drops
    # x2 and remakes it from x1 just before B3, and x0 before B1: op 2 and op 0 again.
    graph = OpGraph.random_dag(11, seed=1)
    budget = front_budgets(graph)[1]
    assert min_recompute(to_chain(graph), budget, store=True).recompute_flops == 1_472_512
    plan = min_recompute_values(graph, budget)
    assert plan.recompute_flops == graph.flops[2] + graph.flops[0] == 239_616


def test_values_charged_against_those_held_below_find_what_full_counts_miss():
    # DAG seed 13: the ILP keeps the two small branch outputs x3 and x6 of the block 1..7 and
    # remakes its join x7 from them (3,497,984 FLOPs). Counting each held value in full (ops:
    # 10,620,928) or stage by stage (6,305,792), the program sees no room for that; charging
    # each only for what it adds to the values held below it, it comes within 1.2% of a forward,
    # and polishing that schedule (lab.polish) reaches the ILP's optimum.
    graph = OpGraph.random_dag(23, seed=13)
    budget = pareto_front(to_chain(graph), store=True)[1].peak_bytes
    ops = [range(v, v + 1) for v in range(graph.n)]

    def least(units: list[range], charged: bool) -> int:
        parts = _Parts(graph, units, charged)
        return min(p.recompute_flops for p in (_plan(parts, point) for point in parts.front()) if p.peak_bytes <= budget)

    assert (least(ops, False), least(stages(graph), False), least(ops, True)) == (10_620_928, 6_305_792, 3_776_512)
    assert min_recompute_values(graph, budget).recompute_flops == 3_497_984


highspy = pytest.importorskip("highspy")
from lab.ilp import min_recompute_ilp  # noqa: E402


def against_the_ilp(graph: OpGraph, time_limit_s: float):
    """(our least recompute, the ILP's result) at each of :func:`front_budgets`."""
    front = least_recompute_front(graph)
    for budget in front_budgets(graph):
        ours = min_recompute_values(graph, budget, front).recompute_flops
        yield ours, min_recompute_ilp(graph, budget, time_limit_s=time_limit_s)


@pytest.mark.parametrize("seed", range(6))
def test_equals_the_ilp_optimum(seed):
    for ours, exact in against_the_ilp(OpGraph.random_chain(10 + seed, seed), 60):
        assert exact.status == "optimal" and ours == exact.recompute_flops


@pytest.mark.heavy
@pytest.mark.parametrize("seed", range(6, 20))
def test_equals_the_ilp_optimum_up_to_30_ops(seed):
    """Chains of 16..29 ops (up to half an hour; the ILP's time limit may leave it unproven, then it only bounds)."""
    for ours, exact in against_the_ilp(OpGraph.random_chain(10 + seed, seed), 30):
        assert exact.bound_flops <= ours
        if exact.status == "optimal":
            assert ours == exact.recompute_flops


@pytest.mark.parametrize("seed", range(4))
def test_dags_reach_the_ilp_optimum(seed):
    # The program alone was 1.1% of a forward above it at seed 2; polished, equal at all four.
    graph = OpGraph.random_dag(10 + seed, seed)
    for ours, exact in against_the_ilp(graph, 60):
        assert exact.status == "optimal" and ours == exact.recompute_flops
