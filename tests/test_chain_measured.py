"""The chain cost model against measured peaks of real torch models (CPU).

For five small sequential models, ``peak_of`` on the profiled chain is
compared with ``measure_step`` of ``CheckpointedSequential`` for every
checkpoint plan; the least-peak plan is compared with what stock
``torch.utils.checkpoint`` can do on the same model; gradients and BatchNorm
statistics under a plan equal the plain model's.
"""

from __future__ import annotations

import copy
import functools
import random

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from chain_helpers import (
    SimulatedOffload, StockCheckpointed, all_plans, plans_with_selective, plans_with_stored, segmentations,
)
from grad_helpers import assert_grads_equal, step_grads
from remat.profile.sequential import profile_sequential
from remat.execute.sequential import CheckpointedSequential
from remat.measure.step import measure_step
from remat.chain.cost import peak_of, recompute_flops_of, segment_stages
from remat.solvers.baselines import sqrt_segments
from remat.solvers.checkpoints import min_peak


class WideSoftmax(nn.Module):
    """Expands 8x, softmax, projects back: a large internal tensor saved for backward."""

    def __init__(self, width: int, factor: int = 8):
        super().__init__()
        self.up = nn.Linear(width, width * factor, bias=False)
        self.down = nn.Linear(width * factor, width, bias=False)

    def forward(self, x):
        return self.down(torch.softmax(self.up(x), dim=-1))


class ToDtype(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)


def mlp():
    layers = []
    for w_in, w_out in [(32, 64), (64, 128), (128, 32)]:
        layers += [nn.Linear(w_in, w_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 8)), torch.randn(16, 32)


def vgg():
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    net = nn.Sequential(*block(3, 8), nn.MaxPool2d(2), *block(8, 16), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(16 * 2 * 2, 10))
    return net, torch.randn(4, 3, 8, 8)


