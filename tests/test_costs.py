"""``costs="profile"``: stages timed on the device; the model is left as it was."""

from __future__ import annotations

import copy

import pytest
import torch

import remat
from grad_helpers import assert_grads_equal, step_grads


def net_and_input():
    torch.manual_seed(0)
    blocks = [
        torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.BatchNorm1d(128), torch.nn.Dropout(0.1), torch.nn.ReLU())
        for _ in range(5)
    ]
    return torch.nn.Sequential(*blocks), torch.randn(256, 128)


def test_profiled_costs_time_the_recompute_and_leave_the_model_alone():
    net, x = net_and_input()
    state = copy.deepcopy(net.state_dict())
    rng = torch.get_rng_state()
    timed = remat.plan(net, x, costs="profile")
    counted = remat.plan(net, x)
    # Timing runs the real forward: BatchNorm statistics and the RNG are put back.
    assert all(torch.equal(value, net.state_dict()[name]) for name, value in state.items())
    assert torch.equal(rng, torch.get_rng_state())
    assert timed.costs == "profile" and counted.costs == "flops" and counted.recompute_seconds is None
    # Every plan of this family recomputes the stages before its last segment,
    # so timing changes what the plan reports, not which plan has the least peak.
    assert timed.checkpoints == counted.checkpoints and timed.recompute_flops == counted.recompute_flops
    assert timed.recompute_flops > 0 and timed.recompute_seconds > 0
    assert "recompute time (measured)" in timed.summary()
    again = remat.Plan.from_json(timed.to_json())
    assert (again.costs, again.recompute_seconds) == ("profile", timed.recompute_seconds)


def test_optimize_with_profiled_costs_keeps_gradients_exact():
    net, x = net_and_input()
    plain = step_grads(net, (x,))
    fast = remat.optimize(copy.deepcopy(net), x, costs="profile")
    assert fast.plan.recompute_seconds > 0
    assert_grads_equal(plain, step_grads(fast, (x,)))


def test_unknown_costs_are_refused():
    net, x = net_and_input()
    with pytest.raises(ValueError, match="costs must be 'flops' or 'profile'"):
        remat.plan(net, x, costs="time")
