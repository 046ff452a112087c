"""Fuzz ``remat.optimize`` with random tiny networks: exact gradients, peaks within budget.

Each case is one :class:`remat.tools.nets.RandomNet` (linear, conv, norms,
activations, dropout, add/mul/cat/split, views, in-place ops, several
outputs) drawn from its seed, with a batch size, a loss and a budget drawn
from the same seed. For each case:

* the least-peak plan: loss and every gradient bit-for-bit equal to the
  plain model's (same ``torch.manual_seed`` before each step, so dropout masks
  match), and its predicted peak within 2% of the measured (fake) peak;
* a random budget between the least peak and the store-everything peak:
  the measured peak fits the budget, the gradients are still exact, and the
  prediction is within 2% again.

300 seeds run by default (about two minutes on two cores); 2000 more with
``-m heavy``.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from torch import nn

from grad_helpers import assert_grads_equal, step_grads

import remat
from remat import default_loss, measure_step
from remat.capture.captured import capture
from remat.planner.choose import solve
from remat.planner.profiled import ProfiledModel
from remat.execute.module import RematModule
from remat.tools.nets import RandomNet

DEFAULT_SEEDS = range(300)
HEAVY_SEEDS = range(300, 2300)
# Seeds whose predicted peak is off by more than 2%, or below the measured one by enough to pass
# the budget (gradients exact). 55 and 120 return an output that later stages read (a
# caller-held boundary) from a last stage with several outputs: 55 is 2.4% above (32 B of
# 1.3 KB), 120's store-everything plan 2.2% below (56 B), with bytes stranded by outputs the
# loss ignores; not traced yet (docs/design.md, "What is exact"). 117 is 2.2% above, by the
# backward of a stage with several outputs (an over-count of the kinds docs/design.md lists
# under "Several outputs").
PEAK_REASON = "chain cost model off by more than 2% on this graph"
KNOWN_PEAK_FAILURES: set[int] = {55, 117, 120}
# The heavy seeds (-m heavy) whose peak check fails, gradients exact on all 2000: 36, i.e.
# 1.8% (was 38 before caller-held boundaries; 20 of those now pass, 18 others fail):
# 8 under by up to 7.7% (2 over their budget), 8 over by up to 5.5%: gradient aliasing and
# over-counts of the kinds docs/design.md lists under "Several outputs", not each traced.
HEAVY_REASON = "chain cost model off by more than 2% on this multi-output graph"
KNOWN_HEAVY_PEAK_FAILURES: set[int] = {
    423, 490, 604, 659, 671, 717, 734, 782, 913, 983, 1102, 1222, 1262, 1343, 1382, 1400, 1416,
    1418, 1468, 1510, 1631, 1632, 1651, 1659, 1717, 1778, 1835, 1997, 2019, 2030, 2069, 2110,
    2122, 2234, 2282, 2284,
}


def loss_over_all_outputs(output) -> torch.Tensor:
    """Sum of :func:`remat.default_loss` over every output, so every output has a gradient."""
    outputs = output if isinstance(output, tuple) else (output,)
    return sum(default_loss(o) for o in outputs)


@dataclasses.dataclass
class FuzzCase:
    """One random network with its input, loss and where its budget lies (0: least peak, 1: store all)."""

    seed: int
    model: RandomNet
    x: torch.Tensor
    loss_fn: object
    budget_fraction: float

    @classmethod
    def of(cls, seed: int) -> FuzzCase:
        rng = random.Random(seed)
        ops, width, batch = rng.randint(4, 14), rng.choice([8, 16, 32]), rng.randint(2, 6)
        loss_fn = loss_over_all_outputs if rng.random() < 0.75 else default_loss
        torch.manual_seed(seed)  # the weights
        model = RandomNet(ops, width, seed).train()
        return cls(seed, model, torch.randn(batch, width), loss_fn, rng.random())


def assert_peak_predicted(module: remat.RematModule, x: torch.Tensor, loss_fn) -> int:
    """The plan's predicted peak is within 2% of the measured (fake) one; returns the measured."""
    measured = measure_step(module, x, loss_fn, fake=True).peak_bytes
    predicted = module.plan.predicted_peak_bytes
    assert abs(predicted - measured) <= 0.02 * measured, (
        f"predicted {predicted} B, measured {measured} B ({predicted / measured - 1:+.2%})"
    )
    return measured


