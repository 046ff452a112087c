"""remat composed with what people train with: torch.compile, DDP, FSDP2, autocast, frozen/LoRA.

Every test trains one step through ``remat.optimize(model, x)`` and one step
of the plain model, and compares loss and gradients. Each also shows that the
recomputation really happens in that composition (a plan that keeps nothing
would pass a gradient check trivially):

* eager (DDP, FSDP2, autocast, LoRA): a forward hook on a module inside a
  recomputed segment fires again during backward (``torch.utils.checkpoint``
  reruns it);
* torch.compile: the hooks are traced away, so instead the compiled backward
  graph (recorded through inductor's ``inner_compile``) is checked to contain
  the recomputed forward ops (more ``mm``/``convolution`` nodes than the plain
  compiled model's backward), and the bytes the compiled step saves for
  backward (counted with ``torch.autograd.graph.saved_tensors_hooks``) are
  fewer than the plain compiled model saves.

Multi-process tests (DDP, FSDP2) run 2 processes on gloo over 127.0.0.1.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import remat
from remat import default_loss
from remat.chain.cost import make_solution
from remat.planner.profiled import ProfiledModel

heavy = pytest.mark.heavy


# -- helpers ---------------------------------------------------------------------


def mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(8)])
    return net, torch.randn(256, 64)


def cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(6)]
    net = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    return net, torch.randn(8, 8, 16, 16)


def step(module: nn.Module, x: torch.Tensor, params: nn.Module | None = None) -> tuple[torch.Tensor, dict]:
    """One forward + backward: the loss and the gradients of ``params`` (default ``module``) by name."""
    params = params if params is not None else module
    loss = default_loss(module(x))
    loss.backward()
    grads = {name: p.grad for name, p in params.named_parameters() if p.requires_grad}
    for p in params.parameters():
        p.grad = None
    return loss.detach(), grads


def assert_grads_close(expected: dict, actual: dict, **tolerance) -> None:
    assert expected.keys() == actual.keys()
    assert expected, "no trainable parameter"
    for name, grad in expected.items():
        assert actual[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(actual[name], grad, msg=lambda m, name=name: f"{name}: {m}", **tolerance)


def assert_grads_equal(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    assert expected, "no trainable parameter"
    differ = [k for k, g in expected.items() if actual[k] is None or not torch.equal(g, actual[k])]
    assert not differ, f"gradients differ: {differ[:5]}"


class CallCounter:
    """Counts forward calls of one module (a forward hook)."""

    def __init__(self, module: nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *_):
        self.calls += 1


def recomputed_module(fast: remat.RematModule) -> nn.Module:
    """A module that ``fast`` runs inside its first recomputed segment."""
    assert fast.boundaries, "the plan keeps nothing: no recomputation to test"
    return fast._captured.submodules(0, fast.boundaries[0], fast)[0]


def expected_calls(fast: remat.RematModule) -> int:
    """How often the first piece runs in one step: once, once more per recompute of the
    first segment, and once more per level of checkpoints nested in it."""
    calls, segment = 2, (0, fast.boundaries[0])
    while segment in fast.nested:
        calls, segment = calls + 1, (0, fast.nested[segment][0])
    return calls


# -- 1. torch.compile --------------------------------------------------------------

FORWARD_OPS = {"aten.mm.default", "aten.addmm.default", "aten.convolution.default"}


class RecordingInductor:
    """The inductor backend, recording for each compiled graph (forward/backward) its forward-op count."""

    def __init__(self):
        self.backward_forward_ops: list[int] = []

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner(graph, inputs, *args, **kwargs):
            if kwargs.get("is_backward"):
                count = sum(str(n.target) in FORWARD_OPS for n in graph.graph.nodes if n.op == "call_function")
                self.backward_forward_ops.append(count)
            return compile_fx_inner(graph, inputs, *args, **kwargs)

        return compile_fx(gm, example_inputs, inner_compile=inner)


def compiled_step(module: nn.Module, x: torch.Tensor, params: nn.Module):
    """Compile ``module`` with inductor, run one step: loss, grads, saved bytes, backward forward-op count."""
    backend = RecordingInductor()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(x)
    loss = default_loss(out)
    loss.backward()
    grads = {name: p.grad for name, p in params.named_parameters()}
    for p in params.parameters():
        p.grad = None
    assert backend.backward_forward_ops, "no backward graph was compiled"
    return loss.detach(), grads, sum(storages.values()), sum(backend.backward_forward_ops)


# Inductor compiles are slow on CPU (cold cache: ~45 s for the first, ~25 s for the CNN): the CNN is heavy.
@pytest.mark.parametrize("make", [mlp, pytest.param(cnn, marks=heavy)], ids=["mlp", "cnn"])
def test_torch_compile_inductor(make):
    """torch.compile(remat.optimize(model, x)) with inductor: same loss and gradients, recompute kept.

    The checkpoints become Dynamo's checkpoint higher-order op, whose segments
    the partitioner recomputes in the compiled backward graph. Shown two ways:
    the compiled backward holds more forward ops (mm / convolution) than the
    plain compiled model's backward, and the compiled forward saves fewer bytes
    for backward than the plain compiled model. ``fullgraph=True``: the whole
    RematModule compiles as one graph (no graph break). BatchNorm running
    statistics are updated once, as in the plain step.

    The reference is the plain model compiled with the same backend: inductor's
    own BatchNorm differs from eager by ~1e-3 in these gradients with or
    without remat (under ``aot_eager`` both are bit-for-bit eager's).
    """
    net, x = make()
    plain = copy.deepcopy(net)
    fast = remat.optimize(net, x)
    assert fast.boundaries
    with torch._functorch.config.patch(enable_autograd_cache=False):  # a cache hit skips inner_compile
        torch._dynamo.reset()
        expected_loss, expected, plain_saved, plain_ops = compiled_step(plain, x, plain)
        loss, grads, saved, ops = compiled_step(fast, x, net)
    torch.testing.assert_close(loss, expected_loss)
    assert_grads_close(expected, grads)
    for (name, a), b in zip(plain.named_buffers(), net.buffers()):
        torch.testing.assert_close(b, a, msg=lambda m, name=name: f"buffer {name}: {m}")
    assert ops > plain_ops, f"compiled backward recomputes nothing ({ops} forward ops vs {plain_ops} plain)"
    assert saved < plain_saved, f"compiled remat saves {saved} bytes for backward, plain compiled {plain_saved}"


# -- 2./3. DDP and FSDP2 (gloo, 2 processes) ----------------------------------------

WORLD = 2


def small_mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(6)])
    return net, torch.randn(64, 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = {"ddp": ("ddp", False), "ddp_find_unused": ("ddp", True), "fsdp2": ("fsdp2", False)}


def with_unused(net: nn.Module) -> nn.Module:
    net.register_parameter("unused", nn.Parameter(torch.zeros(3)))  # the forward never reads it
    return net


def _one_case(rank: int, wrap: str, find_unused: bool) -> dict:
    net, x = small_mlp()
    if find_unused:
        with_unused(net)
    shard = x.chunk(WORLD)[rank]
    fast = remat.optimize(net, shard)
    counter = CallCounter(recomputed_module(fast))
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(fast, find_unused_parameters=find_unused)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in net:
            fully_shard(block[0])  # the Linear: a module the traced graph calls (see test_fsdp2_gloo)
        model = fully_shard(fast)
    loss = default_loss(model(shard))
    loss.backward()
    grads = {}
    for name, p in net.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor
            g = g.full_tensor()
        grads[name] = None if g is None else g.detach().clone()
    return {"grads": grads, "calls": counter.calls, "expected_calls": expected_calls(fast)}


def _worker(rank: int, port: int, out: str) -> None:
    import traceback

    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    try:
        for case, (wrap, find_unused) in CASES.items():
            try:
                results[case] = _one_case(rank, wrap, find_unused)
            except Exception:  # reported by the test of this case
                results[case] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed() -> list[dict]:
    """Every case of CASES, run once in one 2-process gloo group: per rank, case -> result."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]


def case_results(distributed: list[dict], case: str) -> list[dict]:
    results = [per_rank[case] for per_rank in distributed]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
        calls, expected = result["calls"], result["expected_calls"]
        assert calls == expected, f"rank {rank}: the recomputed module ran {calls} times, not {expected}"
    return results


def full_batch_grads(find_unused: bool = False) -> dict:
    net, x = small_mlp()
    if find_unused:
        with_unused(net)
    default_loss(net(x)).backward()
    return {name: p.grad for name, p in net.named_parameters()}


@pytest.mark.parametrize("find_unused", [False, True], ids=["default", "find_unused_parameters"])
def test_ddp_gloo(distributed, find_unused):
    """DDP(remat.optimize(model, half_batch)) on 2 gloo processes: the full batch's gradients.

    Each rank trains on its half; DDP averages, which equals the plain model's
    gradient of the full-batch mean. Recomputation in backward (the module
    inside the first recomputed segment runs twice) must not mark a parameter
    ready twice (non-reentrant checkpoint); with ``find_unused_parameters=True``
    a parameter the forward never reads gets no gradient.
    """
    results = case_results(distributed, "ddp_find_unused" if find_unused else "ddp")
    expected = full_batch_grads(find_unused)
    for result in results:
        grads = result["grads"]
        if find_unused:
            assert grads.pop("unused") is None
            expected.pop("unused", None)
        assert_grads_close(expected, grads)


def test_fsdp2_gloo(distributed):
    """fully_shard (FSDP2) on each Linear and on the RematModule, 2 gloo processes on CPU.

    Parameters are sharded DTensors, all-gathered before each Linear's forward
    (and again for the recompute in backward); the gradients, gathered back,
    equal the plain model's on the full batch.

    The sharded units must be modules the traced graph calls (leaf modules such
    as Linear) or the root: the graph inlines containers' forward (here the
    ``Sequential`` blocks), so fully_shard on a block would never get its
    pre-forward hook and its parameters would stay sharded DTensors
    ("aten.addmm.default got mixed torch.Tensor and DTensor").
    """
    expected = full_batch_grads()
    for result in case_results(distributed, "fsdp2"):
        assert_grads_close(expected, result["grads"])


# -- 4. autocast (bfloat16 on CPU) ------------------------------------------------


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
def test_autocast_bf16_training(make):
    """Planned and trained inside autocast(bf16): gradients bit-for-bit those of autocast without remat.

    The plan is made for bf16 activations: its baseline is exactly
    ``measure_step`` of the plain model under autocast, below the float32 one.
    Each measurement runs in its own autocast block (its weight-cast cache is
    emptied when the block exits).
    """
    net, x = make()
    plain = copy.deepcopy(net)
    with bf16():
        fast = remat.optimize(net, x)
    with bf16():
        assert fast.plan.baseline_peak_bytes == remat.measure_step(plain, x, fake=True).peak_bytes
    assert fast.plan.baseline_peak_bytes < remat.measure_step(plain, x, fake=True).peak_bytes
    counter = CallCounter(recomputed_module(fast))
    with bf16():
        loss, grads = step(fast, x, net)
        expected_loss, expected = step(plain, x)
    assert counter.calls == expected_calls(fast)
    assert torch.equal(loss, expected_loss)
    assert_grads_equal(expected, grads)


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
def test_autocast_bf16_prediction(make):
    """The plan's predicted peak under autocast is measure_step's of the optimized model, to the byte.

    Autocast caches each parameter's bf16 copy until the block exits, so in a
    step run inside one block all of them are live at the peak: the plan
    counts them with the parameters.
    """
    net, x = make()
    with bf16():
        fast = remat.optimize(net, x)
    with bf16():
        measured = remat.measure_step(fast, x, fake=True).peak_bytes
    assert fast.plan.predicted_peak_bytes == measured


# -- 5. frozen parameters, LoRA ----------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update ``b @ a``."""

    def __init__(self, width: int, rank: int = 4):
        super().__init__()
        self.base = nn.Linear(width, width).requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, width) / width**0.5)
        self.b = nn.Parameter(torch.randn(width, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


def lora_mlp() -> tuple[nn.Module, torch.Tensor]:
    """3 fully frozen blocks, then 6 LoRA blocks (only ``a``/``b`` train); the input needs no grad."""
    torch.manual_seed(0)
    frozen = [nn.Sequential(nn.Linear(64, 64), nn.Tanh()).requires_grad_(False) for _ in range(3)]
    adapted = [nn.Sequential(LoRALinear(64), nn.Tanh()) for _ in range(6)]
    return nn.Sequential(*frozen, *adapted), torch.randn(256, 64)


def test_frozen_and_lora():
    """Frozen weights and LoRA adapters: no "inputs do not require grad" failure, exact gradients.

    The first recomputed segment starts with frozen blocks whose input needs
    no grad; non-reentrant checkpoint still recomputes it (its first module
    runs twice). The prediction is within 2% of measure_step(fake=True).
    """
    net, x = lora_mlp()
    plain = copy.deepcopy(net)
    fast = remat.optimize(net, x)
    counter = CallCounter(recomputed_module(fast))
    loss, grads = step(fast, x, net)
    expected_loss, expected = step(plain, x)
    assert counter.calls == expected_calls(fast)
    assert torch.equal(loss, expected_loss)
    assert_grads_equal(expected, grads)
    assert all(name.endswith((".a", ".b")) for name in grads)
    assert not any(p.grad is not None for p in net.parameters() if not p.requires_grad)
    measured = remat.measure_step(fast, x, fake=True).peak_bytes
    assert fast.plan.predicted_peak_bytes == pytest.approx(measured, rel=0.02)
    assert fast.plan.predicted_peak_bytes < fast.plan.baseline_peak_bytes


# -- 6. selective stages -------------------------------------------------------------


def test_selective_stages_under_autocast_and_compile():
    """A plan whose stages run selectively (keep the convolutions' outputs, remake
    BatchNorm and ReLU in backward): under autocast(bf16) its peak is predicted to the byte
    and its gradients are bit-for-bit autocast's without remat; under torch.compile (where
    the partitioner decides what to save) its loss and gradients are the plain compiled
    model's."""
    net, x = cnn()
    plain = copy.deepcopy(net)
    with bf16():
        # The blocks from the fifth on as a selective last segment (with early stop, no plan
        # of the front has selective stages on this model: segments that end at a
        # convolution remake BatchNorm and ReLU at no FLOPs too).
        profiled = ProfiledModel.of(net, x, None).plain()
        chain = profiled.selective_chain()
        cut = chain.names.index("4.0")
        chosen = profiled.to_plan(make_solution(chain, (cut,), "store", selective=(cut,)), 0.0, None)
        assert chosen.selective
        fast = remat.optimize(net, x, plan=chosen)
    with bf16():
        assert remat.measure_step(fast, x, fake=True).peak_bytes == fast.plan.predicted_peak_bytes
    with bf16():
        loss, grads = step(fast, x, net)
        expected_loss, expected = step(plain, x)
    assert torch.equal(loss, expected_loss)
    assert_grads_equal(expected, grads)
    with torch._functorch.config.patch(enable_autograd_cache=False):
        torch._dynamo.reset()
        expected_loss, expected, _, _ = compiled_step(plain, x, plain)
        loss, grads, _, _ = compiled_step(fast, x, net)
    torch.testing.assert_close(loss, expected_loss)
    assert_grads_close(expected, grads)
