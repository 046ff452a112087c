"""Stored middle segments (``min_recompute(..., store=True)``) against brute force (pure: no torch).

``peak_of`` with ``stored`` is checked against an independent step-by-step
simulation in ``tests/test_ilp.py`` (op chains reduced to chains); here the
Pareto-set solver is checked against every plan of random chains.
"""

from __future__ import annotations

import pytest

from remat.chain.cost import peak_of, recompute_flops_of
from remat.chain.model import Chain
from remat.solvers.baselines import store_all
from remat.solvers.checkpoints import min_peak, min_recompute, pareto_front
from remat.chain.random import random_chain
from chain_helpers import plans_with_selective, plans_with_stored


def budgets(chain: Chain, peaks: list[int]) -> list[int]:
    low, high = min(peaks), store_all(chain).peak_bytes
    return sorted({low - 1, low, (3 * low + high) // 4, (low + high) // 2, high, *peaks[:: max(1, len(peaks) // 4)]})


def assert_least_recompute_found(chain: Chain, plans) -> int:
    """At several budgets, ``min_recompute(..., store=True)`` finds the least recompute of
    ``plans`` ((checkpoints, stored starts, selective starts) each), never more than the plain
    family; returns how many of its plans run segments selectively."""
    costs = [(peak_of(chain, c, s, selective=v), recompute_flops_of(chain, c, s, selective=v)) for c, s, v in plans]
    chosen = 0
    for budget in budgets(chain, [p for p, _ in costs]):
        best = min((flops for peak, flops in costs if peak <= budget), default=None)
        found = min_recompute(chain, budget, store=True)
        if best is None:
            assert found is None, budget
            continue
        assert found.recompute_flops == best, budget
        assert found.peak_bytes == peak_of(chain, found.checkpoints, found.stored, selective=found.selective) <= budget
        plain = min_recompute(chain, budget)
        assert plain is None or found.recompute_flops <= plain.recompute_flops
        chosen += bool(found.selective)
    return chosen


def test_store_solver_finds_the_least_recompute_of_every_plan():
    """150 random chains of 1..8 stages, at several budgets each."""
    for seed in range(150):
        chain = random_chain(1 + seed % 8, seed)
        assert_least_recompute_found(chain, [(c, s, ()) for c, s in plans_with_stored(chain.n)])


def test_selective_segments_are_planned_where_they_recompute_least():
    """120 random chains of 1..6 stages with selective costs: the least recompute of every
    plan whose stored and last segments may run selectively."""
    chosen = 0
    for seed in range(120):
        chain = random_chain(1 + seed % 6, seed, selective=True)
        chosen += assert_least_recompute_found(chain, list(plans_with_selective(chain.n)))
    assert chosen > 50  # the random chains make selective segments worth it often


def test_selective_costs_change_only_the_segments_that_run_so():
    chain = random_chain(8, seed=5, selective=True)
    plain = random_chain(8, seed=5)
    assert peak_of(chain, [2, 5]) == peak_of(plain, [2, 5])
    assert peak_of(chain, [2, 5, 7], stored=[2]) == peak_of(plain, [2, 5, 7], stored=[2])
    # with no recomputed segment, every stage runs selectively
    assert peak_of(chain, [], selective=[0]) == peak_of(chain.selective_view(), [])
    with pytest.raises(ValueError, match="neither stored segments"):
        peak_of(chain, [2, 5], selective=[2])
    with pytest.raises(ValueError, match="no selective costs"):
        peak_of(plain, [2, 5], selective=[5])


def test_store_front_reaches_the_same_least_peak_and_dominates():
    for seed in range(30):
        chain = random_chain(12, seed)
        rich, plain = pareto_front(chain, store=True), pareto_front(chain)
        assert rich[-1].peak_bytes == plain[-1].peak_bytes == min_peak(chain).peak_bytes
        for plan in plain:
            better = min_recompute(chain, plan.peak_bytes, store=True)
            assert better.recompute_flops <= plan.recompute_flops


def test_without_stored_segments_nothing_changes():
    chain = random_chain(10, seed=4)
    assert peak_of(chain, [3, 7], stored=()) == peak_of(chain, [3, 7])
    assert recompute_flops_of(chain, [3, 7]) == int(chain.fwd_flops[:7].sum())
    # a stored first segment (0, 3]: only (3, 7] is recomputed
    assert recompute_flops_of(chain, [3, 7], stored=[0]) == int(chain.fwd_flops[3:7].sum())


@pytest.mark.parametrize(
    "checkpoints, stored, message",
    [
        ([3, 7], [7], "must be 0 or a checkpoint before the last"),
        ([3, 7], [5], "must be 0 or a checkpoint before the last"),
        ([3, 7], [0, 3], "adjacent"),
        ([3, 7], [3], "adjacent"),
    ],
)
def test_bad_stored_segments_are_rejected_clearly(checkpoints, stored, message):
    with pytest.raises(ValueError, match=message):
        peak_of(random_chain(10, seed=4), checkpoints, stored)


def test_a_last_stage_stranding_other_tensors_selectively_keeps_the_last_segment_plain():
    """Outputs the loss ignores keep what stage n-1 saved for them to the end of the step, which
    every other segment's costs count: the last segment runs selectively only if that is the same."""
    import dataclasses

    chain = dataclasses.replace(random_chain(6, seed=2, selective=True), stranded_bytes=512, selective_stranded_bytes=64)
    assert not chain.selective_last
    with pytest.raises(ValueError, match="last segment cannot run selectively"):
        peak_of(chain, [2], selective=[2])
    for budget in range(min_peak(chain).peak_bytes, store_all(chain).peak_bytes + 1, 4096):
        found = min_recompute(chain, budget, store=True)
        last = found.checkpoints[-1] if found.checkpoints else 0
        assert last not in found.selective


def test_the_least_peak_with_selective_segments_is_the_least_of_every_plan():
    """Stored and selective segments may lower the least peak (a stored segment holds its
    saved tensors but has no recompute phase, which holds the gradients too): min_peak with
    ``store=True`` finds the least (peak, recompute) of every plan of 80 random chains."""
    lower = 0
    for seed in range(80):
        chain = random_chain(1 + seed % 6, seed, selective=True)
        best = min(
            (peak_of(chain, c, s, selective=v), recompute_flops_of(chain, c, s, selective=v))
            for c, s, v in plans_with_selective(chain.n)
        )
        found = min_peak(chain, store=True)
        assert (found.peak_bytes, found.recompute_flops) == best, seed
        assert found.peak_bytes == peak_of(chain, found.checkpoints, found.stored, selective=found.selective)
        lower += found.peak_bytes < min_peak(chain).peak_bytes
    assert lower > 0
