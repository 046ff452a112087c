"""Profile a sequential model, stage by stage, into a :class:`~remat.chain.Chain`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from remat.profile.stages import profile_selectively, profile_stages
from remat.execute.engine import run_selective
from remat.execute.recompute import batch_norms
from remat.measure.step import as_tuple, default_loss, step_model
from remat.measure.tracker import round_to_of, unique_storage_bytes
from remat.chain.model import Chain

__all__ = ["SequentialProfile", "profile_sequential", "sequential_stages"]


@dataclasses.dataclass(frozen=True)
class SequentialProfile:
    """A chain and the stages it describes.

    ``stage_pieces[i]`` lists the module indices that make stage ``i + 1`` (a stage
    whose output aliases its input, such as a view or an in-place activation,
    is merged into the stage before it). The loss is the chain's last stage
    and is not in ``stage_pieces``.
    """

    chain: Chain
    stage_pieces: tuple[tuple[int, ...], ...]
    plainly: frozenset[int] = frozenset()  # chain stages (1-based) that cannot run selectively


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


def _run_all(modules: Sequence[nn.Module], x):
    for module in modules:
        x = module(x)
    return x


def profile_sequential(
    module: nn.Module | Sequence[nn.Module],
    example_input: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    fake: bool = True,
    selective: bool = False,
) -> SequentialProfile:
    """Measure every stage of a sequential model (plus the loss) as a chain.

    With ``selective``, every stage is measured again run selectively
    (:func:`remat.execute.engine.run_selective`), for plans with selective segments.

    Example:
        >>> import torch
        >>> from remat.profile.sequential import profile_sequential
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> profile_sequential(net, torch.randn(4, 8)).chain.n   # 3 modules + the loss
        4
    """
    stages = sequential_stages(module)
    holder = nn.ModuleList(stages)  # names "0.weight", ... for the parameters
    inputs = as_tuple(example_input)
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
        raise TypeError("a sequential model takes one tensor input; pass example_input as a tensor")
    with step_model(holder, inputs[0], fake=fake) as (copy, (x,)):
        specs = [
            (f"{index}:{type(stage).__name__}", stage, [p for p in stage.parameters() if p.requires_grad])
            for index, stage in enumerate(copy)
        ]
        base = unique_storage_bytes([*copy.parameters(), *copy.buffers(), x], round_to_of(x.device))
        chain, stage_pieces = profile_stages(specs, x, loss_fn or default_loss, base_bytes=base, device=x.device)
        plainly: frozenset[int] = frozenset()
        if selective:
            # Each chain stage (its modules together: an in-place one must not change the
            # input its region keeps) runs as one selective region.
            def stage_specs(selectively: bool) -> list:
                out = []
                for pieces in stage_pieces:
                    modules = [copy[i] for i in pieces]
                    run = functools.partial(_run_all, modules)
                    if selectively:
                        run = functools.partial(run_selective, run, batch_norms(modules))
                    params = [p for m in modules for p in m.parameters() if p.requires_grad]
                    out.append((" + ".join(specs[i][0] for i in pieces), run, params))
                return out

            measured, same, plainly = profile_selectively(
                stage_specs(True), stage_specs(False), x, loss_fn or default_loss, base_bytes=base, device=x.device
            )
            if len(same) != len(stage_pieces):
                raise RuntimeError(f"run selectively, the modules form other stages: {same} for {stage_pieces}")
            chain = chain.with_selective(measured)
    return SequentialProfile(chain, tuple(tuple(g) for g in stage_pieces), plainly)
