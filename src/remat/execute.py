"""Execute: run a plan. Segments are recomputed in backward, gradients exact.

Recomputation uses ``torch.utils.checkpoint`` (non-reentrant) with the RNG
state restored, so dropout masks are the same as in the first forward, and
with BatchNorm running statistics left alone during the recompute, so they
are updated exactly once per step. With :class:`CheckpointOffload`, the kept
activations wait in pinned host memory instead of on the device.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

__all__ = [
    "CheckpointOffload",
    "CheckpointedSequential",
    "RematModule",
    "nested_starts",
    "stored_starts",
    "run_segment_recomputed",
    "segment_starts",
]


def segment_starts(groups: Sequence[Sequence[int]], checkpoints: Sequence[int]) -> tuple[int, ...]:
    """Chain checkpoints (kept stage outputs) as the indices of the parts (modules
    or graph pieces) where segments start; ``groups[i]`` lists the parts of chain
    stage ``i + 1``. A checkpoint past the parts (before the loss) starts none."""
    return tuple(_part(groups, c) for c in checkpoints if c <= len(groups))


def _part(groups: Sequence[Sequence[int]], c: int) -> int:
    """The part (module or graph piece) where chain boundary ``c``'s segment starts."""
    return groups[c - 1][-1] + 1 if c else 0


def nested_starts(groups: Sequence[Sequence[int]], inner: Sequence) -> dict[tuple[int, int], tuple[int, ...]]:
    """Nested chain checkpoints ``(l, r, (c1, ..))`` (see ``ChainSolution.inner``) as
    a map from a recomputed segment's parts ``(start, stop)`` to its inner starts."""
    return {(_part(groups, l), _part(groups, r)): tuple(_part(groups, c) for c in cs) for l, r, cs in inner}


def stored_starts(groups: Sequence[Sequence[int]], stored: Sequence[int]) -> frozenset[int]:
    """Starts of stored segments (chain boundaries, see ``ChainSolution.stored``) as parts."""
    return frozenset(_part(groups, c) for c in stored)


def _check_combination(nested: dict, stored: frozenset[int], offload: CheckpointOffload | None) -> None:
    """Refuse plan kinds the cost model does not combine."""
    if nested and offload is not None:
        raise ValueError("nested checkpoints cannot be offloaded: plan with one or the other")
    if stored and (nested or offload is not None):
        raise ValueError("stored segments are planned without nested checkpoints or offload")


@contextlib.contextmanager
def _running_stats_frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Recompute BatchNorm without changing its running statistics.

    With momentum 0 the update ``(1 - m) * running + m * batch`` leaves the
    running statistics exactly as they are, while the batch statistics, the
    output and the tensors saved for backward stay the same as in the first
    forward; the ``num_batches_tracked`` increment is undone afterwards.
    Nothing is allocated (a copy-and-restore would show up in the peak).
    """
    norms = [
        m for root in modules for m in root.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.sub_(1)


def run_segment_recomputed(function: Callable, modules: Sequence[nn.Module], *args):
    """Run ``function(*args)`` saving nothing for backward; recompute it in backward."""

    if torch.compiler.is_compiling():
        # Under torch.compile the checkpoint becomes a higher-order op: the
        # partitioner recomputes the segment's ops in the backward graph, and
        # buffer mutations (BatchNorm statistics) are not replayed. Dynamo
        # cannot trace set_checkpoint_early_stop nor an arbitrary context_fn.
        return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True)

    def contexts():
        return contextlib.nullcontext(), _running_stats_frozen(modules)

    def recompute_first(*inputs):
        return pytree.tree_map_only(
            torch.Tensor, lambda t: _RecomputeFirst.apply(t) if t.requires_grad else t, function(*inputs)
        )

    # Recompute whole segments (no early stop): the cost model counts them so.
    with set_checkpoint_early_stop(False):
        return checkpoint(
            recompute_first, *args, use_reentrant=False, preserve_rng_state=True, context_fn=contexts
        )


class _RecomputeFirst(torch.autograd.Function):
    """Identity on a segment's output whose backward, the segment's first, starts its recompute.

    Checkpoint recomputes a segment when backward first needs one of its saved
    tensors; backward nodes that need none (views, reshapes, adds) would run
    before that and hold their gradients through the recompute, which the
    cost model (recompute, then backward) does not count. Saving a tensor
    here makes the recompute the first thing the segment's backward does.
    It is an empty one, not the output: the recompute keeps whatever it saves
    until its backward, which never comes for an output the loss ignores.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(output.new_empty(0))
        return output

    @staticmethod
    def backward(ctx, grad):
        ctx.saved_tensors  # unpacking triggers the recompute
        return grad


