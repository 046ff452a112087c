"""Exact, deterministic measurement of memory and FLOPs of one training step.

On CPU, ``meta`` and fake tensors, memory is counted at the dispatcher: every
tensor storage created by an operator is registered once (views, aliases and
in-place results share their input's storage and are not counted again) and is
un-registered by a weakref finalizer when PyTorch frees it. The result is
byte-exact and does not depend on threads or timing, and it works under
``FakeTensorMode``, so a model that does not fit anywhere can be measured in
milliseconds. On CUDA the allocator's own statistics give the peak.

Example:
    >>> import torch
    >>> from remat import track_memory
    >>> with track_memory() as mem:
    ...     y = torch.ones(1024)            # 4 KiB
    ...     del y
    ...     z = torch.ones(256)             # 1 KiB
    >>> mem.peak_bytes, mem.current_bytes
    (4096, 1024)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["MemoryTracker", "StepMeasurement", "track_memory", "measure_step", "default_loss"]

CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator rounds every block up to this

# Ops whose output never counts as a new allocation. ``lift_fresh`` returns its
# (already allocated) input on real tensors but a fresh storage under
# FakeTensorMode; treating it as an alias keeps real and fake runs equal.
_ALIAS_OPS = {torch.ops.aten.lift_fresh.default}
# Metadata queries, not computations: fake tensors answer ``.device`` through
# the dispatcher, real tensors do not. Leaving them out of the timeline keeps
# real and fake timelines (and op counts) equal.
_METADATA_OPS = {torch.ops.prim.device.default}


def _cpu_attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# torch.utils.flop_counter has no formula for the CPU kernel of scaled_dot_product_attention;
# without one, attention would be free on CPU (and fake CPU tensors) but not on CUDA.
_CPU_ATTENTION_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def flop_formula(func) -> Callable[..., int] | None:
    """The FLOP formula of operator ``func`` (``torch.utils.flop_counter``'s, and CPU attention's);
    None for an operator that counts no FLOPs. Called as ``formula(*args, **kwargs, out_val=out)``.

    Example:
        >>> import torch
        >>> from remat.measure import flop_formula
        >>> flop_formula(torch.ops.aten.mm.default)(torch.ones(2, 3), torch.ones(3, 4), out_val=None)
        48
        >>> flop_formula(torch.ops.aten.relu.default) is None
        True
    """
    packet = func.overloadpacket
    return flop_registry.get(packet) or _CPU_ATTENTION_FORMULAS.get(packet)


def round_to_of(device: torch.device | str | None) -> int:
    """Allocation granularity: 512 bytes on CUDA, exact elsewhere."""
    return CUDA_BLOCK_BYTES if device is not None and torch.device(device).type == "cuda" else 1


def rounded_bytes(nbytes: int, round_to: int) -> int:
    """``nbytes`` rounded up to the allocator's block size ``round_to``."""
    return -(-nbytes // round_to) * round_to


def _storage_bytes(storage: torch.UntypedStorage, round_to: int) -> int:
    return rounded_bytes(storage.nbytes(), round_to)


@dataclasses.dataclass
class _StorageRecord:
    nbytes: int
    born: int  # index into the timeline when the storage was created
    died: int | None = None


class MemoryTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages created while it is active.

    Use it through :func:`track_memory`. Attributes after (or during) use:

    * ``peak_bytes`` / ``current_bytes``: bytes of storages created inside the
      context, at their peak (since entry, or since the last :meth:`mark`) and
      now. On CUDA, the allocator's figures relative to what was allocated on
      entry: they include what operators allocate inside themselves
      (cuDNN/cuBLAS workspaces), which no dispatcher-level count sees.
    * ``timeline``: ``(op name, live bytes)`` after every operator, for plots.
    * ``flops``: FLOPs of the operators run inside (``torch.utils.flop_counter``
      formulas; operators without a formula count zero).
    """

    def __init__(self, round_to: int = 1, cuda_device: torch.device | None = None):
        super().__init__()
        self.round_to = round_to
        self.cuda_device = cuda_device
        self._counted = 0  # bytes of live storages created here (dispatcher count)
        self._counted_peak = 0
        self.flops = 0
        self.timeline: list[tuple[str, int]] = []
        self._live: dict[int, _StorageRecord] = {}  # keyed by id(storage) while alive
        self._records: list[_StorageRecord] = []
        self._cuda_start = 0
        self._allocator_figures: tuple[int, int] | None = None  # (peak, current) frozen on exit

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Without this, torch.compile silently falls back to eager under the mode.
        return True

    # -- storage bookkeeping ---------------------------------------------------
    def _register(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._live:
            return
        record = _StorageRecord(_storage_bytes(storage, self.round_to), len(self.timeline))
        self._live[key] = record
        self._records.append(record)
        self._counted += record.nbytes
        self._counted_peak = max(self._counted_peak, self._counted)
        weakref.finalize(storage, self._release, key, record)

    def _release(self, key: int, record: _StorageRecord) -> None:
        record.died = len(self.timeline)
        self._counted -= record.nbytes
        if self._live.get(key) is record:
            del self._live[key]

    @property
    def current_bytes(self) -> int:
        if self._allocator_figures is not None:
            return self._allocator_figures[1]
        if self.cuda_device is not None:
            return torch.cuda.memory_allocated(self.cuda_device) - self._cuda_start
        return self._counted

    @property
    def peak_bytes(self) -> int:
        if self._allocator_figures is not None:
            return self._allocator_figures[0]
        if self.cuda_device is not None:
            return torch.cuda.max_memory_allocated(self.cuda_device) - self._cuda_start
        return self._counted_peak

    def mark(self) -> None:
        """Start a new peak window: ``peak_bytes`` then counts from what is live now."""
        if self.cuda_device is not None:
            torch.cuda.synchronize(self.cuda_device)
            torch.cuda.reset_peak_memory_stats(self.cuda_device)
        self._counted_peak = self._counted

    def live_bytes(self, storages: Iterable[torch.UntypedStorage]) -> int:
        """Bytes of those of ``storages`` (alive, as the caller holds them) created here."""
        records = {id(s): self._live.get(id(s)) for s in storages}
        return sum(record.nbytes for record in records.values() if record is not None)

    def live_bytes_besides(self, storages: Iterable[torch.UntypedStorage]) -> int:
        """Bytes of every storage created here and still alive but ``storages``."""
        besides = {id(s) for s in storages}
        return sum(record.nbytes for key, record in self._live.items() if key not in besides)

    def record_of(self, tensor: torch.Tensor) -> _StorageRecord | None:
        """The record of ``tensor``'s storage if it was created here and is alive."""
        return self._live.get(id(tensor.untyped_storage()))

    # -- dispatch --------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _METADATA_OPS:
            return out
        formula = flop_formula(func)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        if func not in _ALIAS_OPS:
            inputs = {
                id(t.untyped_storage())
                for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor) and _has_storage(t)
            }
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and _has_storage(t):
                    storage = t.untyped_storage()
                    if id(storage) not in inputs:
                        self._register(storage)
        self.timeline.append((str(func._overloadpacket), self.current_bytes))
        return out

    def __enter__(self):
        if self.cuda_device is not None:
            torch.cuda.synchronize(self.cuda_device)
            torch.cuda.reset_peak_memory_stats(self.cuda_device)
            self._cuda_start = torch.cuda.memory_allocated(self.cuda_device)
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        if self.cuda_device is not None:
            torch.cuda.synchronize(self.cuda_device)
            self._allocator_figures = (self.peak_bytes, self.current_bytes)
        return result


