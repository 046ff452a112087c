"""Profile a list of stages, one by one, into a :class:`~remat.solvers.chain.Chain`.

Each stage is run on its own under the exact storage tracker (on fake tensors
when the caller set them up): once forward saving nothing for backward (as
inside a checkpointed segment), once forward saving (as normally), then
backward. The numbers recorded are exactly what the chain cost model needs.
Stage inputs and outputs may be tensors or nested tuples/lists/dicts of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

from remat.measure import round_to_of, track_memory, unique_storage_bytes
from remat.solvers.chain import Chain

__all__ = ["StageCost", "profile_stages"]


@dataclasses.dataclass
class StageCost:
    """What running one stage costs (bytes, FLOPs); see :class:`Chain`."""

    out_bytes: int
    out_aliases_input: bool
    fwd_nosave: int
    fwd_save: int
    saved: int
    saves_input: bool
    saves_output: bool
    bwd: int
    param_grad_bytes: int
    input_grad_bytes: int
    fwd_flops: int
    bwd_flops: int


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _storage_ids(tree: Any) -> set[int]:
    return {id(t.untyped_storage()) for t in _tensors(tree)}


class _StageInput(torch.autograd.Function):
    """A copy of a leaf that is not a leaf, as a stage input is in a real step.

    In-place stages (``ReLU(inplace=True)``) refuse to modify a leaf that
    requires grad. The copy is made before tracking starts; its gradient is
    passed straight on to the leaf.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _SeedGradient(torch.autograd.Function):
    """A scalar root whose backward creates the stage's output gradients.

    In a real step the gradient of a stage's output is created by the next
    stage's backward and handed to autograd, which frees it as soon as the
    stage's first backward node has used it. Seeding the stage's backward
    with tensors we hold would keep it alive through the whole stage. The
    outputs themselves are not referenced either: like in a real step, they
    stay alive only if the stage saved them for backward.
    """

    @staticmethod
    def forward(ctx, *outputs: torch.Tensor) -> torch.Tensor:
        ctx.layouts = [(t.shape, t.stride(), t.dtype, t.device) for t in outputs]
        return outputs[0].new_zeros(())

    @staticmethod
    def backward(ctx, _: torch.Tensor):
        return tuple(
            torch.empty_strided(shape, stride, dtype=dtype, device=device).fill_(1)
            for shape, stride, dtype, device in ctx.layouts
        )


def _stage_input(x: Any) -> Any:
    return tree_map_only(torch.Tensor, lambda t: _StageInput.apply(t) if t.requires_grad else t, x)


