"""remat's own recompute region (remat.execute.recompute): exact gradients, early stop, what it keeps."""

import gc
import weakref

import pytest
import torch
from torch import nn

from remat.execute.recompute import batch_norms, run_recomputed
from remat.execute.remake import remake_cheap


def _block() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))


def _grads(block: nn.Module, x: torch.Tensor, recomputed: bool, seed: int = 1) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = run_recomputed(block, batch_norms([block]), x) if recomputed else block(x)
    torch.manual_seed(seed + 1)  # the generator moves on before the backward, as in training
    y.pow(2).sum().backward()
    return [x.grad, *(p.grad for p in block.parameters())]


def test_gradients_and_statistics_are_those_of_a_plain_run():
    x = torch.randn(6, 8)
    plain_block, block = _block(), _block()
    plain = _grads(plain_block, x, recomputed=False)
    ours = _grads(block, x, recomputed=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, ours))  # dropout replayed, BatchNorm the same
    # The running statistics moved once, not once more in the recompute.
    norm, plain_norm = block[1], plain_block[1]
    assert torch.equal(norm.running_mean, plain_norm.running_mean)
    assert torch.equal(norm.running_var, plain_norm.running_var)
    assert norm.num_batches_tracked.item() == 1


def test_the_recompute_stops_at_the_last_saved_tensor():
    calls = {"first": 0, "last": 0}
    first, last = nn.Linear(4, 4), nn.Linear(4, 4)
    first.register_forward_hook(lambda *_: calls.__setitem__("first", calls["first"] + 1))
    last.register_forward_hook(lambda *_: calls.__setitem__("last", calls["last"] + 1))
    block = nn.Sequential(first, nn.Tanh(), last)
    x = torch.randn(3, 4, requires_grad=True)
    run_recomputed(block, [], x).sum().backward()
    # The last Linear saves its input before it runs: its recompute never gets past that.
    assert calls == {"first": 2, "last": 1}


def test_each_backward_through_a_retained_graph_recomputes():
    block, plain_block = _block().eval(), _block().eval()
    x = torch.randn(5, 8, requires_grad=True)
    y = run_recomputed(block, [], x).sum()
    y.backward(retain_graph=True)
    y.backward()
    plain_block(x).sum().backward(inputs=list(plain_block.parameters()))
    plain_block(x).sum().backward(inputs=list(plain_block.parameters()))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(block.parameters(), plain_block.parameters()))


def test_the_region_lets_go_of_its_inputs_after_its_backward():
    block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    x = torch.randn(4, 8, requires_grad=True) * 2  # made here: nothing else holds it
    gone = weakref.ref(x)
    y = run_recomputed(block, [], x)
    del x
    gc.collect()
    assert gone() is not None  # the region keeps it for its recompute
    y.sum().backward()
    gc.collect()
    assert gone() is None  # its output is alive, its backward is done: the input is not held


def test_an_input_changed_in_place_is_refused_at_the_recompute():
    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    x = torch.randn(2, 4, requires_grad=True) * 1
    y = run_recomputed(block, [], x)
    with torch.no_grad():
        x.add_(1)
    with pytest.raises(RuntimeError, match="changed in place after the segment ran"):
        y.sum().backward()


def test_autocast_of_the_forward_is_replayed():
    block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = block(x)
    plain.float().sum().backward()
    expected = [p.grad.clone() for p in block.parameters()]
    block.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = run_recomputed(block, [], x)
    ours.float().sum().backward()  # the recompute runs outside autocast, as it was inside
    assert all(torch.equal(a, p.grad) for a, p in zip(expected, block.parameters()))


def test_without_grad_it_just_runs():
    block = nn.Linear(4, 4)
    with torch.no_grad():
        assert torch.equal(run_recomputed(block, [], torch.ones(1, 4)), block(torch.ones(1, 4)))


def test_inputs_are_kept_through_the_hooks_around_the_region():
    """As autograd keeps a saved tensor: remade values remake a region's input, offload moves it."""
    block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(4, 8, requires_grad=True)
    block(x * 3).sum().backward()
    expected = [x.grad.clone(), *(p.grad.clone() for p in block.parameters())]
    x.grad = None
    block.zero_grad(set_to_none=True)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.detach().clone()  # a copy, not requiring grad, as an offload's would be

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = run_recomputed(block, [], x * 3)
    assert packed == [(4, 8)]  # the region's input only: the region's own hooks took the rest
    y.sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(expected, [x.grad, *(p.grad for p in block.parameters())]))


def test_an_input_remade_by_the_recorder_around_the_region():
    """The region keeps its input through the recorder's hooks: a recipe, remade for the recompute."""
    torch.manual_seed(0)
    first, block = nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(4, 8, requires_grad=True)
    params = [x, *first.parameters(), *block.parameters()]

    def loss(recomputed: bool) -> torch.Tensor:
        h = torch.relu(first(x)) * 2  # cheap values: the recorder keeps recipes of them
        return (run_recomputed(block, [], h) if recomputed else block(h)).sum()

    expected = torch.autograd.grad(loss(False), params)
    with remake_cheap():
        ours = loss(True)
    assert all(torch.equal(a, b) for a, b in zip(expected, torch.autograd.grad(ours, params)))
