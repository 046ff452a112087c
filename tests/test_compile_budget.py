"""The torch-budget strategy (torch.compile's min-cut partitioner under activation_memory_budget)
really recomputes, measures the same on fake and real tensors, refuses to run eagerly, and is
beaten or matched by remat's budget plans on a small model. Standard sizes: benchmarks/compile_budget.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import remat
from remat import InfeasibleBudget, measure_step
from remat.tools import models
from remat.tools.strategies import TorchBudgetModule, TorchBudgetSearch, compare, parse_strategies, strategy

MODEL = "remat:chain?depth=16&width=64"  # a heterogeneous Sequential: linears, norms, dropout, activations
BATCH = 256
MLP = "remat:mlp?depth=8&width=128"  # Linear + ReLU: every recompute is a matmul


@pytest.fixture(scope="module")
def source():
    return models.load(MODEL, BATCH)


@pytest.fixture(scope="module")
def search(source):
    """One search on the model, its trials shared by the tests that search."""
    return TorchBudgetSearch(source.model, source.example_inputs)


def total_flops(m) -> int:
    return m.forward_flops + m.backward_flops


def test_torch_budget_recomputes_under_a_lower_budget():
    source = models.load(MLP, 512)
    model, x = source.model, source.example_inputs
    torch._dynamo.reset()
    eager = measure_step(model, x, fake=True)
    full = measure_step(TorchBudgetModule(model, 1.0), x, fake=True)
    tight = measure_step(TorchBudgetModule(model, 0.5), x, fake=True)
    # The boxed eager compilers free what eager autograd frees: at budget 1.0 the step is the model's.
    assert (full.peak_bytes, full.saved_bytes) == (eager.peak_bytes, eager.saved_bytes)
    assert full.forward_flops == tight.forward_flops == eager.forward_flops
    assert full.backward_flops == eager.backward_flops
    assert tight.peak_bytes < full.peak_bytes
    assert tight.saved_bytes < full.saved_bytes
    assert tight.backward_flops > full.backward_flops  # the recompute really runs


def test_torch_budget_measures_the_same_on_fake_and_real_tensors(source):
    torch._dynamo.reset()
    module = TorchBudgetModule(source.model, 0.25)
    fake = measure_step(module, source.example_inputs, fake=True)
    real = measure_step(module, source.example_inputs, fake=False)
    assert module.graphs == 2  # compiled once for fake tensors, once for real ones
    assert (fake.peak_bytes, fake.activation_peak_bytes, fake.saved_bytes) == (
        real.peak_bytes, real.activation_peak_bytes, real.saved_bytes,
    )
    assert (fake.forward_flops, fake.backward_flops) == (real.forward_flops, real.backward_flops)


class PlainMode(TorchDispatchMode):
    """A dispatch mode that does not opt out of compile internals."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_torch_budget_refuses_to_run_eagerly(source):
    torch._dynamo.reset()
    module = TorchBudgetModule(source.model, 0.5)
    with PlainMode(), pytest.raises(RuntimeError, match="ran Sequential eagerly"):
        module(*source.example_inputs)


def test_the_search_keeps_to_the_peak_with_the_least_flops_tried(source, search):
    model, x = source.model, source.example_inputs
    eager = measure_step(model, x, fake=True)
    target = int(eager.peak_bytes - 0.2 * eager.activation_peak_bytes)
    found = search.least_recompute_within(target)
    assert found is not None and found < 1.0
    fitting = [m for m in search.trials.values() if m.peak_bytes <= target]
    assert search.trials[found].peak_bytes <= target
    assert total_flops(search.trials[found]) == min(map(total_flops, fitting))
    assert len(search.trials) <= 1 + len(search.GRID) + 2 * 3 + 5  # 1.0, the grid, refinements, bisection
    assert search.least_recompute_within(search.trials[1.0].peak_bytes) == 1.0
    assert search.least_recompute_within(1) is None
    assert len(search.trials) > 1 + len(search.GRID)  # it looked closer around the lowest peak first