def resnet():
    """torchvision BasicBlocks as a chain (narrow, so that real runs are quick)."""

    def down(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        BasicBlock(8, 8), BasicBlock(8, 16, 2, down(8, 16)), BasicBlock(16, 16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    return net, torch.randn(2, 3, 8, 8)


def large_temporary():
    net = nn.Sequential(nn.Linear(32, 32), nn.GELU(), WideSoftmax(32), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, 16))
    return net, torch.randn(16, 32)


def mixed_dtype():
    bf16 = torch.bfloat16
    net = nn.Sequential(nn.Linear(32, 64), ToDtype(bf16), nn.Linear(64, 64).to(bf16), nn.GELU(),
                        nn.Linear(64, 64).to(bf16), ToDtype(torch.float32), nn.Linear(64, 16))
    return net, torch.randn(16, 32)


MODELS = {"mlp": mlp, "vgg_bn": vgg, "resnet": resnet, "large_temporary": large_temporary,
          "mixed_dtype": mixed_dtype}


@functools.cache
def model(name: str):
    torch.manual_seed(0)
    net, x = MODELS[name]()
    return net, x, profile_sequential(net, x)


@functools.cache
def measured_peaks(name: str) -> dict[tuple[int, ...], int]:
    """Measured peak of every plan of the model (real tensors)."""
    net, x, prof = model(name)
    return {cps: measure_step(CheckpointedSequential(list(net), cps, prof.stage_pieces), x).peak_bytes
            for cps in all_plans(prof.chain.n)}


@pytest.mark.parametrize("name", MODELS)
def test_peak_of_equals_measured_for_every_plan(name, record_property, capsys):
    net, x, prof = model(name)
    peaks = measured_peaks(name)
    errors = {cps: abs(peak_of(prof.chain, cps) - m) / m for cps, m in peaks.items()}
    exact = sum(e == 0 for e in errors.values())
    worst = max(errors.values())
    record_property("exact", f"{exact}/{len(errors)}")
    record_property("worst_relative_error", worst)
    with capsys.disabled():
        print(f"\n{name}: n={prof.chain.n}, {exact}/{len(errors)} plans exact, worst relative error {worst:.2e}")
    assert worst <= 0.01, {c: e for c, e in errors.items() if e > 0.01}
    assert len(peaks) == 2 ** (prof.chain.n - 1)


@pytest.mark.parametrize("name", MODELS)
def test_recompute_flops_equal_measured_with_early_stop(name):
    """A recompute stops at the segment's last saved tensor: the backward's extra FLOPs are
    what the chain predicts, less than whole segments where a segment ends with a matmul
    or convolution (its inputs are saved before it runs)."""
    net, x, prof = model(name)
    base = measure_step(net, x, fake=True).backward_flops
    whole = prof.chain.without_early_stop()
    saved = 0
    for cps in random.Random(1).sample(list(all_plans(prof.chain.n)), 24):
        measured = measure_step(CheckpointedSequential(list(net), cps, prof.stage_pieces), x, fake=True)
        assert measured.backward_flops - base == recompute_flops_of(prof.chain, cps), cps
        saved += recompute_flops_of(whole, cps) - recompute_flops_of(prof.chain, cps)
    assert saved > 0


@pytest.mark.parametrize("name", MODELS)
def test_stored_segments_peak_of_equals_measured(name):
    """Plans that run some middle segments normally (``stored``): sampled plans of every
    model, measured on fake tensors, equal ``peak_of``; gradients stay exact."""
    net, x, prof = model(name)
    plans = [(cps, stored) for cps, stored in plans_with_stored(prof.chain.n) if stored]
    plain = step_grads(net, (x,))
    for k, (cps, stored) in enumerate(random.Random(0).sample(plans, min(40, len(plans)))):
        fast = CheckpointedSequential(list(net), cps, prof.stage_pieces, stored=stored)
        assert measure_step(fast, x, fake=True).peak_bytes == peak_of(prof.chain, cps, stored), (cps, stored)
        if k < 4:
            assert_grads_equal(plain, step_grads(fast, (x,)))


@pytest.mark.parametrize("name", MODELS)
def test_fake_measurement_of_the_executor_agrees_with_real(name):
    net, x, prof = model(name)
    for cps in {(), min_peak(prof.chain).checkpoints, sqrt_segments(prof.chain).checkpoints}:
        fake = measure_step(CheckpointedSequential(list(net), cps, prof.stage_pieces), x, fake=True)
        assert fake.peak_bytes == measured_peaks(name)[cps], cps


@pytest.mark.parametrize("name", MODELS)
def test_gradients_and_running_stats_equal_the_plain_model(name):
    net, x, prof = model(name)
    plans = [(), min_peak(prof.chain).checkpoints, tuple(range(1, prof.chain.n))]
    torch.manual_seed(1)
    plain = copy.deepcopy(net)
    plain.zero_grad(set_to_none=True)
    plain(x).float().pow(2).mean().backward()
    for cps in plans:
        ours = copy.deepcopy(net)
        ours.zero_grad(set_to_none=True)
        CheckpointedSequential(list(ours), cps, prof.stage_pieces)(x).float().pow(2).mean().backward()
        for (key, p), q in zip(plain.named_parameters(), ours.parameters()):
            assert torch.equal(p.grad, q.grad), (cps, key)
        for (key, b), c in zip(plain.named_buffers(), ours.buffers()):
            assert torch.equal(b, c), (cps, key)  # BatchNorm statistics updated once, identically


@pytest.mark.parametrize("name", MODELS)
def test_offloaded_peak_of_equals_measured_for_every_plan(name):
    """Offload through the executor's hooks, on CPU: the host copies are invisible to the
    tracker (as pinned memory is to the CUDA allocator), the copies back are counted."""
    net, x, prof = model(name)
    lower = 0
    for cps in all_plans(prof.chain.n):
        offload = SimulatedOffload()
        measured = measure_step(CheckpointedSequential(list(net), cps, prof.stage_pieces, offload=offload), x)
        assert measured.peak_bytes == peak_of(prof.chain, cps, offload=True), cps
        # Every recomputed segment's input but the model's own went through the hooks.
        assert len(offload.moved) == max(0, len(cps) - 1) >= offload.loaded, cps
        lower += measured.peak_bytes < measured_peaks(name)[cps]
    assert lower or name == "mixed_dtype"  # there the peak is never where a checkpoint waits


@pytest.mark.parametrize("name", ["vgg_bn", "resnet"])
def test_offloaded_gradients_and_running_stats_equal_the_plain_model(name):
    net, x, prof = model(name)
    torch.manual_seed(1)
    plain = copy.deepcopy(net)
    plain(x).float().pow(2).mean().backward()
    cps = tuple(range(1, prof.chain.n))
    ours = copy.deepcopy(net)
    offload = SimulatedOffload()
    CheckpointedSequential(list(ours), cps, prof.stage_pieces, offload=offload)(x).float().pow(2).mean().backward()
    assert offload.loaded > 0
    for (key, p), q in zip(plain.named_parameters(), ours.parameters()):
        assert torch.equal(p.grad, q.grad), key
    for (key, b), c in zip(plain.named_buffers(), ours.buffers()):
        assert torch.equal(b, c), key


def stock_family(m: int, full: bool):
    """Plans stock ``checkpoint(..., use_reentrant=False)`` expresses on ``m`` modules-stages.

    ``full``: every segmentation with each segment checkpointed or plain,
    except two plain segments side by side (the same run as one plain
    segment): about 2 * 3^(m-1) runs, minutes, so ``-m heavy`` only.
    Default: the ``checkpoint_sequential`` family, every segment but the last
    checkpointed (2^(m-1) runs, store-all included). Stock checkpoint differs
    from our executor there: it stops the recompute early (``early_stop``)
    and runs BatchNorm's recompute as a second update.
    """
    for segments in segmentations(m):
        k = len(segments)
        if full:
            for mask in range(2**k):
                plain = [bool(mask >> j & 1) for j in range(k)]
                if not any(a and b for a, b in zip(plain, plain[1:])):
                    yield [(s, e, not p) for (s, e), p in zip(segments, plain)]
        else:
            yield [(s, e, j != k - 1) for j, (s, e) in enumerate(segments)]


def check_least_peak_beats_stock(name: str, full: bool) -> None:
    net, x, prof = model(name)
    best = min_peak(prof.chain)
    ours = measured_peaks(name)[best.checkpoints]
    # Stock checkpoint works on modules; a merged pieces (a view, an in-place op) stays whole.
    stage_pieces = prof.stage_pieces
    stock = {}
    for family in stock_family(len(stage_pieces), full):
        segments = [(stage_pieces[s][0], stage_pieces[e - 1][-1] + 1, c) for s, e, c in family]
        stock[tuple(segments)] = measure_step(StockCheckpointed(list(net), segments), x).peak_bytes
    best_stock = min(stock.values())
    assert ours <= best_stock, (ours, best_stock, min(stock, key=stock.get))


@pytest.mark.parametrize("name", MODELS)
def test_least_peak_plan_beats_stock_checkpoint(name):
    check_least_peak_beats_stock(name, full=False)


@pytest.mark.heavy
@pytest.mark.parametrize("name", MODELS)
def test_least_peak_plan_beats_every_stock_checkpoint_segmentation(name):
    check_least_peak_beats_stock(name, full=True)


@functools.cache
def selective_profile(name: str):
    net, x, _ = model(name)
    return profile_sequential(net, x, selective=True)


@pytest.mark.parametrize("name", MODELS)
def test_selective_segments_peak_of_equals_measured(name):
    """Plans whose stored and last segments run selectively: sampled plans of every model,
    measured on fake tensors, equal ``peak_of``; gradients and BatchNorm statistics stay exact."""
    net, x, _ = model(name)
    prof = selective_profile(name)
    plans = [plan for plan in plans_with_selective(prof.chain.n) if plan[2]]
    plain = step_grads(net, (x,))

    def module(cps, stored, selective, net=net):
        stages = [i for i in segment_stages(prof.chain.n, cps, selective) if i not in prof.plainly]
        return CheckpointedSequential(list(net), cps, prof.stage_pieces, stored=stored, selective=stages)

    for k, (cps, stored, selective) in enumerate(random.Random(0).sample(plans, min(40, len(plans)))):
        fast = module(cps, stored, selective)
        predicted = peak_of(prof.chain, cps, stored, selective=selective)
        assert measure_step(fast, x, fake=True).peak_bytes == predicted, (cps, stored, selective)
        if k < 4:
            assert_grads_equal(plain, step_grads(fast, (x,)))
    # BatchNorm statistics are updated once per step, as without a plan
    cps, stored, selective = plans[0]
    stepped = []
    for make in (lambda m: m, lambda m: module(cps, stored, selective, m)):
        copy_ = copy.deepcopy(net)
        step_grads(make(copy_), (x,))
        stepped.append(copy_.state_dict())
    assert all(torch.equal(stepped[0][k], stepped[1][k]) for k in stepped[0])


def test_a_second_backward_through_a_retained_graph_recomputes_again():
    """``backward(retain_graph=True)`` then ``backward()``: each recomputes the segments, with
    BatchNorm's statistics frozen each time; gradients and buffers are the plain model's."""
    net, x, prof = model("vgg_bn")
    plain, ours = copy.deepcopy(net), copy.deepcopy(net)
    loss = plain(x).float().pow(2).mean()
    loss.backward(retain_graph=True)
    loss.backward()
    loss = CheckpointedSequential(list(ours), tuple(range(1, prof.chain.n)), prof.stage_pieces)(x).float().pow(2).mean()
    loss.backward(retain_graph=True)
    loss.backward()
    for (key, p), q in zip(plain.named_parameters(), ours.parameters()):
        assert torch.equal(p.grad, q.grad), key
    for (key, b), c in zip(plain.named_buffers(), ours.buffers()):
        assert torch.equal(b, c), key
