"""Training loops whose batches change shape: a plan per input shape, made when it first comes.

A plan is made for one input size (and a graph captured by ``torch.export`` or compiled is
specialised to it). :class:`PerShapeModule` keeps one planned module per input signature,
the most recently used ones up to a bound, and plans for a new one when it arrives: every
step runs a plan made for its own shapes, none falls back to storing everything.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from remat.execute.module import StandIn
from remat.measure.step import as_call

__all__ = ["PerShapeModule", "input_signature", "shape_key"]

logger = logging.getLogger("remat")


def input_signature(values: Sequence[Any]) -> tuple:
    """What a plan or its compiled graphs are specialised to in a call: each tensor's shape,
    dtype, device and whether it requires grad (the backward computes its gradient only then);
    other values as they are."""
    return tuple(
        (tuple(t.shape), t.dtype, t.device.type, t.requires_grad) if isinstance(t, torch.Tensor) else repr(t)
        for t in values
    )


def shape_key(args: tuple, kwargs: dict) -> tuple:
    """The :func:`input_signature` of a call's arguments, with their structure."""
    leaves, spec = tree_flatten((args, kwargs))
    return input_signature(leaves), str(spec)


class PerShapeModule(StandIn):
    """The model trained with a plan for each input shape; a drop-in for the original.

    Made by ``remat.optimize(..., per_shape=N)``. It holds the model's own children,
    parameters and buffers under the same names (as every module remat returns), and the
    planned modules of the last ``max_shapes`` input signatures (:func:`shape_key`): a call
    with a signature it has not seen plans for it first (logged on the ``remat`` logger),
    and the least recently used plan goes when there are more. In eval mode or without
    autograd it calls the model's own forward.
    """

    def __init__(
        self, model: nn.Module, make: Callable[[tuple, dict], nn.Module], example_inputs: Any, max_shapes: int = 8
    ):
        if max_shapes < 1:
            raise ValueError(f"per_shape keeps at least one plan: got {max_shapes}")
        super().__init__(model)
        self.max_shapes = max_shapes
        self._make = make
        # Not submodules: each shares the model's tensors, which would be listed again.
        self._planned: collections.OrderedDict[tuple, nn.Module] = collections.OrderedDict()
        args, kwargs = as_call(example_inputs)
        self._planned[shape_key(args, kwargs)] = make(args, kwargs)  # the example's plan, made now

    @property
    def plans(self) -> dict:
        """The plans kept, by input signature (:func:`shape_key`), the most recently used last."""
        return {key: module.plan for key, module in self._planned.items()}

    @property
    def plan(self) -> Any:
        """The plan of the most recent call's shapes (None before the first)."""
        return next(reversed(self._planned.values())).plan if self._planned else None

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self._model[0](*args, **kwargs)  # nothing to save for backward
        key = shape_key(args, kwargs)
        module = self._planned.get(key)
        if module is None:
            logger.info("remat: planning for new input shapes %s (%d planned before)", key[0], len(self._planned))
            module = self._make(args, kwargs)
            self._planned[key] = module
            if len(self._planned) > self.max_shapes:
                dropped, _ = self._planned.popitem(last=False)
                logger.info("remat: dropped the plan for input shapes %s (at most %d kept)", dropped[0], self.max_shapes)
        self._planned.move_to_end(key)
        return module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"a plan per input shape: {len(self._planned)} of at most {self.max_shapes} kept"
