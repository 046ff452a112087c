"""Tests of remat.measure: exact byte counts, real = fake, the model left untouched."""

import dataclasses
import time

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from remat import default_loss, measure_step, track_memory
from remat.tools import models

MiB = 2**20
KiB = 2**10


def golden_mlp() -> tuple[nn.Module, torch.Tensor]:
    """3 x (Linear(256, 256, bias=False) + ReLU) on a 1024 x 256 float32 batch.

    Every activation is 1024 * 256 * 4 B = 1 MiB, every weight 256 * 256 * 4 B = 256 KiB.
    """
    torch.manual_seed(0)
    layers = [m for _ in range(3) for m in (nn.Linear(256, 256, bias=False), nn.ReLU())]
    return nn.Sequential(*layers), torch.randn(1024, 256)


# Forward, with the loss y.sum(): each layer computes h = x @ W.T (1 MiB) and
# a = relu(h) (1 MiB); h dies once relu is done. Autograd saves a1, a2 (relu
# outputs, also the next mm's input) and a3; x and the weights are saved too
# but were not created by the step. Live before h3 dies: a1 a2 a3 h3 = 4 MiB.
# Then the 4-byte loss.
# Backward: the seed gradient (4 B, kept by autograd.backward until the end)
# expands to a view. relu3' makes g_h3 (1 MiB); mm3' makes dW3 (256 KiB) and
# g_a2 (1 MiB) while a1 a2 a3 (a3 is the output, alive until the step ends)
# and g_h3 are alive: 3 + 1 + 1 MiB + 256 KiB + 8 B. relu2' then reaches the
# same total: a1 a2 a3 g_a2 g_h2 + dW3. Later steps have fewer activations.
SUM_LOSS_STEP_PEAK = 5 * MiB + 256 * KiB + 8
# With the default loss mean(y ** 2): y ** 2 (1 MiB) lives until mean is done.
# Its backward holds, next to a1 a2 a3, the mean's gradient (1 MiB) and three
# 1 MiB results of pow_backward = grad * (2 * a3.pow(1)): 7 MiB + 8 B.
DEFAULT_LOSS_STEP_PEAK = 7 * MiB + 8


@pytest.mark.parametrize(
    "loss_fn, tracked_peak, activation_peak",
    [
        # activation peak: the step peak without the gradient dW3 alive then.
        (lambda y: y.sum(), SUM_LOSS_STEP_PEAK, SUM_LOSS_STEP_PEAK - 256 * KiB),
        # no weight gradient exists yet at the loss's backward.
        (None, DEFAULT_LOSS_STEP_PEAK, DEFAULT_LOSS_STEP_PEAK),
    ],
    ids=["sum", "default_loss"],
)
@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_golden_mlp(loss_fn, tracked_peak, activation_peak, fake):
    model, x = golden_mlp()
    m = measure_step(model, x, loss_fn, fake=fake)
    parameters = 3 * 256 * KiB
    assert m.parameter_bytes == parameters
    assert m.input_bytes == 1 * MiB
    assert m.gradient_bytes == parameters
    assert m.peak_bytes == parameters + 1 * MiB + tracked_peak
    assert m.activation_peak_bytes == activation_peak
    assert m.saved_bytes == 3 * MiB  # a1, a2, a3; pow saves a3 again (same storage)
    mm = 2 * 1024 * 256 * 256
    assert m.forward_flops == 3 * mm
    assert m.backward_flops == 5 * mm  # no input gradient for the first layer


def test_track_memory_counts_storages_not_views():
    with track_memory() as mem:
        x = torch.zeros(1024)  # 4 KiB
        views = [x.view(32, 32), x[::2], x.reshape(2, 512).t(), x.unsqueeze(0)]
        x.add_(1).mul_(2)
        y = x.view(32, 32).t().contiguous()  # a real copy: 4 KiB more
    assert mem.peak_bytes == mem.current_bytes == 8 * KiB
    del views, y


def test_track_memory_counts_frees_and_records_timeline():
    with track_memory() as mem:
        x = torch.ones(1024) * 2
        del x
        y = torch.ones(256)
    assert (mem.peak_bytes, mem.current_bytes) == (8 * KiB, 1 * KiB)
    assert [name for name, _ in mem.timeline] == ["aten.ones", "aten.mul", "aten.ones"]
    assert [live for _, live in mem.timeline] == [4 * KiB, 8 * KiB, 1 * KiB]
    del y


def test_track_memory_ignores_tensors_made_outside():
    outside = torch.ones(4096)
    with track_memory() as mem:
        view = outside[:10]
        outside.mul_(3)
    assert mem.peak_bytes == 0
    del view


@pytest.mark.parametrize("where", ["fake", "meta"])
def test_track_memory_without_real_memory(where):
    context = FakeTensorMode() if where == "fake" else torch.device("meta")
    with context, track_memory() as mem:
        a = torch.empty(1000, 300)  # 1.2 MB
        b = torch.empty(300, 10, dtype=torch.float16)
        c = a @ b.float()
    assert mem.peak_bytes == 1000 * 300 * 4 + 300 * 10 * (2 + 4) + 1000 * 10 * 4
    assert mem.flops == 2 * 1000 * 300 * 10
    work = mem.work()
    # empty, empty, the cast (no FLOPs) and the matmul, each allocating its output
    assert (work.ops, work.cheap_ops) == (4, 3)
    assert work.written_bytes == mem.peak_bytes
    assert work.cheap_written_bytes == mem.peak_bytes - 1000 * 10 * 4
    del c


