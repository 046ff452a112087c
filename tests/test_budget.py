"""Budget mode: sizes, the infeasible-budget error, least recompute within a budget, the
Pareto front, and budgets kept end to end on real models (measured on fake tensors).

End-to-end budgets are fractions of what checkpointing can save. With the
unmodified model's step peak ``P`` and activation peak ``A`` (``P`` less
parameters, inputs and gradients), the budget for fraction ``f`` is
``P - (1 - f) * A``: the step peak the model would have if its activations
alone shrank to ``f`` of theirs. Standard sizes and ViT-B/16 run with
``-m heavy``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from chain_helpers import all_plans
from grad_helpers import assert_grads_equal, step_grads
import remat
from remat import InfeasibleBudget, measure_step, parse_bytes
from remat.tools import models
from remat.planner.choose import solve
from remat.planner.profiled import ProfiledModel
from remat.report import format_bytes
from remat.chain.cost import make_solution, peak_of, recompute_flops_of
from remat.chain.model import Chain
from remat.solvers.baselines import store_all
from remat.solvers.checkpoints import min_peak, min_recompute, pareto_front
from remat.chain.random import random_chain

heavy = pytest.mark.heavy
MLP = "remat:mlp?depth=6&width=64"

# -- parse_bytes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("100b", 100),
        ("20GiB", 20 * 2**30),
        ("20gib", 20 * 2**30),
        ("512 MiB", 512 * 2**20),
        (" 3 g ", 3 * 2**30),
        ("2k", 2048),
        ("1.5GB", 1_500_000_000),
        (".5GiB", 2**29),
        ("2TB", 2 * 10**12),
        ("1TiB", 2**40),
        ("7KB", 7000),
    ],
)
def test_parse_bytes_accepts(size, expected):
    assert parse_bytes(size) == expected


@pytest.mark.parametrize(
    "size", ["lots", "", "GiB", "-3GB", "1.5.2GB", "3 XB", "2 GiBs", "0GiB", "0.1B", 0, -1, True, 1.5, None, "1e9"]
)
def test_parse_bytes_rejects_with_the_accepted_forms(size):
    with pytest.raises(ValueError) as error:
        parse_bytes(size)
    message = str(error.value)
    assert "an int of bytes" in message and "'20GiB'" in message and "GiB = 2^30 B" in message
    assert repr(size) in message or str(size) in message


# -- InfeasibleBudget --------------------------------------------------------------


def test_infeasible_budget_states_the_least_peak():
    source = models.load(MLP)
    least = remat.plan(source.model, source.example_inputs).predicted_peak_bytes
    assert remat.plan(source.model, source.example_inputs, budget=least).predicted_peak_bytes == least
    for make in (remat.plan, remat.optimize):
        with pytest.raises(InfeasibleBudget) as error:
            make(source.model, source.example_inputs, budget=least - 1)
        assert isinstance(error.value, ValueError)
        assert error.value.budget_bytes == least - 1 and error.value.least_peak_bytes == least
        message = str(error.value)
        assert f"{format_bytes(least)} ({least} B)" in message and f"({least - 1} B)" in message
        assert "max_batch" in message


# -- min_recompute and the Pareto front on random chains, against brute force --------


def chains(count: int):
    """Random chains of 1 to 10 stages (seed = index)."""
    return [random_chain(1 + seed % 10, seed) for seed in range(count)]


def every_plan(chain: Chain) -> list[tuple[int, int, tuple[int, ...]]]:
    """(peak, recompute, checkpoints) of every checkpoint subset (last segment stored)."""
    return [(peak_of(chain, p), recompute_flops_of(chain, p), p) for p in all_plans(chain.n)]


def check_min_recompute(chain: Chain) -> None:
    plans = every_plan(chain)
    least, store = min_peak(chain).peak_bytes, store_all(chain).peak_bytes
    assert least == min(peak for peak, _, _ in plans)
    # Every budget from the least peak to store-all: the answer only changes at a plan's peak.
    peaks = sorted({peak for peak, _, _ in plans if least <= peak <= store})
    budgets = sorted({*peaks, *(p - 1 for p in peaks[1:]), store + 1})
    for budget in budgets:
        best = min(recompute for peak, recompute, _ in plans if peak <= budget)
        for method in ("dp", "linear"):
            found = min_recompute(chain, budget, method)
            assert found.peak_bytes <= budget and found.recompute_flops == best, (chain.n, budget, method)
            assert found.peak_bytes == peak_of(chain, found.checkpoints)
            assert found.recompute_flops == recompute_flops_of(chain, found.checkpoints)
    assert min_recompute(chain, least - 1) is None
    assert min_recompute(chain, least - 1, "dp") is None


def check_pareto_front(chain: Chain) -> None:
    points = {(peak, recompute) for peak, recompute, _ in every_plan(chain)}
    dominated = {
        (p, r) for p, r in points if any(q <= p and s <= r and (q, s) != (p, r) for q, s in points)
    }
    front = pareto_front(chain)
    assert [(s.peak_bytes, s.recompute_flops) for s in front] == sorted(points - dominated, reverse=True)
    peaks = [s.peak_bytes for s in front]
    recomputes = [s.recompute_flops for s in front]
    assert all(a > b for a, b in zip(peaks, peaks[1:]))
    assert all(a < b for a, b in zip(recomputes, recomputes[1:]))
    assert recomputes[0] == 0 and peaks[0] == min(p for p, r in points if r == 0)
    assert peaks[-1] == min_peak(chain).peak_bytes


@pytest.mark.parametrize("chain", chains(150), ids=lambda c: f"n{c.n}")
def test_min_recompute_is_the_least_recompute_within_every_budget(chain):
    check_min_recompute(chain)


@pytest.mark.parametrize("chain", chains(150), ids=lambda c: f"n{c.n}")
def test_pareto_front_is_exactly_the_non_dominated_plans(chain):
    check_pareto_front(chain)


@heavy
def test_min_recompute_and_pareto_on_many_chains():
    for chain in chains(2000)[150:]:
        check_min_recompute(chain)
        check_pareto_front(chain)


def test_pareto_of_a_model_runs_from_store_everything_to_the_least_peak():
    source = models.load(MLP)
    front = remat.pareto(source.model, source.example_inputs)
    least = remat.plan(source.model, source.example_inputs)
    baseline = measure_step(source.model, source.example_inputs, fake=True)
    assert len(front) > 2
    assert front[0].recompute_flops == 0 and front[0].predicted_peak_bytes == baseline.peak_bytes
    assert front[-1].predicted_peak_bytes == least.predicted_peak_bytes
    assert front[-1].recompute_flops == least.recompute_flops
    for before, after in zip(front, front[1:]):
        assert before.predicted_peak_bytes > after.predicted_peak_bytes
        assert before.recompute_flops < after.recompute_flops


# -- budgets kept end to end ---------------------------------------------------------

FRACTIONS = [0.9, 0.7, 0.5, 0.3]


def model_cases():
    """(spec, batch, one sample's shape or None, heavy)."""
    cases = [
        # Fake tensors: the batch costs no time, and activations must outweigh the weights.
        ("torchvision:resnet50", 16, (3, 128, 128), False),
        # Heavy (34 s): cuts inside blocks under a budget are in every run of the fuzz test,
        # and DenseNet's predictions in test_optimize.py.
        ("torchvision:densenet121", 16, (3, 128, 128), True),
        ("hf:gpt2?n_layer=4&n_embd=128&n_head=4&vocab_size=1024&seq=256", 8, None, False),
        ("torchvision:resnet50", 32, (3, 224, 224), True),
        ("torchvision:densenet121", 16, (3, 224, 224), True),
        ("torchvision:vit_b_16", 8, (3, 224, 224), True),
        ("hf:gpt2", 4, None, True),
    ]
    return [
        pytest.param(spec, batch, shape, marks=[heavy] if slow else [], id=f"{spec.split('?')[0]}-b{batch}-{'x'.join(map(str, shape or ['seq']))}")
        for spec, batch, shape, slow in cases
    ]


def fraction_budget(baseline, fraction: float) -> int:
    """The step peak if the activations alone shrank to ``fraction`` of the baseline's."""
    return int(baseline.peak_bytes - (1 - fraction) * baseline.activation_peak_bytes)


@pytest.mark.parametrize(("spec", "batch", "shape"), model_cases())
def test_budget_is_kept_end_to_end(spec, batch, shape):
    source = models.load(spec, batch, input_shape=shape)
    model, x = source.model, source.example_inputs
    baseline = measure_step(model, x, fake=True)
    profiled = ProfiledModel.of(model, x, None)  # captured once for the other budgets
    kept = 0
    for fraction in FRACTIONS:
        budget = fraction_budget(baseline, fraction)
        try:
            if fraction == FRACTIONS[0]:
                optimized = remat.optimize(model, x, budget=budget)
            else:
                optimized = profiled.module(solve(profiled, budget))
        except InfeasibleBudget as error:
            assert error.least_peak_bytes > budget, (fraction, error)
            continue
        measured = measure_step(optimized, x, fake=True)
        assert measured.peak_bytes <= budget, (fraction, format_bytes(measured.peak_bytes), format_bytes(budget))
        assert optimized.plan.budget_bytes == budget
        kept += 1
    assert kept >= 2  # the loose budgets at least are met, so the measured check ran


# -- max_batch -------------------------------------------------------------------------


def check_max_batch(spec: str, budget: str, input_shape=None) -> int:
    """``max_batch``'s batch fits ``budget`` when measured; one more raises InfeasibleBudget."""
    batch, chosen = remat.max_batch(spec, budget)
    source = models.load(spec, batch, input_shape=input_shape)
    budget_bytes = parse_bytes(budget)
    optimized = remat.optimize(source.model, source.example_inputs, budget=budget_bytes)
    assert optimized.plan.checkpoints == chosen.checkpoints
    assert measure_step(optimized, source.example_inputs, fake=True).peak_bytes <= budget_bytes
    with pytest.raises(InfeasibleBudget):
        remat.plan(source.model, source.make_inputs(batch + 1), budget=budget_bytes)
    return batch


def test_max_batch_on_a_small_mlp():
    assert check_max_batch("remat:mlp?depth=4&width=64", "1MiB") > 1


def test_max_batch_of_a_module_needs_make_inputs():
    with pytest.raises(TypeError, match="make_inputs"):
        remat.max_batch(torch.nn.Linear(4, 4), "1MiB")


@heavy
def test_max_batch_resnet50_in_8gib():
    assert check_max_batch("torchvision:resnet50", "8GiB") > 32


# -- stored segments -----------------------------------------------------------------


def uneven_mlp() -> tuple[nn.Module, torch.Tensor]:
    """Linear + Tanh stages of very different widths: some segments are cheaper to keep whole."""
    torch.manual_seed(0)
    widths = [64, 512, 64, 256, 32, 512, 64, 128, 64]
    layers = [m for a, b in zip(widths[:-1], widths[1:]) for m in (nn.Linear(a, b), nn.Tanh())]
    return nn.Sequential(*layers), torch.randn(256, 64)


def test_budget_plans_run_stored_segments_exactly(tmp_path):
    """Plans that run middle segments normally (stored) run as predicted (with early stop,
    plain segments recompute less than stored ones on this model, so the plans are given):
    the measured peak and recompute are the predicted ones, gradients exact, and the saved
    plan rebuilds the same module."""
    net, x = uneven_mlp()
    profiled = ProfiledModel.of(net, x, None)
    chain = profiled.plain().chain
    plain = step_grads(net, (x,))
    base = measure_step(net, x, fake=True).backward_flops
    for cps, stored in [((2, 4, 6, 8), (2,)), ((2, 4, 6, 8), (0, 4)), ((4, 8, 12), (4,))]:
        solution = make_solution(chain, cps, "store", stored=stored)
        plan = profiled.to_plan(solution, 0.0, None)
        fast = remat.optimize(net, x, plan=plan)
        measured = measure_step(fast, x, fake=True)
        assert measured.peak_bytes == plan.predicted_peak_bytes, (cps, stored)
        assert measured.backward_flops - base == plan.recompute_flops, (cps, stored)
        assert_grads_equal(plain, step_grads(fast, (x,)))
        plan.save(tmp_path / "plan.json")
        again = remat.optimize(net, x, plan=remat.Plan.load(tmp_path / "plan.json"))
        assert again.stored == fast.stored and again.boundaries == fast.boundaries
        assert "stored segments" in plan.summary()


# -- selective segments ---------------------------------------------------------------


def test_early_stop_meets_a_budget_at_no_recompute_flops_on_a_cnn():
    """With early stop, segments that end at a convolution remake BatchNorm and ReLU from
    the kept convolution outputs and stop there: ResNet-18's least peak recomputes no FLOPs,
    runs as predicted, and keeps gradients and BatchNorm statistics exactly the model's."""
    source = models.load("torchvision:resnet18", 2, input_shape=(3, 96, 96))
    net, x = source.model, source.example_inputs
    fast = remat.optimize(net, x)
    assert fast.plan.recompute_flops == 0 and not fast.plan.selective and fast.plan.checkpoints
    assert fast.plan.predicted_peak_bytes < fast.plan.baseline_peak_bytes
    step = measure_step(fast, x, fake=True)
    assert step.peak_bytes == fast.plan.predicted_peak_bytes
    assert step.backward_flops == measure_step(net, x, fake=True).backward_flops
    plain_net = copy.deepcopy(net)
    assert_grads_equal(step_grads(plain_net, x), step_grads(fast, x))
    assert all(torch.equal(a, b) for a, b in zip(plain_net.state_dict().values(), net.state_dict().values()))


@pytest.mark.parametrize("spec, shape", [("hf:gpt2?n_layer=3&n_embd=64&n_head=4", (32,))])
def test_budget_plans_run_selective_segments_exactly(spec, shape, tmp_path):
    """Where stages may keep only what their matmuls and convolutions made (and remake
    layer norms, activations, dropout and BatchNorm when their backward starts), a generous
    budget is met with no recompute FLOPs at all: the measured peak is the predicted one,
    gradients and BatchNorm statistics are exactly the model's, and the saved plan rebuilds
    the same module. (Whether the planner picks it depends on its predicted time.)"""
    source = models.load(spec, 2, input_shape=shape)
    net, x = source.model, source.example_inputs
    least = remat.plan(net, x)
    budget = int(least.predicted_peak_bytes + 0.5 * (least.baseline_peak_bytes - least.predicted_peak_bytes))
    zero = [p for p in remat.pareto(net, x, remake=False) if p.selective and p.recompute_flops == 0]
    assert zero and zero[-1].predicted_peak_bytes <= budget
    fast = remat.optimize(net, x, plan=zero[-1])
    assert measure_step(fast, x, fake=True).peak_bytes == fast.plan.predicted_peak_bytes <= budget
    # one-level plans without selective segments recompute to fit the same budget
    assert min_recompute(ProfiledModel.of(net, x, None).chain, budget).recompute_flops > 0
    plain_net = copy.deepcopy(net)
    assert_grads_equal(step_grads(plain_net, x), step_grads(fast, x))
    assert all(torch.equal(a, b) for a, b in zip(plain_net.state_dict().values(), net.state_dict().values()))
    fast.plan.save(tmp_path / "plan.json")
    again = remat.optimize(net, x, plan=remat.Plan.load(tmp_path / "plan.json"))
    assert again.selective == fast.selective and again.boundaries == fast.boundaries
    assert "selective stages" in fast.plan.summary()


def test_stages_that_cannot_run_selectively_run_plainly_in_the_plan():
    # VGG's convolutions are followed by in-place ReLUs, which selective checkpointing refuses
    # (they change a convolution output it keeps): those stages are profiled and run plainly.
    source = models.load("torchvision:vgg11", 8, input_shape=(3, 32, 32))
    fast = remat.optimize(source.model, source.example_inputs)
    assert measure_step(fast, source.example_inputs, fake=True).peak_bytes == fast.plan.predicted_peak_bytes
