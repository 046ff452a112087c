"""Helpers shared by the exact-gradient tests (plain functions, no fixtures).

Test files import this module directly (``from grad_helpers import ...``):
pytest puts the ``tests`` folder on ``sys.path`` because it is not a package.
"""

from __future__ import annotations

import torch
from torch import nn

from remat import default_loss


def step_grads(module: nn.Module, inputs: tuple, seed: int = 0, loss_fn=default_loss, **kwargs) -> dict:
    """One forward + backward with ``seed``; the gradients by name, then ``.grad`` cleared."""
    torch.manual_seed(seed)
    loss = loss_fn(module(*inputs, **kwargs))
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = None
    return grads


def assert_grads_equal(expected: dict, actual: dict) -> None:
    """Every gradient of ``expected`` is bit-for-bit equal in ``actual`` (and some exist)."""
    assert expected.keys() == actual.keys()
    missing = [k for k, g in expected.items() if g is not None and actual[k] is None]
    assert not missing, f"no gradient for {missing[:5]}"
    differ = [k for k, g in expected.items() if g is not None and not torch.equal(g, actual[k])]
    assert not differ, f"{len(differ)} gradients differ, e.g. {differ[:5]}: max abs diff " + str(
        max((expected[k] - actual[k]).abs().max().item() for k in differ)
    )
    assert any(g is not None for g in expected.values())
