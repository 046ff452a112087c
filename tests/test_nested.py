"""Nested checkpoints: the exact cost model, the grid dynamic program, the executor.

The program is checked against every nested plan of small random chains
(their sizes are multiples of 1 KiB, so a 1 KiB grid is exact); the cost
model against measured peaks of the sequential test models; the executor for
exact gradients and BatchNorm statistics; ``remat.optimize`` end to end.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

import remat
from remat.tools import models
from chain_helpers import all_plans, nested_plans
from grad_helpers import assert_grads_equal, step_grads
from remat.execute.sequential import CheckpointedSequential
from remat.measure.step import measure_step
from remat.chain.cost import peak_of, recompute_flops_of
from remat.chain.model import Chain
from remat.solvers.checkpoints import min_peak, min_recompute
from remat.solvers.nested import min_peak_nested, min_recompute_nested
from remat.chain.random import random_chain
from test_chain_measured import MODELS, model


def every_plan(chain: Chain) -> list[tuple[int, int]]:
    """(peak, recompute) of every plan, nested or not."""
    plans = [(cps, ()) for cps in all_plans(chain.n)] + list(nested_plans(chain.n))
    return [(peak_of(chain, c, inner=i), recompute_flops_of(chain, c, inner=i)) for c, i in plans]


@pytest.mark.parametrize("seed", range(40))
def test_least_recompute_equals_brute_force_at_every_peak(seed):
    chain = random_chain(3 + seed % 4, seed=seed)
    costs = every_plan(chain)
    peaks = sorted({p for p, _ in costs})
    for budget in peaks:
        limit = budget - chain.base_bytes
        found = min_recompute_nested(chain, budget, slots=limit // 1024)  # a grid step of 1 KiB: exact
        assert found is not None and found.peak_bytes <= budget
        assert found.recompute_flops == min(f for p, f in costs if p <= budget)
        assert found.peak_bytes == peak_of(chain, found.checkpoints, inner=found.inner)
    below = peaks[0] - 1024
    assert min_recompute_nested(chain, below, slots=(below - chain.base_bytes) // 1024) is None


@pytest.mark.parametrize("seed", range(10))
def test_nesting_never_does_worse_than_single_recompute(seed):
    chain = random_chain(40, seed=seed)
    forward = int(chain.fwd_flops[:-1].sum())
    single = min_peak(chain)
    nested = min_peak_nested(chain, max_recompute_flops=forward)
    assert nested.peak_bytes <= single.peak_bytes and nested.recompute_flops <= forward
    budget = (single.peak_bytes + peak_of(chain, [])) // 2
    assert min_recompute_nested(chain, budget).recompute_flops <= min_recompute(chain, budget).recompute_flops


def test_nesting_lowers_the_peak_of_a_long_uniform_chain():
    n = 60  # equal stages that save their input: the sqrt(n) bound of one level is beaten by two
    chain = Chain.from_arrays(
        act_bytes=[4096] * (n + 1), grad_bytes=[0] + [4096] * n, fwd_nosave_peak=[4096] * n,
        fwd_save_peak=[4096] * n, saved_bytes=[0] * n, saves_input=[True] * n, saves_output=[False] * n,
        bwd_peak=[8192] * n, param_grad_bytes=[0] * n, fwd_flops=[100] * n, bwd_flops=[200] * n,
    )
    single = min_peak(chain)
    nested = min_peak_nested(chain, max_recompute_flops=2 * int(chain.fwd_flops.sum()))
    assert nested.inner and nested.peak_bytes < single.peak_bytes
    assert single.recompute_flops < nested.recompute_flops <= 2 * int(chain.fwd_flops.sum())


@pytest.mark.parametrize("inner, message", [
    (((0, 3, (3,)),), "inside it"),
    (((0, 3, (2, 1)),), "sorted"),
    (((3, 5, (4,)),), "not recomputed segments"),  # (3, 5] is the last segment, run normally
    (((0, 3, (1,)), (1, 3, (2,))), "not recomputed segments"),  # (1, 3] runs normally inside (0, 3]
])
def test_bad_nested_checkpoints_are_refused(inner, message):
    chain = random_chain(5, seed=0)
    with pytest.raises(ValueError, match=message):
        peak_of(chain, (3,), inner=inner)


def test_nested_checkpoints_are_refused_with_offload_or_cuts_inside_blocks():
    with pytest.raises(ValueError, match="without stored or selective segments and without offload"):
        peak_of(random_chain(6, seed=0), (3, 5), stored=(0,), inner=((3, 5, (4,)),))
    carried = next(c for s in range(50) if (c := random_chain(8, seed=s, carried=True)).carries)
    with pytest.raises(ValueError, match="single-tensor boundaries"):
        min_peak_nested(carried, 10**12)


@pytest.mark.parametrize("name", MODELS)
def test_nested_peak_of_bounds_the_measured_peak(name):
    """Exact for most plans; never below. Above only where the input of a segment's last
    part is held by its first stage alone, which frees it part-way through its backward."""
    net, x, prof = model(name)
    plans = list(nested_plans(prof.chain.n))
    random.Random(0).shuffle(plans)
    exact = 0
    for cps, inner in plans[:24]:
        measured = measure_step(CheckpointedSequential(list(net), cps, prof.stage_pieces, inner=inner), x).peak_bytes
        predicted = peak_of(prof.chain, cps, inner=inner)
        assert measured <= predicted <= measured * 1.04, (cps, inner)
        exact += predicted == measured
    assert exact >= 8


@pytest.mark.parametrize("name", ["vgg_bn", "resnet"])
def test_nested_gradients_and_running_stats_equal_the_plain_model(name):
    net, x, prof = model(name)
    n = prof.chain.n
    cps, inner = (n - 2,), ((0, n - 2, (2, n - 3)), (0, 2, (1,)))
    torch.manual_seed(1)
    plain = copy.deepcopy(net)
    plain(x).float().pow(2).mean().backward()
    ours = copy.deepcopy(net)
    CheckpointedSequential(list(ours), cps, prof.stage_pieces, inner=inner)(x).float().pow(2).mean().backward()
    for (key, p), q in zip(plain.named_parameters(), ours.parameters()):
        assert torch.equal(p.grad, q.grad), key
    for (key, b), c in zip(plain.named_buffers(), ours.buffers()):
        assert torch.equal(b, c), key  # BatchNorm statistics updated once, identically


def deep_net() -> tuple[nn.Module, torch.Tensor]:
    """Many equal blocks with BatchNorm and dropout: nesting lowers its least peak."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Tanh(), nn.Dropout(0.1)) for _ in range(16)]
    return nn.Sequential(*blocks, nn.Linear(64, 4)), torch.randn(128, 64)