def _profile_stage(
    run: Callable[[Any], Any],
    x: Any,
    params: Sequence[torch.Tensor],
    device,
    *,
    root: bool = False,
    owned: Sequence[bool] | None = None,
    exact: bool = True,
    seeded: Sequence[bool] | None = None,
    received: list[bool] | None = None,
) -> tuple[StageCost, Any]:
    """Costs of one stage on input ``x`` (leaves) and its output (detached).

    ``root``: the stage is the loss, whose gradient autograd keeps until the
    end of the backward (the chain counts it as held). ``owned[k]``: the
    gradient of ``params[k]`` is created by this stage's backward (it is the
    last stage to use it); other stages' contributions to a shared parameter
    (tied weights) are added into it in place and freed, so they count in the
    stage's backward peak but not as a gradient held afterwards. ``exact``:
    count at the dispatcher; otherwise, on a CUDA device, the allocator's
    figures (which include workspaces allocated inside operators).
    ``seeded[k]``: whether output ``k`` (of those requiring grad) gets a
    gradient in backward (the loss may use only some outputs); all by
    default. ``received``, if given, is filled with whether each input
    tensor got a gradient.
    """
    leaves = x
    x = _stage_input(leaves)
    x_storages = _storage_ids(x)
    with track_memory(device, exact=exact) as nosave:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda _: None):
            y = run(x)
    y_storages = _storage_ids(y)
    out_aliases_input = bool(y_storages) and y_storages <= x_storages
    out_bytes = sum(r.nbytes for r in {id(r): r for r in map(nosave.record_of, _tensors(y)) if r}.values())
    fwd_nosave, fwd_flops = nosave.peak_bytes, nosave.flops
    # The next stage's input; the copy made below is let go before its backward.
    output = tree_map_only(torch.Tensor, lambda t: t.detach().requires_grad_(t.requires_grad), y)
    del y

    saved_ids: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved_ids.add(id(t.untyped_storage()))
        return t

    del x
    x = _stage_input(leaves)  # a fresh copy: an in-place stage changed the first one
    x_storages = _storage_ids(x)
    with track_memory(device, exact=exact) as mem:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = run(x)
        fwd_save = mem.peak_bytes
        saves_input = bool(saved_ids & x_storages)
        saves_output = bool(saved_ids & (_storage_ids(y) - x_storages))
        saved = mem.current_bytes - out_bytes
        flops_before = mem.flops
        outputs = [t for t in _tensors(y) if t.requires_grad]
        if seeded is not None:
            outputs = [t for t, seed in zip(outputs, seeded) if seed]
        grad_bytes = unique_storage_bytes(outputs, mem.round_to)  # the output gradients, created in the backward
        if root:
            seeds, grads = outputs, [torch.ones_like(t) for t in outputs]
        else:
            seeds = [_SeedGradient.apply(*outputs)] if outputs else []
            grads = [torch.ones_like(t) for t in seeds]  # made now, not counted in the backward
            del y, outputs  # the output stays alive only if the stage saved it
        live_at_start = mem.current_bytes
        mem.mark()
        inputs = [t for t in [*_tensors(leaves), *params] if t.requires_grad]
        if seeds and inputs:
            torch.autograd.backward(seeds, grads, inputs=inputs)
        del grads, seeds
        if root:
            del y, outputs
        after = mem.peak_bytes  # since the mark: the backward's peak
        # Over what is live when the backward starts, output gradients aside
        # (the chain counts them, g(i), separately).
        bwd = after - live_at_start - (0 if root else grad_bytes)
        bwd_flops = mem.flops - flops_before
    if received is not None:
        received[:] = [t.grad is not None for t in _tensors(leaves)]
    owned = [True] * len(params) if owned is None else owned
    param_grad_bytes = unique_storage_bytes(
        [p.grad for p, own in zip(params, owned) if own and p.grad is not None], mem.round_to
    )
    input_grad_bytes = unique_storage_bytes([t.grad for t in _tensors(leaves) if t.grad is not None], mem.round_to)
    for t in [*params, *_tensors(leaves)]:
        t.grad = None
    cost = StageCost(
        out_bytes, out_aliases_input, fwd_nosave, fwd_save, saved, saves_input, saves_output,
        bwd, param_grad_bytes, input_grad_bytes, fwd_flops, bwd_flops,
    )
    return cost, output


def _leaf(tree: Any, requires_grad: bool) -> Any:
    """Fresh leaves; each requires grad if its tensor did (a stage output computed
    from the inputs alone does not, so no gradient is made for it)."""

    def make(t: torch.Tensor) -> torch.Tensor:
        grad = requires_grad and t.requires_grad and (t.is_floating_point() or t.is_complex())
        return t.detach().requires_grad_(grad)

    return tree_map_only(torch.Tensor, make, tree)


