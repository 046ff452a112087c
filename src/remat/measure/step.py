"""One training step measured: whole-step and activation peaks, FLOPs, on real or fake tensors."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

from remat.chain.time import Work
from remat.measure.optimizer import OptimizerSpec, optimizer_like, state_bytes, warm_up
from remat.measure.tracker import MemoryTracker, has_storage, round_to_of, storage_bytes, track_memory, unique_storage_bytes

__all__ = [
    "StepMeasurement", "as_call", "as_tuple", "bind_positional", "default_loss", "first_tensor", "has_meta", "measure_step",
    "model_device", "positional", "step_model", "without_weights",
]


def default_loss(output: Any) -> torch.Tensor:
    """The output's ``loss`` where it has one (a Hugging Face ``ModelOutput`` or a dict, when
    the batch has labels), else the mean of squares of the (first) output, in float32.

    Works for a tensor, a tuple/list, a dict or a Hugging Face ``ModelOutput``.
    """
    loss = output.get("loss") if isinstance(output, dict) else None
    if isinstance(loss, torch.Tensor) and loss.dim() == 0:
        return loss
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
    # The whole step's FLOPs, operators and bytes allocated (the step-time model's terms).
    work: Work = dataclasses.field(repr=False, default=Work())
    # With an optimizer: its state (in peak_bytes all step), and the whole step's bytes at the
    # peak of its step() (and zero_grad()), which every plan of the model shares.
    optimizer_state_bytes: int = 0
    optimizer_peak_bytes: int = 0



def positional(model: torch.nn.Module, example_inputs: Any) -> tuple:
    """``example_inputs`` as ``model``'s positional arguments.

    They may be a tensor, a tuple or list of positional arguments, a dict of
    keyword arguments (a batch, as in ``model(**batch)``), or ``(args, kwargs)``.
    Keyword arguments are put in the places of ``model.forward``'s parameters,
    the parameters between them left at their defaults.
    """
    args, kwargs = as_call(example_inputs)
    if not kwargs:
        return args
    signature = getattr(model, "forward_signature", None) or inspect.signature(model.forward)
    return bind_positional(signature, args, kwargs, type(model).__name__)


def as_call(example_inputs: Any) -> tuple[tuple, dict]:
    """Example inputs (a tensor, a tuple or list of positional arguments, a dict batch, or
    ``(args, kwargs)``) as the call that passes them: ``(args, kwargs)``."""
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if (
        isinstance(example_inputs, tuple) and len(example_inputs) == 2
        and isinstance(example_inputs[0], (tuple, list)) and isinstance(example_inputs[1], dict)
    ):
        return tuple(example_inputs[0]), example_inputs[1]
    return as_tuple(example_inputs), {}


def bind_positional(signature: inspect.Signature, args: tuple, kwargs: dict, name: str = "the model") -> tuple:
    """A call's arguments as positional ones of ``signature``, defaults filling the gaps."""
    if not kwargs:
        return args
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise ValueError(f"the inputs do not fit {name}.forward{signature}: {error}") from None
    given = bound.arguments
    params = list(signature.parameters.values())
    last = max(i for i, p in enumerate(params) if p.name in given)
    values: list = []
    for p in params[: last + 1]:
        if p.kind is p.VAR_POSITIONAL:
            values.extend(given.get(p.name, ()))
        elif p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD):
            extra = [p.name] if p.kind is p.KEYWORD_ONLY else list(given[p.name])
            raise ValueError(
                f"{name}.forward takes {', '.join(map(repr, extra))} only by keyword, and remat passes a "
                "batch to the model by position: wrap the model in a module whose forward names it"
            )
        elif p.name in given:
            values.append(given[p.name])
        elif p.default is not p.empty:
            values.append(p.default)
        else:
            raise ValueError(f"no value for {name}.forward's parameter {p.name!r}, which has no default")
    return tuple(values)


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
    inputs = positional(model, example_inputs)
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.nn.utils.stateless import _reparametrize_module

        # Real tensors the step meets outside the model and inputs (labels a loss_fn closes over)
        # become fake ones as they are read.
        mode = FakeTensorMode(allow_non_fake_inputs=True)
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


def has_meta(model: torch.nn.Module, example_inputs: Any) -> bool:
    """Whether ``model`` was built on ``device="meta"`` (or an input is on meta)."""
    tensors = [*model.parameters(), *model.buffers(), *tree_flatten(example_inputs)[0]]
    return any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors)


@contextlib.contextmanager
def without_weights(model: torch.nn.Module, example_inputs: Any):
    """``example_inputs`` ready to plan ``model`` with, when the model holds no real weights.

    A model built on ``device="meta"`` is planned as if built on the device of its other
    inputs (the CPU if all are meta): until the ``with`` block ends, its meta parameters and
    buffers are swapped for fake tensors there. Its inputs, and the real inputs of a model
    built under the caller's ``FakeTensorMode``, are made fake in the model's mode. A model
    with real weights and its inputs are left as they are. Yields the inputs.
    """
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.nn.utils.stateless import _reparametrize_module

    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    flat = [t for t in tree_flatten(example_inputs)[0] if isinstance(t, torch.Tensor)]
    fake = next((t for _, t in named if isinstance(t, FakeTensor)), None)
    if fake is None and not has_meta(model, example_inputs):
        yield example_inputs
        return
    mode = fake.fake_mode if fake is not None else FakeTensorMode(allow_non_fake_inputs=True)
    device = next((t.device for t in flat if not t.is_meta), torch.device("cpu"))
    fakes: dict[int, torch.Tensor] = {}  # tied tensors stay tied

    def to_fake(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, FakeTensor):
            return t
        if id(t) not in fakes:
            if t.is_meta:
                with mode:
                    made = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            else:
                made = mode.from_tensor(t)
            made.requires_grad_(t.requires_grad)
            # Parameters stay Parameters: torch.export checks the state dict's kinds.
            fakes[id(t)] = torch.nn.Parameter(made, t.requires_grad) if isinstance(t, torch.nn.Parameter) else made
        return fakes[id(t)]

    swapped = {name: to_fake(t) for name, t in named if t.is_meta}
    with _reparametrize_module(model, swapped):
        yield tree_map_only(torch.Tensor, to_fake, example_inputs)