def test_remat_matches_every_peak_torch_reaches_with_no_more_recompute():
    """On a ReLU MLP: at each step peak the partitioner reaches, remat's plan within that peak recomputes no more."""
    source = models.load(MLP, 512)
    model, x = source.model, source.example_inputs
    none = measure_step(model, x, fake=True)
    search = TorchBudgetSearch(model, x)
    for fraction in (1.0, *search.GRID):
        torch_step = search.measure(fraction)
        planned = measure_step(remat.optimize(model, x, budget=torch_step.peak_bytes), x, fake=True)
        assert planned.peak_bytes <= torch_step.peak_bytes, fraction
        assert total_flops(planned) <= total_flops(torch_step), fraction
    assert any(m.peak_bytes < none.peak_bytes for m in search.trials.values())  # torch did cut the peak


def test_remat_recomputes_no_more_than_torch_at_its_budget_peaks(source, search):
    """Issue #5's claim on a small model: at each budget plan's measured peak, remat's recompute <= torch's
    (remat asked for the least recompute: by default it takes the plan predicted fastest)."""
    model, x = source.model, source.example_inputs
    none = measure_step(model, x, fake=True)
    compared = 0
    for fraction in (0.9, 0.7, 0.5, 0.3):
        budget = int(none.peak_bytes - (1 - fraction) * none.activation_peak_bytes)
        try:
            optimized = remat.optimize(model, x, budget=budget, objective="flops")
        except InfeasibleBudget:
            continue
        planned = measure_step(optimized, x, fake=True)
        found = search.least_recompute_within(planned.peak_bytes)
        if found is None:  # torch reaches no peak this low: remat wins outright
            continue
        assert total_flops(planned) <= total_flops(search.trials[found]), fraction
        compared += 1
    assert compared >= 1


def test_time_objective_recomputes_more_flops_in_less_time(source):
    """On a small model a checkpoint region costs more than the FLOPs of a few layers: within a
    budget, the plan predicted fastest (the default) recomputes more FLOPs than the least
    recompute, and both run at their predicted peaks."""
    model, x = source.model, source.example_inputs
    none = measure_step(model, x, fake=True)
    budget = int(none.peak_bytes - 0.1 * none.activation_peak_bytes)
    fastest = remat.plan(model, x, budget=budget)
    least = remat.plan(model, x, budget=budget, objective="flops")
    assert fastest.recompute_flops > least.recompute_flops
    assert fastest.predicted_seconds < least.predicted_seconds
    for plan in (fastest, least):
        assert measure_step(remat.optimize(model, x, plan=plan), x, fake=True).peak_bytes == plan.predicted_peak_bytes
        assert plan.predicted_peak_bytes <= budget
    with pytest.raises(ValueError, match="objective"):
        remat.plan(model, x, budget=budget, objective="speed")


def test_torch_budget_strategy_names():
    assert parse_strategies("none,torch-budget,torch-budget@0.5,torch-budget@0,torch-budget@1MiB,remat-flops@1MiB") == [
        "none", "torch-budget", "torch-budget@0.5", "torch-budget@0", "torch-budget@1MiB", "remat-flops@1MiB",
    ]
    for bad in ("torch-budget@lots", "torch-budget@-0.5", "torch-budget@"):
        with pytest.raises(ValueError, match=r"fraction in \[0, 1\]"):
            strategy(bad)
    with pytest.raises(ValueError, match="torch-budget@FRACTION"):
        strategy("torch")


def test_torch_budget_strategies_in_compare(source):
    model, x = source.model, source.example_inputs
    none = measure_step(model, x, fake=True)
    roomy = f"torch-budget@{none.peak_bytes}"  # 1.0 fits: one trial
    rows = {r.strategy: r for r in compare(model, x, ["torch-budget", "torch-budget@0", roomy])}
    assert rows["torch-budget"].peak_bytes <= none.peak_bytes and rows["torch-budget"].recompute_flops == 0
    assert rows["torch-budget@0"].recompute_flops > 0
    assert rows[roomy].peak_bytes == rows["torch-budget"].peak_bytes
    assert rows[roomy].solve_seconds > 0  # the tuning trial


def test_torch_budget_below_every_peak_it_reaches_says_how_low_it_got(source):
    with pytest.raises(ValueError, match=r"torch-budget@1KiB: .* the least it reached is .* raise the budget"):
        strategy("torch-budget@1KiB")(source.model, source.example_inputs, None)