def _has_storage(t: torch.Tensor) -> bool:
    # Nested/sparse/functional wrappers have no plain storage to key on.
    return t.layout == torch.strided and not t.is_nested and type(t).__name__ != "FunctionalTensor"


@contextlib.contextmanager
def track_memory(
    device: torch.device | str | None = None, *, exact: bool | None = None
) -> Iterator[MemoryTracker]:
    """Track live tensor memory of everything run inside the ``with`` block.

    Args:
        device: ``None`` or a CPU/meta device counts storages exactly at the
            dispatcher. A CUDA device takes the peak from the CUDA allocator
            (``max_memory_allocated``) and still records the op timeline, with
            sizes rounded to the allocator's 512-byte blocks.
        exact: force dispatcher counting (with CUDA rounding on a CUDA
            device), e.g. for fake tensors that stand for CUDA tensors.

    Example:
        >>> import torch, remat
        >>> with remat.track_memory() as mem:
        ...     x = torch.zeros(256, 256)   # 256 KiB
        >>> mem.peak_bytes
        262144
    """
    device = torch.device(device) if device is not None else None
    if round_to_of(device) > 1 and not exact:
        tracker = MemoryTracker(round_to=CUDA_BLOCK_BYTES, cuda_device=device)
    else:
        tracker = MemoryTracker(round_to=round_to_of(device))
    with tracker:
        yield tracker