def measure_step(
    model: torch.nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    fake: bool = False,
    grad_accumulation: bool = False,
    optimizer: OptimizerSpec | None = None,
) -> StepMeasurement:
    """Run one training step and measure its memory, FLOPs and time.

    The user's model is left as it was: on fake tensors its tensors are swapped
    for fake ones during the step and put back; on real ones the parameters'
    ``.grad`` and the buffers (BatchNorm running statistics) are put back
    afterwards (and, with an optimizer, the parameters' values).

    Args:
        model: the module to train.
        example_inputs: a tensor, a tuple of positional inputs, or a batch
            of keyword arguments (see :func:`positional`).
        loss_fn: output -> scalar loss; default :func:`default_loss`.
        fake: simulate on fake tensors (no memory used, any size, any machine).
        grad_accumulation: measure a step whose parameter gradients exist
            before it starts (a gradient-accumulation micro-step): they are
            counted in ``peak_bytes`` and ``gradient_bytes`` all step long,
            and the backward adds into them.
        optimizer: the step ends with ``optimizer.step()`` and ``zero_grad()``,
            its state there from the start (an optimizer or a name such as
            ``"adamw"``; see :mod:`remat.measure.optimizer`: a new one of the
            same kind and settings runs, the given one is not touched).

    Example:
        >>> import torch, remat
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
        >>> m = remat.measure_step(mlp, torch.randn(32, 64), fake=True)
        >>> m.peak_bytes >= m.activation_peak_bytes > 0
        True
    """
    loss_fn = loss_fn or default_loss
    device = model_device(model, example_inputs)
    originals = list(model.parameters())
    with contextlib.ExitStack() as stack:
        module, inputs = stack.enter_context(step_model(model, example_inputs, fake=fake))
        params = [p for p in module.parameters() if p.requires_grad]
        round_to = round_to_of(device)
        parameter_bytes = unique_storage_bytes([*module.parameters(), *module.buffers()], round_to)
        stepping = None if optimizer is None else optimizer_like(optimizer, originals, list(module.parameters()))
        state = 0
        if stepping is not None:
            if not fake:  # the steps change the weights: put them back afterwards
                stack.enter_context(_values_kept(params))
            warm_up(stepping)
            state = state_bytes(stepping, round_to)
        existing_grad_bytes = 0
        if grad_accumulation:
            for p in params:
                p.grad = torch.zeros_like(p)
            existing_grad_bytes = unique_storage_bytes([p.grad for p in params], round_to)
        input_bytes = unique_storage_bytes(tree_flatten(inputs)[0], round_to)
        saved: dict[int, torch.Tensor] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if has_storage(t):
                saved[id(t.untyped_storage())] = t
            return t

        start = time.perf_counter()
        with track_memory(device, exact=fake) as mem:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                output = module(*inputs)
                loss = loss_fn(output)
            forward_flops, forward_ops = mem.flops, len(mem.timeline)
            saved_bytes = sum(
                storage_bytes(t.untyped_storage(), round_to)
                for t in saved.values()
                if mem.record_of(t) is not None
            )
            saved.clear()
            _backward(loss, params)
            grads = [p.grad for p in params if p.grad is not None]
            del output, loss
            gradient_bytes = unique_storage_bytes(grads, round_to)
            grad_records = {id(r) for r in map(mem.record_of, grads) if r is not None}
            activation_peak = _activation_peak(mem, grad_records)
            optimizer_peak = 0
            if stepping is not None:
                trained = mem.peak_bytes
                del grads  # zero_grad() frees them
                mem.mark()
                stepping.step()
                stepping.zero_grad(set_to_none=True)
                optimizer_peak = mem.peak_bytes
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start

        base = parameter_bytes + input_bytes + existing_grad_bytes + state
        peak = mem.peak_bytes if stepping is None else max(trained, optimizer_peak)
        if grad_accumulation:
            for p in params:
                p.grad = None  # ours, not the user's (the model's own .grad is put back)
        return StepMeasurement(
            peak_bytes=base + peak,
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
            work=mem.work(),
            optimizer_state_bytes=state,
            optimizer_peak_bytes=base + optimizer_peak if stepping is not None else 0,
        )


@contextlib.contextmanager
def _values_kept(params: list[torch.Tensor]):
    """The values of ``params`` put back when the block ends, however it ends."""
    values = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, values):
                p.copy_(value)


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


def model_device(model: torch.nn.Module, example_inputs: Any) -> torch.device:
    for t in list(model.parameters()) + tree_flatten(positional(model, example_inputs))[0]:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")
