"""Plans for gradient accumulation: parameter gradients that exist all step.

With ``grad_accumulation=True`` the planner counts every parameter gradient
from the start (they are added into, not created) and ``measure_step`` runs
the step with zero gradients already in place; the prediction matches that
measurement, and training by accumulation gives the plain model's gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import remat
from remat.tools import models
from remat.measure.step import default_loss, measure_step

SPECS = ["remat:mlp?depth=6&width=64", "remat:preact_resnet?depth=29", "torchvision:resnet18"]


@pytest.mark.parametrize("spec", SPECS)
def test_prediction_equals_the_accumulation_step_measured(spec):
    source = models.load(spec, 4, input_shape=(3, 64, 64) if "torchvision" in spec else None)
    model, x = source.model, source.example_inputs
    fast = remat.optimize(model, x, grad_accumulation=True)
    plan = fast.plan
    assert plan.grad_accumulation
    assert plan.baseline_peak_bytes == measure_step(model, x, fake=True, grad_accumulation=True).peak_bytes
    assert plan.predicted_peak_bytes == measure_step(fast, x, fake=True, grad_accumulation=True).peak_bytes
    assert plan.predicted_peak_bytes <= plan.baseline_peak_bytes
    assert remat.Plan.from_json(plan.to_json()) == plan


def test_measure_step_counts_existing_gradients_and_leaves_the_users_alone():
    net = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
    x = torch.randn(16, 32)
    net[0].weight.grad = torch.ones_like(net[0].weight)
    fresh = measure_step(net, x)
    accumulating = measure_step(net, x, grad_accumulation=True)
    grad_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    assert fresh.gradient_bytes == accumulating.gradient_bytes == grad_bytes
    # All gradients live from the start: at least the fresh peak, at most all of them more.
    assert fresh.peak_bytes <= accumulating.peak_bytes <= fresh.peak_bytes + grad_bytes
    assert torch.equal(net[0].weight.grad, torch.ones_like(net[0].weight)) and net[2].weight.grad is None


def test_accumulating_micro_batches_gives_the_plain_models_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Sequential(nn.Linear(48, 48), nn.BatchNorm1d(48), nn.GELU()) for _ in range(8)])
    micro = torch.randn(3, 32, 48)
    plain = copy.deepcopy(net)
    fast = remat.optimize(net, micro[0], grad_accumulation=True)
    for x in micro:
        default_loss(plain(x)).backward()
        default_loss(fast(x)).backward()
    for (name, p), q in zip(plain.named_parameters(), net.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(plain.named_buffers(), net.buffers()):
        assert torch.equal(b, c), name


def test_accumulation_plans_keep_fewer_activations_when_gradients_are_large():
    """Gradients that exist all step leave less room early in the backward: the plan
    for accumulation has a lower activation peak than the plan for fresh gradients."""
    source = models.load("remat:mlp?depth=12&width=256", 64)
    model, x = source.model, source.example_inputs
    fresh = remat.optimize(model, x)
    accumulating = remat.optimize(model, x, grad_accumulation=True)
    act = lambda m, acc: measure_step(m, x, fake=True, grad_accumulation=acc).activation_peak_bytes  # noqa: E731
    assert act(accumulating, True) <= act(fresh, True)