def _saving(offload: CheckpointOffload | None, boundary):
    return contextlib.nullcontext() if offload is None else offload.saving(boundary)


class CheckpointOffload:
    """Keeps the checkpoints (recomputed segments' inputs) in pinned host memory.

    :meth:`saving` wraps a recomputed segment's run: ``torch.utils.checkpoint``
    saves the segment's inputs for the recompute through the saved-tensor
    hooks active around it (the operators inside the segment save through
    checkpoint's own hooks, which come first). The segment input given to
    :meth:`saving` is copied to pinned host memory on a side stream, so the
    copy overlaps the following forward compute, and the device copy is freed
    as soon as the forward moves on; the recompute in backward copies it back
    (``non_blocking``, ordered after the copy out). Anything else saved there
    (the model's own inputs) stays as it is, and on a non-CUDA tensor nothing
    is moved. Gradients are unchanged: the values come back bit for bit, with
    the same strides.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
        >>> run = CheckpointedSequential(list(net), [2], offload=CheckpointOffload())
        >>> torch.equal(run(torch.ones(1, 8)), net(torch.ones(1, 8)))  # on CPU: nothing moves
        True
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @contextlib.contextmanager
    def saving(self, boundary: torch.Tensor | None) -> Iterator[None]:
        """Offload ``boundary`` if the checkpoint run inside saves it."""
        if boundary is None or torch.compiler.is_compiling():
            yield
            return
        # Weakly: the hooks must not keep the device copy alive.
        wanted = weakref.ref(boundary)

        def pack(t: torch.Tensor):
            if t is not wanted():
                return t
            load = self._to_host(t)
            return t if load is None else _OnHost(load)

        def unpack(packed):
            return packed.load() if isinstance(packed, _OnHost) else packed

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def _to_host(self, t: torch.Tensor) -> Callable[[], torch.Tensor] | None:
        """Start copying ``t`` to the host; return what copies it back (``None``: left on its device)."""
        if t.device.type != "cuda":
            return None
        device = t.device
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        host = torch.empty_like(t, device="cpu", pin_memory=True)  # same strides
        stream.wait_stream(torch.cuda.current_stream(device))  # t is computed
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        t.record_stream(stream)  # the allocator reuses t's memory only after the copy

        def load() -> torch.Tensor:
            torch.cuda.current_stream(device).wait_event(copied)
            return host.to(device, non_blocking=True)

        return load


class _OnHost:
    """A saved tensor moved off the device, and how to bring it back.

    The copy back stays here until checkpoint drops what it saved, after the
    segment's backward, as the kept activation would without offload: freed
    earlier, at its last use inside a backward node, it would leave the
    device at a moment the stage profiles do not record.
    """

    __slots__ = ("_load", "_loaded")

    def __init__(self, load: Callable[[], torch.Tensor]):
        self._load = load
        self._loaded: torch.Tensor | None = None

    def load(self) -> torch.Tensor:
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded


class CheckpointedSequential(nn.Module):
    """A sequential model run with a checkpoint plan; a drop-in for the original.

    The stages are the user's own modules (parameters shared, nothing copied),
    so ``state_dict()`` has the same values (keys gain no prefix when the
    original is an ``nn.Sequential``: they are ``"0.weight"``, ... as before).

    Args:
        stages: the model's stages, in order.
        checkpoints: boundaries ``i`` (1..len(stages)) whose activation, the
            output of stage ``i``, is kept; every segment before the last one
            is recomputed in backward.
        groups: optional grouping of module indices into chain stages (from
            :func:`remat.capture.sequential.profile_sequential`); checkpoints
            then count groups, not modules.
        offload: keep the checkpoints in host memory with this.
        inner: checkpoints nested in recomputed segments, as in
            ``ChainSolution.inner`` (not with ``offload``).
        stored: starts (0 or a checkpoint) of segments that run normally,
            keeping what their backward needs, instead of being recomputed
            (as in ``ChainSolution.stored``).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
        >>> fast = CheckpointedSequential(list(net), checkpoints=[2])
        >>> torch.equal(fast(torch.ones(1, 8)), net(torch.ones(1, 8)))
        True
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        checkpoints: Sequence[int],
        groups: Sequence[Sequence[int]] | None = None,
        offload: CheckpointOffload | None = None,
        inner: Sequence = (),
        stored: Sequence[int] = (),
    ):
        super().__init__()
        for index, stage in enumerate(stages):
            self.add_module(str(index), stage)
        groups = groups or [[i] for i in range(len(stages))]
        self.boundaries = [0, *segment_starts(groups, checkpoints)]
        self.checkpoints = tuple(checkpoints)
        self.offload = offload
        self.nested = nested_starts(groups, inner)
        self.stored = stored_starts(groups, stored)
        _check_combination(self.nested, self.stored, offload)

    def _run(self, start: int, stop: int, x):
        for index in range(start, stop):
            x = self._modules[str(index)](x)
        return x

    def _run_segments(self, bounds: Sequence[int], x, offload: CheckpointOffload | None = None):
        """Segments between ``bounds``: all but the last (and the stored ones) recomputed in backward."""
        for start, stop in zip(bounds[:-2], bounds[1:-1]):
            if start in self.stored:
                x = self._run(start, stop, x)
                continue
            modules = [self._modules[str(i)] for i in range(start, stop)]
            # The model's input is the caller's: it stays where it is.
            with _saving(offload, x if start > 0 else None):
                x = run_segment_recomputed(self._run_nested, modules, start, stop, x)
        return self._run(bounds[-2], bounds[-1], x)

    def _run_nested(self, start: int, stop: int, x):
        inner = self.nested.get((start, stop))
        return self._run(start, stop, x) if inner is None else self._run_segments([start, *inner, stop], x)

    def forward(self, x):
        return self._run_segments([*self.boundaries, len(self._modules)], x, self.offload)


