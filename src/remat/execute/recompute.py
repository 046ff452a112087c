"""A recomputed region: run a function saving nothing for backward, and run it again
when the backward reaches it, up to the last tensor that backward needs.

It is non-reentrant activation checkpointing (``torch.utils.checkpoint`` with
``use_reentrant=False`` and early stop), cut down to what the segment engine
needs.

NOTE [a region of our own]
    ``torch.utils.checkpoint`` handles every case: nesting, graph-exec groups,
    compilation, determinism checks, debug logs, selective policies. Each call
    pays for them in Python: several times the forward and backward of a small
    block (``benchmarks/executor_profile.py`` measures both), and a plan has
    a region per recomputed segment. A region here is the same mechanism with
    nothing else:

    * Forward: the function runs under saved-tensor hooks whose pack gives
      autograd an empty holder for each tensor it saves; the region keeps
      the function's inputs as autograd would, through the saved-tensor hooks
      around it (so remade values remake them too; their versions are checked
      when it recomputes), the RNG states and the autocast settings.
    * Backward: the first hook to fire recomputes. A gradient hook on each
      output fires just before the region's first backward node runs
      (otherwise nodes that need no saved tensor, views and adds, would run
      first and hold their gradients through the recompute); an unpack that
      finds its holder empty is the fallback. The recompute replays the
      function with the forward's RNG states and autocast settings and
      BatchNorm's momentum at 0 (:class:`RunningStatsFrozen`), fills the
      holders in the order the forward packed them and stops at the last
      one (early stop). An unpack hands its tensor over and empties the
      holder, so each recomputed tensor lives until its backward node lets
      it go, as a kept one would.
    * The region (and the inputs it keeps) lives as long as anything saved
      in it does; the output hooks let go of it when the first one fires.
    * Each backward through a retained graph recomputes again (the graph
      task's id tells them apart).

    Plans with nested checkpoints or offload run under ``torch.utils.checkpoint``
    without early stop, as the chain model prices them, and selective stages with
    its selective checkpointing.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["run_recomputed", "RunningStatsFrozen", "RandomState", "batch_norms"]

_AUTOCAST_DEVICES = ("cpu", "cuda")


def batch_norms(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """The BatchNorm-like modules (running statistics) in or under ``modules``."""
    return [
        m for root in modules for m in root.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


class RunningStatsFrozen:
    """Recompute BatchNorm without changing its running statistics.

    With momentum 0 the update ``(1 - m) * running + m * batch`` leaves the
    running statistics exactly as they are, while the batch statistics, the
    output and the tensors saved for backward stay the same as in the first
    forward; the ``num_batches_tracked`` increment is undone afterwards where
    it happened (a recompute that stops early skips the last BatchNorms).
    Nothing is allocated (a copy-and-restore would show up in the peak). It
    may be entered again, once per recompute (a second backward through a
    retained graph recomputes again). ``norms`` as :func:`batch_norms` lists
    them; those in training mode are frozen.
    """

    def __init__(self, norms: Sequence[nn.Module]):
        self.norms = [m for m in norms if m.training]

    def __enter__(self) -> None:
        self.momenta = [m.momentum for m in self.norms]
        self.counted = [None if m.num_batches_tracked is None else m.num_batches_tracked._version for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for m, momentum, version in zip(self.norms, self.momenta, self.counted):
                m.momentum = momentum
                if version is not None and m.num_batches_tracked._version != version:
                    m.num_batches_tracked.sub_(1)


class RandomState:
    """The state of a device's default generator, to run operators again with the same draws."""

    __slots__ = ("device", "state")

    def __init__(self, device: torch.device):
        self.device = device
        self.state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        now = RandomState(self.device)
        _set_rng_state(self.device, self.state)
        try:
            yield
        finally:
            _set_rng_state(self.device, now.state)


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class _Holder:
    """What autograd keeps for one tensor the region saved: the tensor, once recomputed."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None


class _StopRecompute(Exception):
    """The recompute has made the last tensor the backward needs (early stop)."""


class _Region:
    """One recomputed region (NOTE [a region of our own])."""

    def __init__(self, function: Callable, norms: Sequence[nn.Module], args: tuple):
        self.function = function
        self.norms = norms
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        # The inputs are kept as autograd would keep them here, through the saved-tensor hooks
        # around the region (remade values, offload), whose unpack gives them back.
        self.hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.tensors_at = [(i, a.requires_grad) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        if self.hooks is not None:
            args = list(args)
            for i, _ in self.tensors_at:
                args[i] = self.hooks[0](args[i])
        self.args = tuple(args)
        self.versions = [(weakref.ref(t), t._version) for t in tensors]
        devices = {torch.device("cpu")} | {t.device for t in tensors if t.device.type == "cuda"}
        self.rng = [RandomState(d) for d in devices]
        self.autocast = [
            (d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES
        ]
        self.holders: list[weakref.ref] = []
        self.task: int | None = None  # the graph task whose backward it recomputed for

    def pack(self, _tensor: torch.Tensor) -> _Holder:
        holder = _Holder()
        self.holders.append(weakref.ref(holder))
        return holder

    def unpack(self, holder: _Holder) -> torch.Tensor:
        task = torch._C._current_graph_task_id()
        if task != self.task or task == -1:
            self.recompute(task)
        tensor, holder.tensor = holder.tensor, None
        if tensor is None:
            raise RuntimeError(
                "remat: a tensor saved in a recomputed segment was unpacked twice in one backward; "
                "read ctx.saved_tensors once per backward (or run the model with a plan without recompute)"
            )
        return tensor

    def start(self, _grad: torch.Tensor) -> None:
        """A gradient hook on an output: recompute before the region's backward begins."""
        task = torch._C._current_graph_task_id()
        if task != self.task:
            self.recompute(task)

    def recompute(self, task: int) -> None:
        self.task = task
        for tensor, version in self.versions:
            tensor = tensor()  # None if it is gone: then nothing changed it
            if tensor is not None and tensor._version != version:
                raise RuntimeError(
                    "remat: an input of a recomputed segment was changed in place after the segment ran, "
                    f"so its backward cannot recompute it (a tensor of shape {tuple(tensor.shape)}); "
                    "change a copy instead, or plan without recompute"
                )
        holders, filled = self.holders, 0
        args = self._inputs()  # before the contexts: unpacking may remake them, running operators

        def fill(tensor: torch.Tensor) -> None:
            nonlocal filled
            holder = holders[filled]()
            filled += 1
            if holder is not None:  # else its backward node is gone
                holder.tensor = tensor.detach() if tensor.requires_grad else tensor
            if filled == len(holders):
                raise _StopRecompute

        with (
            self._replayed(),
            self._autocast(),
            RunningStatsFrozen(self.norms),
            torch.autograd.graph.saved_tensors_hooks(fill, _never_unpacked),
            torch.enable_grad(),
        ):
            try:
                self.function(*args)
            except _StopRecompute:
                return
        raise RuntimeError(
            f"remat: a recomputed segment saved {filled} tensors for backward where its forward saved "
            f"{len(holders)}: its forward must do the same each time it runs (no control flow on data or "
            "on global state)"
        )

    def _inputs(self) -> tuple:
        if self.hooks is None:
            return self.args
        args = list(self.args)
        for i, requires_grad in self.tensors_at:
            tensor = self.hooks[1](args[i])
            # As autograd's unpack would: the recompute saves what the forward saved only with
            # the same inputs requiring grad.
            args[i] = tensor.detach().requires_grad_() if requires_grad and not tensor.requires_grad else tensor
        return tuple(args)

    def _replayed(self) -> contextlib.AbstractContextManager:
        """The generators of the forward's devices set to their states then, put back after."""
        stack = contextlib.ExitStack()
        for state in self.rng:
            stack.enter_context(state.replayed())
        return stack

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The forward's autocast settings, where they differ from those of now."""
        stack = contextlib.ExitStack()
        for device, enabled, dtype in self.autocast:
            if torch.is_autocast_enabled(device) != enabled or (enabled and torch.get_autocast_dtype(device) != dtype):
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        return stack


def _never_unpacked(_packed: None) -> None:
    raise AssertionError("remat: the graph a recompute builds is never run backward")


def run_recomputed(function: Callable, norms: Sequence[nn.Module], *args) -> Any:
    """``function(*args)``, saving nothing for backward; its backward recomputes it up to the
    last tensor it needs (NOTE [a region of our own]). ``norms``: the BatchNorms it may run
    (:func:`batch_norms`), frozen while it recomputes."""
    if not torch.is_grad_enabled():
        return function(*args)
    region = _Region(function, norms, args)
    with torch.autograd.graph.saved_tensors_hooks(region.pack, region.unpack):
        outputs = function(*args)
    if region.holders:  # else its backward needs nothing
        inputs = {id(t) for t in args if isinstance(t, torch.Tensor)}
        box = [region]

        def start(grad: torch.Tensor) -> None:
            if box:
                box.pop().start(grad)

        for t in pytree.tree_leaves(outputs):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None and id(t) not in inputs:
                t.register_hook(start)
    return outputs