def test_work_counts_bytes_written_in_place_and_by_normalizations():
    bn = torch.nn.BatchNorm1d(8)
    x = torch.randn(16, 8)
    with track_memory() as mem:
        # writes num_batches_tracked in place (8 bytes), y (512) and its saved mean and inverse std (2 x 32)
        y = bn(x)
        y.relu_()  # writes y again, in place, allocating nothing
        y.view(-1)  # a view writes nothing
    work = mem.work()
    assert work.norm_bytes == 16 * 8 * 4 + 2 * 8 * 4
    assert work.written_bytes == 8 + work.norm_bytes + 16 * 8 * 4
    assert work.cheap_written_bytes == work.written_bytes  # nothing here counts FLOPs


def test_default_loss_accepts_nested_outputs():
    x = torch.full((2, 3), 2.0)
    assert default_loss({"logits": (x, "ignored")}).item() == 4.0
    with pytest.raises(TypeError, match="loss_fn"):
        default_loss({"text": "no tensor"})


def test_loss_without_grad_is_explained():
    model = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        measure_step(model, torch.randn(2, 4))


def _comparable(m, *, with_timeline: bool = True):
    """Every field of a measurement except the wall-clock time (and the op timeline)."""
    skip = {"seconds"} if with_timeline else {"seconds", "timeline", "forward_ops", "work"}
    return {k: v for k, v in dataclasses.asdict(m).items() if k not in skip}


class SmallCNN(nn.Sequential):
    def __init__(self):
        super().__init__(
            nn.Conv2d(3, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        )


def small_cnn():
    torch.manual_seed(0)
    return SmallCNN(), (torch.randn(4, 3, 32, 32),)


def from_spec(spec, batch, input_shape=None):
    def build():
        source = models.load(spec, batch, input_shape=input_shape)
        return source.model, source.example_inputs

    return build


REAL_VS_FAKE = {
    "mlp": from_spec("remat:mlp?depth=4&width=128", 64),
    "cnn_batchnorm": small_cnn,
    "densenet121": from_spec("torchvision:densenet121", 2, (3, 64, 64)),
    "gpt2": from_spec("hf:gpt2?n_layer=2&n_embd=128&n_head=4&seq=64", 2),
    "bert": from_spec("hf:bert?num_hidden_layers=2&hidden_size=128&num_attention_heads=4"
                      "&intermediate_size=256&seq=64", 2),
    "random_dag": from_spec("remat:random_dag?ops=40&seed=3", 16),
}


# GPT-2's mask code checks its position ids with a data-dependent
# `(...).all().item()` on real tensors and takes an equivalent path of views on
# fake ones: the same bytes and FLOPs, a few more non-allocating ops.
OP_SEQUENCE_DIFFERS = {"gpt2"}


@pytest.mark.parametrize("name", REAL_VS_FAKE.keys())
def test_fake_equals_real_to_the_byte(name):
    model, inputs = REAL_VS_FAKE[name]()
    real = measure_step(model, inputs)
    fake = measure_step(model, inputs, fake=True)
    strict = name not in OP_SEQUENCE_DIFFERS
    assert _comparable(fake, with_timeline=strict) == _comparable(real, with_timeline=strict)
    if not strict:
        assert max(live for _, live in fake.timeline) == max(live for _, live in real.timeline)
    assert real.peak_bytes > real.activation_peak_bytes > 0


def test_thread_count_does_not_change_measurement():
    model, inputs = small_cnn()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = measure_step(model, inputs)
        torch.set_num_threads(2)
        two = measure_step(model, inputs)
    finally:
        torch.set_num_threads(threads)
    assert _comparable(one) == _comparable(two)


def test_resnet152_simulated_quickly_and_exactly():
    source = models.load("torchvision:resnet152", 16)
    start = time.perf_counter()
    big = measure_step(source.model, source.example_inputs, fake=True)
    assert time.perf_counter() - start < 30
    assert big.activation_peak_bytes > 2 * 2**30  # GiBs at batch 16
    small = torch.randn(1, 3, 64, 64)
    assert _comparable(measure_step(source.model, small, fake=True)) == _comparable(
        measure_step(source.model, small)
    )


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_model_is_untouched(fake):
    model, inputs = small_cnn()
    model.train()
    frozen = model[0].weight
    frozen.grad = torch.ones_like(frozen)  # an existing gradient stays as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_step(model, inputs, fake=fake)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert model[1].num_batches_tracked.item() == 0
    assert torch.equal(frozen.grad, torch.ones_like(frozen))
    assert all(p.grad is None for p in model.parameters() if p is not frozen)
    assert model.training


def test_attention_on_cpu_counts_the_flops_it_counts_on_cuda():
    # 2 * b * h * s * s * d for scores and again for the weighted sum; twice that and more backward.
    q, k, v = (torch.randn(2, 4, 128, 32, requires_grad=True) for _ in range(3))
    with track_memory() as mem:
        out = nn.functional.scaled_dot_product_attention(q, k, v)
    forward = mem.flops
    assert forward == 2 * (2 * 2 * 4 * 128 * 128 * 32)
    with track_memory() as mem:
        out.sum().backward()
    assert mem.flops == 2 * forward + 2 * 2 * 4 * 128 * 128 * 32  # dQ, dK, dV and the recomputed scores