def test_optimize_uses_nested_checkpoints_with_exact_gradients_and_prediction(tmp_path):
    net, x = deep_net()
    fast = remat.optimize(net, x)
    plan = fast.plan
    assert plan.inner, "a long chain of equal blocks gains from nesting"
    assert plan.recompute_flops <= plan.forward_flops
    measured = measure_step(fast, x, fake=True).peak_bytes
    assert measured <= plan.predicted_peak_bytes <= measured * 1.01
    assert "nested checkpoints" in plan.summary() and "nested in recomputes" in repr(fast)
    expected = step_grads(copy.deepcopy(net), (x,), seed=3)
    assert_grads_equal(expected, step_grads(remat.optimize(copy.deepcopy(net), x), (x,), seed=3))
    path = tmp_path / "plan.json"
    plan.save(path)
    again = remat.optimize(net, x, plan=remat.Plan.load(path))
    assert again.plan == plan and again.nested == fast.nested
    assert measure_step(again, x, fake=True).peak_bytes == measured


def test_nested_plan_of_a_residual_network_is_predicted_exactly():
    """Pieces read tuples of earlier outputs; a nested recompute must drop each one after
    its last reader (a dict the caller still held kept an inner checkpoint's output)."""
    source = models.load("remat:preact_resnet?depth=29", 4)
    fast = remat.optimize(source.model, source.example_inputs)
    assert fast.plan.inner
    assert fast.plan.predicted_peak_bytes == measure_step(fast, source.example_inputs, fake=True).peak_bytes


def test_op_level_simulation_of_nested_plans_equals_peak_of():
    """The op-level schedule of a nested plan (lab.opgraph, the ILP's model) costs
    what the chain model says, peak and recomputed FLOPs."""
    from lab.opgraph import OpGraph, chain_schedule, simulate, to_chain

    checked = 0
    for seed in range(12):
        graph = OpGraph.random_chain(6 + seed % 4, seed)
        chain = to_chain(graph)
        plans = list(nested_plans(chain.n))
        random.Random(seed).shuffle(plans)
        for cps, inner in plans[:15]:
            cost = simulate(graph, chain_schedule(graph, cps, inner=inner))
            assert cost.peak_bytes == peak_of(chain, cps, inner=inner), (seed, cps, inner)
            assert cost.recompute_flops == recompute_flops_of(chain, cps, inner=inner)
            checked += 1
    assert checked >= 100


@pytest.mark.parametrize("seed", range(6))
def test_largest_retained_bounds_every_plan_that_cuts_only_at_the_bounds(seed):
    """What remat.plan uses to skip profiling the single-tensor chain when no plan of it can win."""
    from remat.chain.cost import largest_retained

    chain = random_chain(7, seed=seed)
    bounds = [0, *sorted(random.Random(seed).sample(range(1, 7), 3)), 7]
    bound = chain.base_bytes + largest_retained(chain, bounds)
    plans = [(c, ()) for c in all_plans(chain.n)] + list(nested_plans(chain.n))
    allowed = set(bounds)
    for cps, inner in plans:
        if set(cps) <= allowed and all(set(cs) <= allowed for _, _, cs in inner):
            assert peak_of(chain, cps, inner=inner) >= bound, (cps, inner)