def plans(seed: int) -> tuple[FuzzCase, remat.RematModule, remat.RematModule, int]:
    """The case of ``seed``, its least-peak module, a module within a random budget, and that budget."""
    case = FuzzCase.of(seed)
    # What remat.optimize does, with one capture for both plans.
    profiled = ProfiledModel.of(case.model, case.x, case.loss_fn)
    least = profiled.module(solve(profiled, None))
    low = least.plan.predicted_peak_bytes
    high = max(low, least.plan.baseline_peak_bytes)
    budget = low + int(case.budget_fraction * (high - low))
    return case, least, profiled.module(solve(profiled, budget)), budget


def check_case(seed: int, peaks: bool = True) -> None:
    """Both plans: loss and gradients equal the plain model's bit for bit (same seed: same
    dropout masks); predictions within 2% of the measured (fake) peaks, the budget kept."""
    case, least, fitted, budget = plans(seed)
    plain = step_grads(case.model, (case.x,), seed, case.loss_fn)
    assert_grads_equal(plain, step_grads(least, (case.x,), seed, case.loss_fn))
    assert_grads_equal(plain, step_grads(fitted, (case.x,), seed, case.loss_fn))
    if peaks:
        assert_peak_predicted(least, case.x, case.loss_fn)
        measured = assert_peak_predicted(fitted, case.x, case.loss_fn)
        assert measured <= budget, f"measured peak {measured} B over the budget {budget} B"


def seeds(numbers, *marks, known: set[int] = frozenset(), reason: str = "") -> list:
    return [
        pytest.param(
            s, id=f"seed{s}",
            marks=[*marks, *([pytest.mark.xfail(strict=True, reason=reason)] if s in known else [])],
        )
        for s in numbers
    ]


@pytest.mark.parametrize("seed", seeds(DEFAULT_SEEDS, known=KNOWN_PEAK_FAILURES, reason=PEAK_REASON))
def test_random_network(seed):
    check_case(seed)


@pytest.mark.parametrize(
    "seed", [*seeds(sorted(KNOWN_PEAK_FAILURES)), *seeds(sorted(KNOWN_HEAVY_PEAK_FAILURES), pytest.mark.heavy)]
)
def test_random_network_gradients_where_peaks_are_off(seed):
    check_case(seed, peaks=False)


@pytest.mark.parametrize(
    "seed", seeds(HEAVY_SEEDS, pytest.mark.heavy, known=KNOWN_HEAVY_PEAK_FAILURES, reason=HEAVY_REASON)
)
def test_random_network_heavy(seed):
    check_case(seed)


class InputOnlyChangedInPlace(nn.Module):
    """Seed 10, minimised: a value made from the input alone, then changed in place.

    ``f`` was taken for an input-only value (like an attention mask) that any
    piece may recompute; the last pieces recomputed it without the ``add_``,
    and every gradient was wrong.
    """

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        f = torch.relu(x) * 0.5
        f.add_(self.a(x))
        return self.c(self.b(f) + f)


def test_value_from_the_input_changed_in_place_is_not_recomputed():
    torch.manual_seed(0)
    model, x = InputOnlyChangedInPlace(), torch.randn(4, 8)
    plain = step_grads(model, (x,))
    captured = capture(model, (x,))
    assert len(captured.modules) >= 3
    tried = 0
    for boundary in range(1, len(captured.modules)):
        try:
            module = RematModule(model, captured, (boundary,))
        except ValueError:  # a segment start inside a residual branch: not a valid plan
            continue
        assert_grads_equal(plain, step_grads(module, (x,)))
        tried += 1
    assert tried >= 2
