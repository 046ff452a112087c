"""Profile a sequential model, stage by stage, into a :class:`~remat.solvers.chain.Chain`.

Each stage is run on its own, on fake tensors by default, under the exact
storage tracker: once forward saving nothing for backward (as inside a
checkpointed segment), once forward saving (as normally), then backward. The
numbers recorded are exactly what the chain cost model needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from remat.measure import as_tuple, default_loss, step_tensors, track_memory
from remat.solvers.chain import Chain

__all__ = ["SequentialProfile", "profile_sequential", "sequential_stages"]


@dataclasses.dataclass(frozen=True)
class SequentialProfile:
    """A chain and the stages it describes.

    ``groups[i]`` lists the module indices that make stage ``i + 1`` (a stage
    whose output aliases its input, such as a view or an in-place activation,
    is merged into the stage before it). The loss is the chain's last stage
    and is not in ``groups``.
    """

    chain: Chain
    groups: tuple[tuple[int, ...], ...]


def sequential_stages(module: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """The stages of an ``nn.Sequential`` or of a list of modules."""
    if isinstance(module, nn.Sequential):
        return list(module)
    if isinstance(module, (list, tuple, nn.ModuleList)) and all(isinstance(m, nn.Module) for m in module):
        return list(module)
    raise TypeError(
        f"expected an nn.Sequential or a list of modules, got {type(module).__name__}; "
        "for any other model use remat.optimize(model, example_inputs)"
    )


def _stage_params(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@dataclasses.dataclass
class _StageCost:
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


def _profile_stage(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params) -> tuple[_StageCost, torch.Tensor]:
    """Costs of one stage on input ``x`` (a leaf) and its output (detached)."""
    x_storage = x.untyped_storage()
    with track_memory() as nosave, torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda _: None):
        y = run(x)
    out_aliases_input = y.untyped_storage() is x_storage
    out_bytes = 0 if out_aliases_input else nosave.record_of(y).nbytes if nosave.record_of(y) else 0
    fwd_nosave, fwd_flops = nosave.peak_bytes, nosave.flops
    del y

    saved_ids: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved_ids.add(id(t.untyped_storage()))
        return t

    with track_memory() as mem:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = run(x)
        fwd_save = mem.peak_bytes
        saves_input = id(x_storage) in saved_ids
        saves_output = id(y.untyped_storage()) in saved_ids and not out_aliases_input
        saved = mem.current_bytes - out_bytes
        flops_before = mem.flops
        grad_out = torch.ones_like(y)
        start, live_at_start = len(mem.timeline), mem.current_bytes
        leaves = [t for t in [x, *params] if t.requires_grad]
        if y.requires_grad and leaves:
            torch.autograd.backward(y, grad_out, inputs=leaves)
        del grad_out
        after = [live for _, live in mem.timeline[start:]]
        bwd = max(after, default=live_at_start) - live_at_start
        bwd_flops = mem.flops - flops_before
    param_grads = [p.grad for p in params if p.grad is not None]
    param_grad_bytes = sum({id(g.untyped_storage()): g.untyped_storage().nbytes() for g in param_grads}.values())
    input_grad_bytes = x.grad.untyped_storage().nbytes() if x.grad is not None else 0
    for p in params:
        p.grad = None
    x.grad = None
    cost = _StageCost(
        out_bytes, out_aliases_input, fwd_nosave, fwd_save, saved, saves_input, saves_output,
        bwd, param_grad_bytes, input_grad_bytes, fwd_flops, bwd_flops,
    )
    return cost, y.detach()


def profile_sequential(
    module: nn.Module | Sequence[nn.Module],
    example_input: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    fake: bool = True,
) -> SequentialProfile:
    """Measure every stage of a sequential model (plus the loss) as a chain.

    Example:
        >>> import torch
        >>> from remat.capture.sequential import profile_sequential
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> profile_sequential(net, torch.randn(4, 8)).chain.n   # 3 modules + the loss
        4
    """
    stages = sequential_stages(module)
    holder = nn.ModuleList(stages)  # names "0.weight", ... for the parameters
    loss_fn = loss_fn or default_loss
    (first,) = as_tuple(example_input) if len(as_tuple(example_input)) == 1 else (None,)
    if first is None or not isinstance(first, torch.Tensor):
        raise TypeError("a sequential model takes one tensor input; pass example_input as a tensor")
    with step_tensors(holder, first, fake=fake) as (tensors, inputs, _):
        x = inputs[0]
        base_bytes = sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in [*tensors.values(), x]}.values())
        costs: list[_StageCost] = []
        groups: list[list[int]] = []
        names: list[str] = []
        current = x
        for index, stage in enumerate(stages):
            params = _stage_params(f"{index}.", tensors)

            def run(t, stage=stage, params=params):
                return torch.func.functional_call(stage, params, (t,))

            leaf = current.detach().requires_grad_(current.requires_grad or index > 0)
            cost, current = _profile_stage(run, leaf, [p for p in params.values() if p.requires_grad])
            if cost.out_aliases_input and costs:
                groups[-1].append(index)
                costs[-1] = _merge(costs[-1], cost)
            else:
                groups.append([index])
                costs.append(cost)
                names.append(f"{index}:{type(stage).__name__}")
        leaf = current.detach().requires_grad_(True)
        loss_cost, _ = _profile_stage(loss_fn, leaf, [])
        costs.append(loss_cost)
        names.append("loss")
    return SequentialProfile(_chain_of(costs, x, base_bytes, names), tuple(tuple(g) for g in groups))


def _merge(into: _StageCost, alias: _StageCost) -> _StageCost:
    """Fold a stage whose output aliases its input into the stage before.

    Approximate for the merged stage's transient peaks (each part's peak is
    taken on top of the previous part's retained bytes); exact for views and
    in-place activations, which allocate nothing in forward.
    """
    return dataclasses.replace(
        into,
        fwd_nosave=max(into.fwd_nosave, into.out_bytes + alias.fwd_nosave),
        fwd_save=max(into.fwd_save, into.out_bytes + into.saved + alias.fwd_save),
        saved=into.saved + alias.saved,
        saves_output=into.saves_output or alias.saves_output or alias.saves_input,
        bwd=max(into.bwd, alias.bwd),
        param_grad_bytes=into.param_grad_bytes + alias.param_grad_bytes,
        fwd_flops=into.fwd_flops + alias.fwd_flops,
        bwd_flops=into.bwd_flops + alias.bwd_flops,
    )


def _chain_of(costs: list[_StageCost], x: torch.Tensor, base_bytes: int, names: list[str]) -> Chain:
    col = lambda field: [getattr(c, field) for c in costs]  # noqa: E731
    x_bytes = x.untyped_storage().nbytes()
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
