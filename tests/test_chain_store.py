"""Stored middle segments (``min_recompute(..., store=True)``) against brute force (pure: no torch).

``peak_of`` with ``stored`` is checked against an independent step-by-step
simulation in ``tests/test_ilp.py`` (op chains reduced to chains); here the
Pareto-set solver is checked against every plan of random chains.
"""

from __future__ import annotations

import pytest

from remat.solvers.chain import Chain, min_peak, min_recompute, pareto_front, peak_of, recompute_flops_of, store_all
from chain_helpers import plans_with_stored


def budgets(chain: Chain, peaks: list[int]) -> list[int]:
    low, high = min(peaks), store_all(chain).peak_bytes
    return sorted({low - 1, low, (3 * low + high) // 4, (low + high) // 2, high, *peaks[:: max(1, len(peaks) // 4)]})


def test_store_solver_finds_the_least_recompute_of_every_plan():
    """150 random chains of 1..8 stages, at several budgets each."""
    for seed in range(150):
        chain = Chain.random(1 + seed % 8, seed)
        plans = [(peak_of(chain, c, s), recompute_flops_of(chain, c, s)) for c, s in plans_with_stored(chain.n)]
        for budget in budgets(chain, [p for p, _ in plans]):
            best = min((flops for peak, flops in plans if peak <= budget), default=None)
            found = min_recompute(chain, budget, store=True)
            if best is None:
                assert found is None, (seed, budget)
                continue
            assert found.recompute_flops == best, (seed, budget)
            assert found.peak_bytes == peak_of(chain, found.checkpoints, found.stored) <= budget
            # never worse than the plain family, and the same least peak
            plain = min_recompute(chain, budget)
            assert plain is None or found.recompute_flops <= plain.recompute_flops


def test_store_front_reaches_the_same_least_peak_and_dominates():
    for seed in range(30):
        chain = Chain.random(12, seed)
        rich, plain = pareto_front(chain, store=True), pareto_front(chain)
        assert rich[-1].peak_bytes == plain[-1].peak_bytes == min_peak(chain).peak_bytes
        for plan in plain:
            better = min_recompute(chain, plan.peak_bytes, store=True)
            assert better.recompute_flops <= plan.recompute_flops


def test_without_stored_segments_nothing_changes():
    chain = Chain.random(10, seed=4)
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
        peak_of(Chain.random(10, seed=4), checkpoints, stored)
