"""Models whose output is several tensors, some of which the loss ignores.

The caller holds every output through the backward; outputs that are views
of one storage each get a gradient of their own; an output the loss ignores
never runs its backward, so what its graph saved stays to the end of the
step; and when the loss ignores every path from the first layers, those
never run backward at all. For every plan of each model the gradients
equal the plain model's and the measured (fake) peak never exceeds the
prediction, so budgets hold. The prediction is exact where the last model
stage runs normally; where it is recomputed (the last segment is the loss
alone: planned only if the loss reads every output) or where a stage input
is saved only for an ignored output (counted both as an activation and as
stranded), it is somewhat high.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grad_helpers import assert_grads_equal, step_grads
from remat import default_loss, measure_step
from remat.planner.profiled import ProfiledModel
from remat.chain.cost import peak_of
from remat.chain.model import ChainSolution


def loss_over_all_outputs(output) -> torch.Tensor:
    return sum(default_loss(o) for o in output)


class ChunkedOutputs(nn.Module):
    """Returns a ``tanh`` and four views (``chunk`` and ``split``) of one ``cat``."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.first, self.second = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        h = self.second(torch.relu(self.first(x)))
        both = torch.cat([torch.relu(h), h], dim=1)
        return (torch.tanh(h), *both.chunk(2, dim=1), *both.split(h.shape[1], dim=1))


class IgnoredBranch(nn.Module):
    """The second output's branch saves tensors for a backward that never comes."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.first, self.main, self.side = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, 4 * width)

    def forward(self, x):
        h = torch.relu(self.first(x))
        main = self.main(torch.tanh(h))
        side = torch.sigmoid(self.side(h)) * torch.tanh(self.side(h))
        return main, side


class IgnoredStart(nn.Module):
    """The loss reads only the output that does not depend on ``first``: no gradient reaches it."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.first, self.second, self.third = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        a = self.first(x)
        b = self.third(torch.relu(self.second(x * x)))
        return b, torch.tanh(a) * a


CASES = {  # model, loss, the most the prediction may be above the measured peak
    "chunked outputs": (ChunkedOutputs, loss_over_all_outputs, 0.12),
    "ignored branch": (IgnoredBranch, default_loss, 0.03),
    "ignored start": (IgnoredStart, default_loss, 0.01),
}


@pytest.mark.parametrize("name", CASES)
def test_every_plan_bounded_by_its_prediction_with_exact_gradients(name):
    make, loss_fn, slack = CASES[name]
    torch.manual_seed(0)
    model, x = make(), torch.randn(8, 16)
    plain = step_grads(model, (x,), loss_fn=loss_fn)
    profiled = ProfiledModel.of(model, x, loss_fn)
    chain, checked = profiled.chain, 0
    for mask in range(1 << (chain.n - 1)):
        checkpoints = tuple(c for c in range(1, chain.n) if mask >> (c - 1) & 1)
        try:
            predicted = peak_of(chain, checkpoints)
        except ValueError:  # keeps a boundary without an activation live across it
            continue
        module = profiled.module(profiled.to_plan(ChainSolution(checkpoints, predicted, 0), 0.0, None))
        measured = measure_step(module, x, loss_fn, fake=True).peak_bytes
        assert measured <= predicted <= (1 + slack) * measured, (checkpoints, predicted, measured)
        if name != "ignored branch" and (not checkpoints or checkpoints[-1] < chain.n - 1):
            assert predicted == measured, (checkpoints, predicted, measured)
        assert_grads_equal(plain, step_grads(module, (x,), loss_fn=loss_fn))
        checked += 1
    # "ignored start" is one model stage and the loss, and a last model stage whose outputs
    # the loss partly ignores is never recomputed (see Chain.stranded_bytes): one plan.
    assert checked >= (1 if name == "ignored start" else 2), f"{name}: only {checked} plan(s)"


def test_the_ignored_branch_is_stranded_and_the_dead_start_merged():
    """What the chain records for the last two models: bytes left to the end of the step, and
    one first stage that holds the layers no gradient reaches."""
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    branch = ProfiledModel.of(IgnoredBranch(), x, default_loss)
    assert branch.chain.stranded_bytes > 0
    start = ProfiledModel.of(IgnoredStart(), x, default_loss)
    assert start.chain.stranded_bytes > 0
    first_stage = start.stage_pieces[0]
    assert "first" in " ".join(start.captured.pieces[i].name for i in first_stage)