def default_loss(output: Any) -> torch.Tensor:
    """Mean of squares of the (first) output, in float32.

    Works for a tensor, a tuple/list, a dict or a Hugging Face ``ModelOutput``.
    """
    tensor = first_tensor(output)
    if tensor is None:
        raise TypeError(
            f"default_loss found no tensor in the model output ({type(output).__name__}); "
            "pass loss_fn=... that turns the output into a scalar"
        )
    return tensor.float().pow(2).mean()


def first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


@dataclasses.dataclass(frozen=True)
class StepMeasurement:
    """What one training step (forward, loss, backward) cost.

    All sizes are bytes. ``peak_bytes`` is the whole step (parameters, buffers,
    inputs, activations, gradients); ``activation_peak_bytes`` is the peak of
    what remains after taking away parameters, buffers, inputs and the
    gradients alive at that moment.
    """

    peak_bytes: int
    activation_peak_bytes: int
    saved_bytes: int
    parameter_bytes: int
    input_bytes: int
    gradient_bytes: int
    forward_flops: int
    backward_flops: int
    seconds: float
    timeline: tuple[tuple[str, int], ...] = dataclasses.field(repr=False, default=())
    forward_ops: int = dataclasses.field(repr=False, default=0)


def unique_storage_bytes(tensors, round_to: int = 1) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and _has_storage(t):
            storage = t.untyped_storage()
            seen[id(storage)] = _storage_bytes(storage, round_to)
    return sum(seen.values())


def as_tuple(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


@contextlib.contextmanager
def step_model(model: torch.nn.Module, example_inputs: Any, *, fake: bool):
    """The model and inputs to run one measured step on, leaving ``model`` as it was.

    With ``fake``, the model with its parameters and buffers swapped for fake
    tensors (no memory, no data) until the ``with`` block ends, and fake
    inputs, inside their ``FakeTensorMode``. Otherwise the model itself: the
    parameters' ``.grad`` are set aside and the buffers (BatchNorm running
    statistics) saved, and both are put back afterwards.
    Yields ``(module, inputs)``.
    """
    inputs = as_tuple(example_inputs)
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.nn.utils.stateless import _reparametrize_module

        mode = FakeTensorMode()
        fakes: dict[int, torch.Tensor] = {}  # tied tensors stay tied

        def to_fake(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in fakes:
                f = mode.from_tensor(t)
                fakes[id(t)] = f.requires_grad_(t.requires_grad) if t.is_leaf else f
            return fakes[id(t)]

        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        swapped = {name: to_fake(t) for name, t in named}
        fake_inputs = tree_map_only(torch.Tensor, to_fake, inputs)
        # The model's own tensors are swapped for fake ones for the whole step
        # (forward and backward, recomputation included), then put back.
        with _reparametrize_module(model, swapped), mode:
            yield model, fake_inputs
        return
    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.clone()) for b in model.buffers()]
    for p in params:
        p.grad = None
    try:
        yield model, inputs
    finally:
        with torch.no_grad():
            for p, grad in zip(params, grads):
                p.grad = grad
            for buffer, saved in buffers:
                buffer.copy_(saved)