class RematModule(nn.Module):
    """Any traced model run with a checkpoint plan; a drop-in for the original.

    Made by :func:`remat.optimize`. It holds the model's own children,
    parameters and buffers under the same names (``state_dict()`` is the
    model's, and an optimizer over either module's parameters trains both),
    and runs the traced graph piece by piece, recomputing every segment before
    the last kept activation in backward. In eval mode or without autograd
    (``torch.no_grad``) it calls the model's own forward: nothing is saved for
    backward there, so there is nothing to plan. With ``offload``, the kept
    activations wait in host memory (:class:`CheckpointOffload`).
    """

    def __init__(
        self,
        model: nn.Module,
        captured: Any,
        boundaries: Sequence[int],
        plan: Any = None,
        offload: CheckpointOffload | None = None,
        nested: dict[tuple[int, int], tuple[int, ...]] | None = None,
        stored: frozenset[int] = frozenset(),
    ):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in model._non_persistent_buffers_set)
        self._model = [model]  # the user's root module, not a submodule: state_dict stays the model's
        self._captured = captured
        self._captured_training = model.training  # the graph is specialised to this mode
        self._signature = inspect.signature(model.forward)
        captured.check_boundaries(boundaries)
        self.boundaries = tuple(boundaries)
        self.plan = plan
        self.offload = offload
        self.nested = nested or {}  # recomputed segment (start, stop) -> its inner segment starts
        self.stored = stored  # starts of segments run normally (not recomputed)
        _check_combination(self.nested, self.stored, offload)
        self.training = model.training  # not .train(): the children keep their own flags

    def train(self, mode: bool = True) -> RematModule:
        """Set train/eval mode here, on the model's children, and on the model itself."""
        super().train(mode)
        self._model[0].training = mode
        return self

    def _inputs(self, args: tuple, kwargs: dict) -> tuple:
        """The graph's flat inputs for a call with ``args`` and ``kwargs``."""
        codegen = self._captured.codegen
        if getattr(codegen, "pytree_info", None) is not None:  # an exported graph
            return tuple(fx_pytree.tree_flatten_spec(([*args], kwargs), codegen.pytree_info.in_spec))
        names = self._captured.input_names
        if not kwargs and len(args) == len(names):
            return args
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.arguments[name] for name in names)

    def _run(self, start: int, stop: int, outside: tuple[int, ...], *args):
        """Pieces ``start..stop-1`` on the outputs of pieces ``outside`` (``args``
        begins with them) and the model inputs; returns the last piece's output.
        A segment with nested checkpoints recomputes its inner segments."""
        values, inputs = dict(zip(outside, args)), args[len(outside) :]
        inner = self.nested.get((start, stop))
        if inner is None:
            return self._run_on(start, stop, values, inputs)
        return self._run_segments([start, *inner, stop], values, inputs)

    def _run_segments(self, bounds: Sequence[int], kept: dict[int, Any], inputs: tuple, offload=None):
        """Segments between ``bounds``, all but the last (and the stored ones) recomputed
        in backward; ``kept`` holds the earlier outputs they read. Returns the last
        piece's output."""
        captured = self._captured
        for start, stop in zip(bounds[:-2], bounds[1:-1]):
            outside = captured.outside_reads(start, stop)
            args = (start, stop, outside, *(kept[q] for q in outside), *inputs)
            if start in self.stored:
                kept[stop - 1] = self._run(*args)
            else:
                with _saving(offload, kept.get(start - 1)):
                    kept[stop - 1] = run_segment_recomputed(self._run, captured.submodules(start, stop, self), *args)
            # In place: a nested caller holds this dict until its recompute returns.
            for q in [q for q in kept if captured.last_reader[q] < stop and q != stop - 1]:
                del kept[q]
        return self._run_on(bounds[-2], bounds[-1], kept, inputs)

    def _run_on(self, start: int, stop: int, values: dict[int, Any], inputs: tuple):
        """Pieces ``start..stop-1``; ``values`` maps earlier pieces to their outputs
        and loses each one once no later piece reads it, so it can be freed."""
        captured = self._captured
        for index in range(start, stop):
            read = captured.reads[index]
            values[index] = captured.modules[index](tuple(values[q] for q in read), self, *inputs)
            for q in read:
                if captured.last_reader[q] == index:
                    del values[q]
        return values.pop(stop - 1)

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            # Nothing to save for backward: the model's own forward, in its own mode.
            return self._model[0](*args, **kwargs)
        if not self._captured_training:
            raise RuntimeError(
                "this module was planned with the model in eval mode, and the captured graph keeps "
                "eval-mode behaviour (dropout off, BatchNorm running statistics): call model.train() "
                "before remat.optimize to train with it"
            )
        inputs = self._inputs(args, kwargs)
        bounds = [0, *self.boundaries, len(self._captured.modules)]
        return self._outputs(self._run_segments(bounds, {}, inputs, self.offload))

    def _outputs(self, out):
        """The graph's flat output in the model's output structure (``CodeGen.process_outputs``).

        Written out here because torch.compile (Dynamo) does not trace into torch.fx.
        """
        info = getattr(self._captured.codegen, "pytree_info", None)
        if info is None or info.out_spec is None:
            return out
        return pytree.tree_unflatten(out if isinstance(out, (list, tuple)) else [out], info.out_spec)

    def extra_repr(self) -> str:
        kept = ", ".join(self.plan.checkpoint_names) if self.plan is not None else str(self.boundaries)
        nested = f" (and {sum(map(len, self.nested.values()))} nested in recomputes)" if self.nested else ""
        stored = f" ({len(self.stored)} segments stored, not recomputed)" if self.stored else ""
        return f"keeps: {kept}{nested}{stored}" + (" (offloaded to host memory)" if self.offload is not None else "")
