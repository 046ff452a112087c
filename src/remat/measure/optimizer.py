"""The optimizer's part of a training step: its state, held all step, and its ``step()``, run
with every gradient made.

A step is measured as training runs it once the optimizer has stepped before: its state
(Adam's two moments, SGD's momentum) exists when the step starts, and ``step()`` then
``zero_grad()`` end it. The optimizer that runs in a measured step is a new one of the same
kind and settings, over the measured module's parameters (fake ones on fake tensors), with
its state made by one step on zero gradients: the user's optimizer and its state are never
touched.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(4, 4)
    >>> opt = optimizer_like("adamw", list(net.parameters()), list(net.parameters()))
    >>> type(opt).__name__, state_bytes(opt)
    ('AdamW', 0)
"""

from __future__ import annotations

from typing import Union

import torch

from remat.measure.tracker import unique_storage_bytes

__all__ = ["NAMES", "OptimizerSpec", "describe", "optimizer_like", "state_bytes", "warm_up"]

#: An optimizer instance (its kind and per-group settings are used), or one of :data:`NAMES`.
OptimizerSpec = Union[torch.optim.Optimizer, str]

#: Optimizers by name, with torch's default settings (the learning rate does not change memory).
NAMES: dict[str, tuple[type[torch.optim.Optimizer], dict]] = {
    "sgd": (torch.optim.SGD, {}),
    "sgd-momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "adagrad": (torch.optim.Adagrad, {}),
    "adamax": (torch.optim.Adamax, {}),
    "adadelta": (torch.optim.Adadelta, {}),
    "nadam": (torch.optim.NAdam, {}),
    "radam": (torch.optim.RAdam, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
}


def describe(spec: OptimizerSpec | None) -> str:
    """The optimizer's kind, for plans and reports (``""``: none)."""
    if spec is None:
        return ""
    return spec.lower() if isinstance(spec, str) else type(spec).__name__


def optimizer_like(
    spec: OptimizerSpec, originals: list[torch.nn.Parameter], params: list[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """A new optimizer of ``spec``'s kind and settings over ``params``, where ``params[i]``
    stands for ``originals[i]`` (the model's parameters, as ``spec`` holds them).

    Raises ValueError for an unknown name, or an optimizer that holds tensors the model does
    not have.
    """
    if isinstance(spec, str):
        if spec.lower() not in NAMES:
            raise ValueError(f"no optimizer named {spec!r}: use one of {', '.join(NAMES)}, or pass an optimizer")
        kind, options = NAMES[spec.lower()]
        groups = [{"params": [p for p in params if p.requires_grad], **options}]
    elif isinstance(spec, torch.optim.Optimizer):
        kind = type(spec)
        standing = {id(o): p for o, p in zip(originals, params)}
        groups = []
        for group in spec.param_groups:
            missing = [o for o in group["params"] if id(o) not in standing]
            if missing:
                raise ValueError(
                    f"the {kind.__name__} holds {len(missing)} tensors that are not the model's parameters "
                    f"(shapes {[tuple(o.shape) for o in missing[:3]]}): pass an optimizer over the model's "
                    "parameters only, or its name"
                )
            groups.append({**group, "params": [standing[id(o)] for o in group["params"]]})
    else:
        raise TypeError(f"optimizer= takes a torch.optim.Optimizer or a name, not {type(spec).__name__}")
    for group in groups:
        # torch picks its foreach kernels (whole-model temporaries) for CUDA tensors, but never
        # for fake ones: decide as it would for the tensors they stand for.
        if group.get("foreach") is None and not group.get("fused"):
            group["foreach"] = any(p.device.type == "cuda" for p in group["params"])
    return kind(groups)


def warm_up(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer``'s state, as its first step does: one step on zero gradients (it may
    change the parameters: weight decay), then the gradients cleared."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def state_bytes(optimizer: torch.optim.Optimizer, round_to: int = 1) -> int:
    """Bytes of the tensors in ``optimizer``'s state (each storage once)."""
    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return unique_storage_bytes(tensors, round_to)
