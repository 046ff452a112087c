"""The op-graph model, its reduction to a chain, and the exact ILP reference (pure: no torch).

Three independent pieces are checked against each other: the step-by-step
simulator (``opgraph.simulate``), the chain cost model (``chain.peak_of`` on
``opgraph.to_chain``) and the integer program (``ilp.min_recompute_ilp``).
"""

from __future__ import annotations

import itertools
import random

import pytest

from chain_helpers import plans_with_stored

from remat.chain.cost import peak_of, recompute_flops_of
from remat.solvers.checkpoints import min_recompute, pareto_front
from lab.opgraph import (
    OpGraph,
    Schedule,
    Step,
    stages,
    chain_schedule,
    linear_cuts,
    simulate,
    to_chain,
)

KiB = 1024


def input_freed_inside_backward(graph: OpGraph) -> bool:
    """A stage whose input is saved, but not by its first op. Where nothing else holds
    that input (the stage before saves nothing for it: it is stored and does not save
    its output, or it was run without saving), autograd frees it part-way through the
    stage's backward, which ``bwd_peak`` (measured with the input held) does not see:
    ``peak_of`` is then an upper bound."""
    for ops in stages(graph):
        source = ops.start - 1
        savers = [v for v in ops if source in graph.saves_inputs[v]]
        if source >= 0 and savers and min(savers) != ops[0]:
            return True
    return False


# -- the simulator ----------------------------------------------------------------


def three_op_chain() -> OpGraph:
    # x -> op0 (4 KiB, saves nothing) -> op1 (8 KiB, saves its input) -> loss (4 B, saves its input).
    return OpGraph(
        out_bytes=(4 * KiB, 8 * KiB, 4),
        flops=(10, 20, 1),
        inputs=((), (0,), (1,)),
        saves_inputs=((), (0,), (1,)),
        saves_output=(False, False, False),
        grad_bytes=(4 * KiB, 8 * KiB, 4),
        param_grad_bytes=(KiB, 2 * KiB, 0),
        base_bytes=KiB,
    )


def test_simulate_store_all_by_hand():
    graph = three_op_chain()
    # F0: 1 + 4 = 5 KiB; F1: 1 + 4 + 8 = 13; F2: 13 KiB + 4 B.
    # B2 (root 4 B, allocates g1 8 KiB): 1 + 4 + 8 + 4B(loss) + 4B(root) + 8 = 21 KiB + 8 B;
    #   then g1 stays, x1 is released.
    # B1 (allocates g0 4 KiB + 2 KiB params): 1 + 4 (x0) + 8 (g1) + 8 B + 6 = 19 KiB + 8 B.
    cost = simulate(graph, chain_schedule(graph, ()))
    assert cost == simulate(graph, Schedule((
        Step(0), Step(1), Step(2), Step(2, True, (1,)), Step(1, True, (0,)), Step(0, True),
    )))
    assert cost.peak_bytes == 21 * KiB + 8
    assert cost.recompute_flops == 0
    assert peak_of(to_chain(graph), ()) == cost.peak_bytes


def test_simulate_recompute_by_hand():
    graph = three_op_chain()
    # Drop x0 after F1 and recompute it just before B1: B2 then sees 21 KiB + 8 B - 4 KiB.
    schedule = Schedule((
        Step(0), Step(1, free=(0,)), Step(2), Step(2, True, (1,)), Step(0), Step(1, True, (0,)), Step(0, True),
    ))
    cost = simulate(graph, schedule)
    assert cost.recompute_flops == 10
    # F0 again: 1 + g1 8 + loss and root 8 B + x0 4 = 13 KiB + 8 B; B1 as before: 19 KiB + 8 B.
    assert cost.peak_bytes == 19 * KiB + 8


@pytest.mark.parametrize(
    "steps, message",
    [
        ((Step(1),), r"inputs \[0\] are not in memory"),
        ((Step(0), Step(1), Step(2), Step(1, True)), "expected B2"),
        ((Step(0), Step(1, free=(0,)), Step(2), Step(2, True), Step(1, True)), r"saved values \[0\]"),
        ((Step(0), Step(1), Step(2, free=(2,))), "releases the loss"),
        ((Step(0), Step(0)), "already in memory"),
        ((Step(0), Step(1), Step(2)), "stops before B2"),
    ],
)
def test_simulate_rejects_invalid_schedules(steps, message):
    with pytest.raises(ValueError, match=message):
        simulate(three_op_chain(), Schedule(steps))


def test_op_graph_rejects_bad_structure():
    good = three_op_chain()
    with pytest.raises(ValueError, match="distinct earlier ops"):
        OpGraph(**{**good.__dict__, "inputs": ((), (1,), (1,))})
    with pytest.raises(ValueError, match="not all its inputs"):
        OpGraph(**{**good.__dict__, "saves_inputs": ((), (0,), (0,))})
    with pytest.raises(ValueError, match=r"ops \[0\] feed nothing"):
        OpGraph(**{**good.__dict__, "inputs": ((), (), (1,)), "saves_inputs": ((), (), (1,))})


