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
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    set_checkpoint_early_stop,
)
from remat.measure import flop_formula
from remat.remake import remake_cheap

__all__ = [
    "CheckpointOffload",
    "CheckpointedSequential",
    "RematModule",
    "nested_starts",
    "stored_starts",
    "run_segment_recomputed",
    "run_selective",
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


def _stage_ranges(stage_starts: Sequence[int], start: int, stop: int) -> list[tuple[int, int]]:
    """The parts ``[a, b)`` of each chain stage between parts ``start`` and ``stop`` (stage bounds)."""
    bounds = [start, *sorted(s for s in stage_starts if start < s < stop), stop]
    return list(zip(bounds[:-1], bounds[1:]))


def _check_selective(bounds: Sequence[int], stored: frozenset[int], selective: frozenset[int]) -> None:
    """Stages run selectively lie in stored segments or the last: inside a recomputed segment's
    first forward, selective checkpointing's cache would live on to the backward."""
    for s in selective:
        l = max(b for b in bounds[:-1] if b <= s)
        if l not in stored and l != bounds[-2]:
            raise ValueError(
                f"the stage starting at part {s} runs selectively inside a recomputed segment (from part {l}): "
                "only stages of stored segments and of the last one may"
            )


def _check_combination(nested: dict, stored: frozenset[int], offload: CheckpointOffload | None) -> None:
    """Refuse plan kinds the cost model does not combine."""
    if nested and offload is not None:
        raise ValueError("nested checkpoints cannot be offloaded: plan with one or the other")
    if stored and (nested or offload is not None):
        raise ValueError("stored and selective segments are planned without nested checkpoints or offload")


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


def _save_what_has_flops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the outputs of operators that count FLOPs (matmuls, convolutions, attention);
    recompute the rest (normalisations, activations, dropout, adds, views), which count none."""
    return CheckpointPolicy.MUST_SAVE if flop_formula(op) is not None else CheckpointPolicy.PREFER_RECOMPUTE


# Newer torch asks whether SAC's cached tensors go through saved-tensor hooks around the
# region (and warns when it is not told): they do not, as in older releases.
_SAC_HOOKS = (
    {"respect_saved_tensors_hooks": False}
    if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters
    else {}
)


def run_selective(function: Callable, modules: Sequence[nn.Module], *args):
    """Run ``function(*args)`` keeping only its inputs and what its costly operators make.

    Selective checkpointing (``torch.utils.checkpoint`` with
    :func:`~torch.utils.checkpoint.create_selective_checkpoint_contexts`):
    the outputs of operators that count FLOPs are cached, everything else
    the backward needs is recomputed from them when the backward reaches
    the region, at no FLOPs. Dropout is replayed with the same RNG state and
    BatchNorm recomputed without touching its running statistics, so
    gradients and buffers are exactly those of a plain run.
    """
    if torch.compiler.is_compiling():
        # The compiler's partitioner chooses what to save in compiled graphs.
        return function(*args)

    def contexts():
        forward, recompute = create_selective_checkpoint_contexts(_save_what_has_flops)
        # The statistics are put back after the recompute mode is left: outside the region.
        return forward, _entered_together(_running_stats_frozen(modules), recompute)

    with set_checkpoint_early_stop(True):
        return checkpoint(
            function, *args, use_reentrant=False, preserve_rng_state=True, context_fn=contexts, **_SAC_HOOKS
        )


@contextlib.contextmanager
def _entered_together(*managers) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield


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
        selective: chain stages (1-based, as checkpoints count them) that
            run selectively, each on its own (:func:`run_selective`); only
            stages of stored or last segments may.

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
        selective: Sequence[int] = (),
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
        self.selective = frozenset(groups[i - 1][0] for i in selective)  # where those stages start
        self.stage_starts = tuple(group[0] for group in groups)
        _check_combination(self.nested, self.stored | self.selective, offload)
        _check_selective([*self.boundaries, len(stages)], self.stored, self.selective)

    def _run(self, start: int, stop: int, x):
        for a, b in _stage_ranges(self.stage_starts, start, stop):
            if a in self.selective:
                x = run_selective(self._run_plainly, [self._modules[str(i)] for i in range(a, b)], a, b, x)
            else:
                x = self._run_plainly(a, b, x)
        return x

    def _run_plainly(self, start: int, stop: int, x):
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
        selective: frozenset[int] = frozenset(),
        stage_starts: Sequence[int] = (),
        remake: bool = False,
        remade_costly: Sequence[int] = (),
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
        self.selective = selective  # pieces where the chain stages that run selectively start
        self.stage_starts = tuple(stage_starts)  # pieces where chain stages start
        self.remake = remake  # autograd keeps recipes of cheap values (remat.remake.remake_cheap)
        self.remade_costly = tuple(remade_costly)  # and of these calls of operators with FLOPs
        _check_combination(self.nested, self.stored | self.selective, offload)
        _check_selective([0, *self.boundaries, len(captured.modules)], self.stored, self.selective)
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
        if inner is not None:
            return self._run_segments([start, *inner, stop], values, inputs)
        return self._run_kept(start, stop, values, inputs)

    def _run_kept(self, start: int, stop: int, kept: dict[int, Any], inputs: tuple):
        """Pieces ``start..stop-1`` run normally, those of the chain stages that run
        selectively each stage on its own selectively."""
        if not any(start <= s < stop for s in self.selective):
            return self._run_on(start, stop, kept, inputs)
        captured = self._captured
        for a, b in _stage_ranges(self.stage_starts, start, stop):
            if a in self.selective:
                outside = captured.outside_reads(a, b)
                args = (a, b, outside, *(kept[q] for q in outside), *inputs)
                kept[b - 1] = run_selective(self._run_plainly, captured.submodules(a, b, self), *args)
            else:
                kept[b - 1] = self._run_on(a, b, kept, inputs)
            self._forget_read(kept, b)
        return kept.pop(stop - 1)

    def _run_plainly(self, start: int, stop: int, outside: tuple[int, ...], *args):
        """Pieces ``start..stop-1`` as :meth:`_run` has them, run as they are."""
        return self._run_on(start, stop, dict(zip(outside, args)), args[len(outside) :])

    def _forget_read(self, kept: dict[int, Any], stop: int) -> None:
        """Drop from ``kept`` (in place: a nested caller holds it until its recompute
        returns) the outputs no piece from ``stop`` on reads, but piece ``stop - 1``'s."""
        for q in [q for q in kept if self._captured.last_reader[q] < stop and q != stop - 1]:
            del kept[q]

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
            self._forget_read(kept, stop)
        return self._run_kept(bounds[-2], bounds[-1], kept, inputs)

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
        # Compiled, the partitioner chooses what to save (and a dispatch mode would stop the compile).
        remaking = (
            remake_cheap(costly=self.remade_costly)
            if self.remake and not torch.compiler.is_compiling()
            else contextlib.nullcontext()
        )
        with remaking:
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
        stored += f" ({len(self.selective)} stages selective)" if self.selective else ""
        stored += " (cheap values remade in backward)" if self.remake else ""
        return f"keeps: {kept}{nested}{stored}" + (" (offloaded to host memory)" if self.offload is not None else "")