def measure_step(
    model: torch.nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    fake: bool = False,
    grad_accumulation: bool = False,
) -> StepMeasurement:
    """Run one training step and measure its memory, FLOPs and time.

    The user's model is left as it was: on fake tensors its tensors are swapped
    for fake ones during the step and put back; on real ones the parameters'
    ``.grad`` and the buffers (BatchNorm running statistics) are put back
    afterwards.

    Args:
        model: the module to train.
        example_inputs: a tensor or a tuple of positional inputs.
        loss_fn: output -> scalar loss; default :func:`default_loss`.
        fake: simulate on fake tensors (no memory used, any size, any machine).
        grad_accumulation: measure a step whose parameter gradients exist
            before it starts (a gradient-accumulation micro-step): they are
            counted in ``peak_bytes`` and ``gradient_bytes`` all step long,
            and the backward adds into them.

    Example:
        >>> import torch, remat
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
        >>> m = remat.measure_step(mlp, torch.randn(32, 64), fake=True)
        >>> m.peak_bytes >= m.activation_peak_bytes > 0
        True
    """
    loss_fn = loss_fn or default_loss
    device = _model_device(model, example_inputs)
    with step_model(model, example_inputs, fake=fake) as (module, inputs):
        params = [p for p in module.parameters() if p.requires_grad]
        round_to = round_to_of(device)
        parameter_bytes = unique_storage_bytes([*module.parameters(), *module.buffers()], round_to)
        existing_grad_bytes = 0
        if grad_accumulation:
            for p in params:
                p.grad = torch.zeros_like(p)
            existing_grad_bytes = unique_storage_bytes([p.grad for p in params], round_to)
        input_bytes = unique_storage_bytes(tree_flatten(inputs)[0], round_to)
        saved: dict[int, torch.Tensor] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if _has_storage(t):
                saved[id(t.untyped_storage())] = t
            return t

        start = time.perf_counter()
        with track_memory(device, exact=fake) as mem:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                output = module(*inputs)
                loss = loss_fn(output)
            forward_flops, forward_ops = mem.flops, len(mem.timeline)
            saved_bytes = sum(
                _storage_bytes(t.untyped_storage(), round_to)
                for t in saved.values()
                if mem.record_of(t) is not None
            )
            saved.clear()
            _backward(loss, params)
            grads = [p.grad for p in params if p.grad is not None]
            del output, loss
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start

        grad_records = {id(r) for r in map(mem.record_of, grads) if r is not None}
        base = parameter_bytes + input_bytes
        activation_peak = _activation_peak(mem, grad_records)
        gradient_bytes = unique_storage_bytes(grads, round_to)
        if grad_accumulation:
            for p in params:
                p.grad = None  # ours, not the user's (the model's own .grad is put back)
        return StepMeasurement(
            peak_bytes=base + existing_grad_bytes + mem.peak_bytes,
            activation_peak_bytes=activation_peak,
            saved_bytes=saved_bytes,
            parameter_bytes=parameter_bytes,
            input_bytes=input_bytes,
            gradient_bytes=gradient_bytes,
            forward_flops=forward_flops,
            backward_flops=mem.flops - forward_flops,
            seconds=seconds,
            timeline=tuple(mem.timeline),
            forward_ops=forward_ops,
        )


def _backward(loss: torch.Tensor, params: list[torch.Tensor]) -> None:
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not require grad: no parameter of the model requires grad and no "
            "input requires grad, so there is no backward pass to measure or optimize"
        )
    loss.backward()


def _activation_peak(mem: MemoryTracker, grad_records: set[int]) -> int:
    """Peak of tracked bytes minus the gradients already produced at each moment."""
    if mem.cuda_device is not None:
        grad_bytes = sum(r.nbytes for r in mem._records if id(r) in grad_records)
        return max(0, mem.peak_bytes - grad_bytes)
    n = len(mem.timeline) + 1
    delta = [0] * (n + 1)
    for record in mem._records:
        if id(record) in grad_records:
            continue
        delta[record.born] += record.nbytes
        delta[record.died if record.died is not None else n] -= record.nbytes
    peak = live = 0
    for change in delta:
        live += change
        peak = max(peak, live)
    return peak


def _model_device(model: torch.nn.Module, example_inputs: Any) -> torch.device:
    for t in list(model.parameters()) + tree_flatten(as_tuple(example_inputs))[0]:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")