def test_cuts_of_a_residual_block():
    # 0 -> 1 -> 2 -> add(2, 0) -> 4 -> loss: only 0, 3 and 4 carry one live value.
    graph = OpGraph.random_chain(6, seed=0)
    graph = OpGraph(**{**graph.__dict__, "inputs": ((), (0,), (1,), (2, 0), (3,), (4,)),
                       "saves_inputs": ((), (), (), (), (), ())})
    assert linear_cuts(graph) == [0, 3, 4]
    assert to_chain(graph).n == 4


# -- the reduction: peak_of on the derived chain against the simulator ---------------


def test_chain_peaks_equal_simulated_peaks_on_op_chains():
    """Every plan, stored segments included, of 80 random op chains (n = 2..8)."""
    for seed in range(80):
        graph = OpGraph.random_chain(2 + seed % 7, seed)
        chain = to_chain(graph)
        for cps, stored in plans_with_stored(chain.n):
            cost = simulate(graph, chain_schedule(graph, cps, stored))
            assert peak_of(chain, cps, stored) == cost.peak_bytes, (seed, cps, stored)
            assert recompute_flops_of(chain, cps, stored) == cost.recompute_flops


def test_chain_peaks_bound_simulated_peaks_on_dags():
    """Random DAGs: equal, but for stages whose input their backward frees part-way."""
    rng = random.Random(0)
    exact = flagged = 0
    for seed in range(150):
        graph = OpGraph.random_dag(6 + seed % 20, seed)
        chain = to_chain(graph)
        plans = list(itertools.islice(plans_with_stored(chain.n), 2000))
        for cps, stored in rng.sample(plans, min(20, len(plans))):
            predicted = peak_of(chain, cps, stored)
            cost = simulate(graph, chain_schedule(graph, cps, stored))
            assert cost.recompute_flops == recompute_flops_of(chain, cps, stored)
            if input_freed_inside_backward(graph):
                flagged += 1
                assert predicted >= cost.peak_bytes, (seed, cps, stored)
            else:
                exact += 1
                assert predicted == cost.peak_bytes, (seed, cps, stored)
    assert exact > 0 and flagged > 0  # both kinds were exercised


# -- the ILP --------------------------------------------------------------------------

highspy = pytest.importorskip("highspy")
from lab.ilp import min_recompute_ilp  # noqa: E402


def check_against_remat(graph: OpGraph, time_limit_s: float, budgets_per_graph: int, require_optimal: bool):
    """At budgets along remat's front: the ILP's plan fits, is at least as good, and is what it says."""
    chain = to_chain(graph)
    front = pareto_front(chain, store=True)
    picks = sorted({0, len(front) // 2, len(front) - 1})[:budgets_per_graph]
    gaps = []
    for plan in (front[i] for i in picks):
        budget = plan.peak_bytes
        result = min_recompute_ilp(graph, budget, time_limit_s=time_limit_s)
        assert result.status in (("optimal",) if require_optimal else ("optimal", "time_limit")), result
        assert result.bound_flops <= plan.recompute_flops
        if result.schedule is not None:
            assert result.peak_bytes <= budget
            assert simulate(graph, result.schedule).recompute_flops == result.recompute_flops
        if result.status == "optimal":
            assert result.recompute_flops <= plan.recompute_flops <= min_recompute(chain, budget).recompute_flops
            gaps.append(plan.recompute_flops - result.recompute_flops)
    return gaps


def test_ilp_needs_nothing_at_store_all_and_nothing_fits_below_the_weights():
    graph = OpGraph.random_dag(10, seed=3)
    store_all = simulate(graph, chain_schedule(graph, ())).peak_bytes
    result = min_recompute_ilp(graph, store_all, time_limit_s=30)
    assert (result.status, result.recompute_flops) == ("optimal", 0)
    assert min_recompute_ilp(graph, graph.base_bytes, time_limit_s=30).status == "infeasible"


def test_ilp_finds_the_hand_made_recompute():
    # At 19 KiB + 8 B, storing all (21 KiB + 8 B) does not fit; dropping x0 and
    # recomputing it (10 FLOPs) does; recomputing op0 is the cheapest there is.
    graph = three_op_chain()
    result = min_recompute_ilp(graph, 19 * KiB + 8, time_limit_s=30)
    assert (result.status, result.recompute_flops) == ("optimal", 10)
    # B1 alone needs 19 KiB + 8 B (x0, g1, and the 6 KiB it allocates), whatever the plan.
    assert min_recompute_ilp(graph, 19 * KiB + 7, time_limit_s=30).status == "infeasible"


@pytest.mark.parametrize("kind", ["chain", "dag"])
def test_ilp_is_a_lower_bound_for_remat_on_small_graphs(kind):
    for seed in range(6):
        graph = OpGraph.random_chain(8, seed) if kind == "chain" else OpGraph.random_dag(10, seed)
        check_against_remat(graph, time_limit_s=30, budgets_per_graph=2, require_optimal=True)


@pytest.mark.heavy
@pytest.mark.parametrize("kind", ["chain", "dag"])
def test_ilp_is_a_lower_bound_for_remat_up_to_40_ops(kind):
    """30 graphs of each kind, 10..39 ops (about 15 minutes each; the gaps are in benchmarks/optimality_gap.py)."""
    for seed in range(30):
        n = 10 + seed
        graph = OpGraph.random_chain(n, seed) if kind == "chain" else OpGraph.random_dag(n, seed)
        check_against_remat(graph, time_limit_s=20, budgets_per_graph=2, require_optimal=False)