def profile_stages(
    stages: Sequence[tuple[str, Callable[[Any], Any], Sequence[torch.Tensor]]],
    first_input: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    *,
    base_bytes: int,
    device: torch.device | None = None,
    keys: Sequence[Hashable] | None = None,
    exact: bool = True,
) -> tuple[Chain, list[list[int]]]:
    """Measure every stage (plus the loss, appended) as a chain.

    Args:
        stages: ``(name, run, trainable_tensors)`` per stage; ``run(x)`` maps
            the previous stage's output to this one's.
        first_input: what the first stage receives (the model input).
        loss_fn: model output -> scalar loss; the chain's last stage.
        base_bytes: bytes live through the whole step (parameters, inputs).
        keys: optional structural key per stage: stages with equal keys (and
            equal inputs) compute the same thing on other parameters, so they
            are measured once (a 1000-layer ResNet has a handful of kinds).
        exact: count bytes at the dispatcher (fake tensors, any device);
            ``False`` on real CUDA tensors takes the allocator's figures.

    Returns the chain and the grouping of stage indices into chain stages: a
    stage whose output only aliases its input (a view, an in-place op) is
    merged into the stage before it.
    """
    costs: list[StageCost] = []
    groups: list[list[int]] = []
    names: list[str] = []
    # Per group: its input, whether that requires grad, its runs, parameters and keys.
    members: list[tuple[Any, bool, list[Callable[[Any], Any]], list[torch.Tensor], list[Hashable]]] = []
    cache: dict[Hashable, tuple[StageCost, Any]] = {}

    # A parameter's gradient is created by the last stage that uses it (the first in backward).
    last_use = {id(p): index for index, (_, _, params) in enumerate(stages) for p in params}

    def profile(key: Hashable | None, run, x, requires_grad: bool, params, upto: int) -> tuple[StageCost, Any]:
        """One stage's cost; stages of the same structure on the same input are measured once."""
        owned = tuple(last_use[id(p)] <= upto for p in params)
        if key is not None:
            key = (key, requires_grad, owned, _signature(x))
            if key in cache:
                cost, template = cache[key]
                return cost, _materialize(template)
        cost, output = _profile_stage(run, _leaf(x, requires_grad), params, device, owned=owned, exact=exact)
        if key is not None:
            cache[key] = (cost, _template(output))
        return cost, output

    keys = list(keys) if keys is not None else [None] * len(stages)
    current = first_input
    first_requires_grad = any(t.requires_grad for t in _tensors(first_input))
    for index, ((name, run, params), key) in enumerate(zip(stages, keys)):
        requires_grad = first_requires_grad or index > 0
        cost, output = profile(key, run, current, requires_grad, params, index)
        if cost.out_aliases_input and costs:
            # A view or an in-place op: merged into the stage before, and the
            # merged stage profiled again as one (its backward frees the
            # alias's saved output and gradient before the first part runs,
            # which per-part figures cannot tell).
            group_input, group_grad, runs, group_params, group_keys = members[-1]
            runs.append(run)
            group_params.extend(p for p in params if all(p is not q for q in group_params))
            group_keys.append(key)
            group_key = None if None in group_keys else tuple(group_keys)
            cost, output = profile(group_key, _chained(runs), group_input, group_grad, group_params, index)
            groups[-1].append(index)
            costs[-1] = cost
        else:
            members.append((current, requires_grad, [run], list(params), [key]))
            groups.append([index])
            costs.append(cost)
            names.append(name)
        current = output
    loss_input = _leaf(current, True)
    received: list[bool] = []
    loss_cost, _ = _profile_stage(loss_fn, loss_input, [], device, root=True, exact=exact, received=received)
    seeded = [got for t, got in zip(_tensors(loss_input), received) if t.requires_grad]
    if members and not all(seeded):
        # The loss reads only some outputs: only those get a gradient, so the
        # last model stage's backward is measured again, seeded with just them.
        group_input, group_grad, runs, group_params, _ = members[-1]
        owned = tuple(last_use[id(p)] <= len(stages) - 1 for p in group_params)
        costs[-1], _ = _profile_stage(
            _chained(runs), _leaf(group_input, group_grad), group_params, device,
            owned=owned, exact=exact, seeded=seeded,
        )
    costs.append(loss_cost)
    names.append("loss")
    x_bytes = unique_storage_bytes(_tensors(first_input), round_to_of(device))
    return _chain_of(costs, x_bytes, base_bytes, names), groups


def _signature(tree: Any) -> Hashable:
    """Structure, shapes, strides, dtypes and requires_grad of a stage input."""
    leaves, spec = tree_flatten(tree)
    return str(spec), tuple(
        (tuple(t.shape), t.stride(), t.dtype, t.device.type, t.requires_grad)
        if isinstance(t, torch.Tensor)
        else repr(t)
        for t in leaves
    )


@dataclasses.dataclass(frozen=True)
class _Layout:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool


def _template(tree: Any) -> Any:
    return tree_map_only(
        torch.Tensor, lambda t: _Layout(tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad), tree
    )


def _materialize(template: Any) -> Any:
    """Tensors laid out as in ``template`` (their values do not matter: fake, or only profiled)."""
    return tree_map_only(
        _Layout,
        lambda x: torch.empty_strided(x.shape, x.stride, dtype=x.dtype, device=x.device).requires_grad_(
            x.requires_grad
        ),
        template,
    )


def _chained(runs: Sequence[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """One run that applies ``runs`` in order."""

    def run(x: Any) -> Any:
        for part in runs:
            x = part(x)
        return x

    return run


def _chain_of(costs: list[StageCost], x_bytes: int, base_bytes: int, names: list[str]) -> Chain:
    col = lambda field: [getattr(c, field) for c in costs]  # noqa: E731
    act = [x_bytes, *col("out_bytes")]
    # The gradient of a(i) is produced by stage i+1's backward; the loss's by autograd (a scalar 1).
    grad = [*col("input_grad_bytes"), act[-1]]
    return Chain.from_arrays(
        act_bytes=act,
        grad_bytes=grad,
        fwd_nosave_peak=col("fwd_nosave"),
        fwd_save_peak=col("fwd_save"),
        saved_bytes=col("saved"),
        saves_input=col("saves_input"),
        saves_output=col("saves_output"),
        bwd_peak=col("bwd"),
        param_grad_bytes=col("param_grad_bytes"),
        fwd_flops=col("fwd_flops"),
        bwd_flops=col("bwd_flops"),
        base_bytes=base_bytes,
        output_held=True,
        names=tuple(names),
    )
