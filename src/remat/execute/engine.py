"""The segment engine: runs a plan's segments, recomputing all but the stored and the last.

Both drop-in modules run on it: :class:`~remat.execute.module.RematModule`
(a traced model's pieces) and :class:`~remat.execute.sequential.CheckpointedSequential`
(a list of modules). They describe their pieces as a :class:`Program`; the
engine does the rest.

NOTE [recompute]
    A recomputed segment is a region of :mod:`remat.execute.recompute`
    (non-reentrant checkpointing, RNG state restored, so dropout masks are the
    same; NOTE [a region of our own]); with nested checkpoints or offload, a
    ``torch.utils.checkpoint`` call. BatchNorm runs with momentum 0 during the
    recompute, so its running statistics move once per step.

NOTE [early stop]
    A recompute stops at the last tensor the segment's backward needs
    (checkpoint's early stop): what runs after it, often the segment's last
    matmul or convolution, whose inputs are saved before it runs, does not
    run again. The chain model counts a recompute so (``Chain.last_save_*``).
    Plans with nested checkpoints or offload recompute whole segments, as the
    chain model prices them.

NOTE [recompute first]
    A segment's backward starts with its recompute. Otherwise backward nodes
    that need no saved tensor (views, reshapes, adds) run first and hold their
    gradients through the recompute. A region starts it from a gradient hook
    on its outputs; under ``torch.utils.checkpoint``, an identity on each
    output unpacks a tensor it saved, last.

NOTE [one call per span]
    Pieces run back to back (a segment, or the stages between selective ones)
    run as one generated function when the program can make one
    (:meth:`Program.span`): one Python call instead of one per piece. It frees
    what the pieces read at the same moments as running them one by one.

NOTE [what stays alive]
    Pieces read tuples of earlier outputs; each output is dropped after its
    last reader, and the dict of kept outputs is changed in place (a nested
    caller holds it until its recompute returns).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    set_checkpoint_early_stop,
)

from remat.execute.offload import CheckpointOffload, saving
from remat.execute.recompute import RunningStatsFrozen, batch_norms, run_recomputed
from remat.measure.flops import flop_formula

__all__ = [
    "Program",
    "SegmentEngine",
    "in_pieces",
    "run_segment_recomputed",
    "run_selective",
    "segment_starts",
]


def segment_starts(stage_pieces: Sequence[Sequence[int]], checkpoints: Sequence[int]) -> tuple[int, ...]:
    """Chain checkpoints (kept stage outputs) as the pieces (modules or graph
    pieces) where segments start; ``stage_pieces[i]`` lists the pieces of chain
    stage ``i + 1``. A checkpoint past the pieces (before the loss) starts none."""
    return tuple(_piece(stage_pieces, c) for c in checkpoints if c <= len(stage_pieces))


def _piece(stage_pieces: Sequence[Sequence[int]], c: int) -> int:
    """The piece where chain boundary ``c``'s segment starts (``stage_pieces[i]``: the pieces of stage ``i + 1``)."""
    return stage_pieces[c - 1][-1] + 1 if c else 0


def _nested_starts(stage_pieces: Sequence[Sequence[int]], inner: Sequence) -> dict[tuple[int, int], tuple[int, ...]]:
    """Nested chain checkpoints ``(l, r, (c1, ..))`` (see ``ChainSolution.inner``) as
    a map from a recomputed segment's pieces ``(start, stop)`` to its inner starts."""
    return {(_piece(stage_pieces, l), _piece(stage_pieces, r)): tuple(_piece(stage_pieces, c) for c in cs) for l, r, cs in inner}


def _stored_starts(stage_pieces: Sequence[Sequence[int]], stored: Sequence[int]) -> frozenset[int]:
    """Starts of stored segments (chain boundaries, see ``ChainSolution.stored``) as pieces."""
    return frozenset(_piece(stage_pieces, c) for c in stored)


def in_pieces(
    stage_pieces: Sequence[Sequence[int]],
    checkpoints: Sequence[int],
    inner: Sequence = (),
    stored: Sequence[int] = (),
    selective: Sequence[int] = (),
) -> dict[str, Any]:
    """A chain plan (boundaries and 1-based stages, see ``ChainSolution``) as the engine's
    arguments in pieces: ``boundaries``, ``nested``, ``stored``, ``selective`` (where those
    stages start) and ``stage_starts``."""
    return dict(
        boundaries=segment_starts(stage_pieces, checkpoints),
        nested=_nested_starts(stage_pieces, inner),
        stored=_stored_starts(stage_pieces, stored),
        selective=frozenset(stage_pieces[i - 1][0] for i in selective),
        stage_starts=tuple(pieces[0] for pieces in stage_pieces),
    )


def _stage_ranges(stage_starts: Sequence[int], start: int, stop: int) -> list[tuple[int, int]]:
    """The pieces ``[a, b)`` of each chain stage between pieces ``start`` and ``stop`` (stage bounds)."""
    bounds = [start, *sorted(s for s in stage_starts if start < s < stop), stop]
    return list(zip(bounds[:-1], bounds[1:]))


def _check_selective(bounds: Sequence[int], stored: frozenset[int], selective: frozenset[int]) -> None:
    """Stages run selectively lie in stored segments or the last: inside a recomputed segment's
    first forward, selective checkpointing's cache would live on to the backward."""
    for s in selective:
        l = max(b for b in bounds[:-1] if b <= s)
        if l not in stored and l != bounds[-2]:
            raise ValueError(
                f"the stage starting at piece {s} runs selectively inside a recomputed segment (from piece {l}): "
                "only stages of stored segments and of the last one may"
            )


def _check_combination(nested: dict, stored: frozenset[int], offload: CheckpointOffload | None) -> None:
    """Refuse plan kinds the cost model does not combine."""
    if nested and offload is not None:
        raise ValueError("nested checkpoints cannot be offloaded: plan with one or the other")
    if stored and (nested or offload is not None):
        raise ValueError("stored and selective segments are planned without nested checkpoints or offload")


def run_segment_recomputed(function: Callable, norms: Sequence[nn.Module], *args, early_stop: bool = True):
    """Run ``function(*args)`` saving nothing for backward; recompute it in backward, up to
    the last tensor its backward needs if ``early_stop`` (NOTE [early stop]). ``norms``: the
    BatchNorms it may run (:func:`~remat.execute.recompute.batch_norms`)."""

    if torch.compiler.is_compiling():
        # Under torch.compile the checkpoint becomes a higher-order op: the
        # partitioner recomputes the segment's ops in the backward graph, and
        # buffer mutations (BatchNorm statistics) are not replayed. Dynamo
        # cannot trace set_checkpoint_early_stop nor an arbitrary context_fn.
        return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True)
    if early_stop:
        return run_recomputed(function, norms, *args)

    # Nested checkpoints and offload: torch's checkpoint (NOTE [a region of our own]), its
    # recompute started first.
    def contexts():
        return contextlib.nullcontext(), RunningStatsFrozen(norms)

    def recompute_first(*inputs):
        return pytree.tree_map_only(
            torch.Tensor, lambda t: _RecomputeFirst.apply(t) if t.requires_grad else t, function(*inputs)
        )

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


def run_selective(function: Callable, norms: Sequence[nn.Module], *args):
    """Run ``function(*args)`` keeping only its inputs and what its costly operators make.

    Selective checkpointing (``torch.utils.checkpoint`` with
    :func:`~torch.utils.checkpoint.create_selective_checkpoint_contexts`):
    the outputs of operators that count FLOPs are cached, everything else
    the backward needs is recomputed from them when the backward reaches
    the region, at no FLOPs. Dropout is replayed with the same RNG state and
    BatchNorm recomputed without touching its running statistics, so
    gradients and buffers are exactly those of a plain run. ``norms``: the
    BatchNorms it may run (:func:`~remat.execute.recompute.batch_norms`).

    A checkpoint call, not a region of :mod:`remat.execute.recompute`: run so, with the
    same modes, a ViT-B/16 block's selective backward peak measured one activation
    higher (not traced yet).
    """
    if torch.compiler.is_compiling():
        # The compiler's partitioner chooses what to save in compiled graphs.
        return function(*args)

    def contexts():
        forward, recompute = create_selective_checkpoint_contexts(_save_what_has_flops)
        # The statistics are put back after the recompute mode is left: outside the region.
        return forward, _entered_together(RunningStatsFrozen(norms), recompute)

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
    """Identity on a segment's output whose backward, the segment's first, starts its recompute
    under ``torch.utils.checkpoint`` (NOTE [recompute first]).

    It unpacks a tensor saved here, last in the segment: an empty one, not the
    output, since the recompute keeps whatever it saves until its backward,
    which never comes for an output the loss ignores.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(output.new_empty(0))
        return output

    @staticmethod
    def backward(ctx, grad):
        ctx.saved_tensors  # unpacking starts the recompute
        return grad


class Program(Protocol):
    """The pieces a module runs, as the engine sees them (piece indices are 0-based)."""

    reads: Sequence[tuple[int, ...]]  # the earlier pieces each piece reads
    last_reader: Sequence[int]  # the last piece that reads each piece's output (its own index if none)

    def outside_reads(self, start: int, stop: int) -> tuple[int, ...]:
        """The outputs of pieces before ``start`` that pieces ``start..stop-1`` read."""

    def submodules(self, start: int, stop: int) -> list[nn.Module]:
        """The modules pieces ``start..stop-1`` call (their BatchNorms are frozen in a recompute);
        asked once per segment."""

    def reads_inputs(self, start: int) -> bool:
        """Whether a segment starting at piece ``start`` reads the model's inputs."""

    def call(self, index: int, read: tuple, inputs: tuple) -> Any:
        """Piece ``index`` on the outputs it reads and the model's inputs."""

    def span(self, start: int, stop: int) -> tuple[Callable[[list, tuple], tuple], tuple[int, ...]] | None:
        """Pieces ``start..stop-1`` as one call ``f(outputs they read, model inputs)``, and the
        pieces whose outputs it returns (in order; the last is ``stop - 1``); None to run them
        one by one. The call empties the list it is given."""


class SegmentEngine:
    """Runs a plan on a :class:`Program` of ``size`` pieces.

    ``boundaries`` are the pieces where segments start; every segment but
    the last and the ``stored`` ones is recomputed in backward. ``nested``
    maps a recomputed segment ``(start, stop)`` to the starts of its inner
    segments; the chain stages starting at the pieces ``selective`` run
    selectively (:func:`run_selective`); ``stage_starts`` are the pieces where
    chain stages start; with ``offload``, kept segment inputs wait in host
    memory.
    """

    def __init__(
        self,
        program: Program,
        size: int,
        boundaries: Sequence[int],
        offload: CheckpointOffload | None = None,
        nested: dict[tuple[int, int], tuple[int, ...]] | None = None,
        stored: frozenset[int] = frozenset(),
        selective: frozenset[int] = frozenset(),
        stage_starts: Sequence[int] = (),
    ):
        self.program = program
        self.size = size
        self.boundaries = tuple(boundaries)
        self.offload = offload
        self.nested = nested or {}
        self.stored = stored
        self.selective = selective
        self.stage_starts = tuple(stage_starts)
        self.early_stop = not self.nested and offload is None  # (NOTE [early stop])
        self._segment_norms: dict[tuple[int, int], list[nn.Module]] = {}
        _check_combination(self.nested, stored | selective, offload)
        _check_selective([0, *self.boundaries, size], stored, selective)

    def run(self, inputs: tuple) -> Any:
        """The whole plan on the model's ``inputs``; returns the last piece's output."""
        return self.run_segments([0, *self.boundaries, self.size], {}, inputs, self.offload)

    def run_segments(self, bounds: Sequence[int], kept: dict[int, Any], inputs: tuple, offload=None):
        """Segments between ``bounds``, all but the last (and the stored ones) recomputed
        in backward; ``kept`` holds the earlier outputs they read. Returns the last
        piece's output."""
        program = self.program
        for start, stop in zip(bounds[:-2], bounds[1:-1]):
            args = self._arguments(start, stop, kept, inputs)
            if start in self.stored:
                kept[stop - 1] = self._run(*args)
            else:
                with saving(offload, kept.get(start - 1)):
                    kept[stop - 1] = run_segment_recomputed(
                        self._run, self._norms(start, stop), *args, early_stop=self.early_stop
                    )
            self._forget_read(kept, stop)
        return self._run_kept(bounds[-2], bounds[-1], kept, inputs)

    def run_pieces(self, start: int, stop: int, values: dict[int, Any], inputs: tuple):
        """Pieces ``start..stop-1`` as they are; ``values`` maps earlier pieces to their
        outputs and loses each one once no later piece reads it, so it can be freed."""
        program = self.program
        span = program.span(start, stop) if stop - start > 1 else None
        if span is not None:
            # One call (see NOTE [one call per span]).
            run, returned = span
            read = program.outside_reads(start, stop)
            boxed = [values[q] for q in read]
            for q in read:
                if program.last_reader[q] < stop:
                    del values[q]
            values.update(zip(returned, run(boxed, inputs)))
            return values.pop(stop - 1)
        for index in range(start, stop):
            read = program.reads[index]
            values[index] = program.call(index, tuple(values[q] for q in read), inputs)
            for q in read:
                if program.last_reader[q] == index:
                    del values[q]
        return values.pop(stop - 1)

    def _arguments(self, start: int, stop: int, kept: dict[int, Any], inputs: tuple) -> tuple:
        """What a checkpoint of pieces ``start..stop-1`` is called with (see :meth:`_run`):
        it holds those tensors until its recompute, so only what the pieces read."""
        outside = self.program.outside_reads(start, stop)
        model_inputs = inputs if self.program.reads_inputs(start) else ()
        return (start, stop, outside, *(kept[q] for q in outside), *model_inputs)

    def _run(self, start: int, stop: int, outside: tuple[int, ...], *args):
        """Pieces ``start..stop-1`` on the outputs of pieces ``outside`` (``args``
        begins with them) and the model inputs; returns the last piece's output.
        A segment with nested checkpoints recomputes its inner segments."""
        values, inputs = dict(zip(outside, args)), args[len(outside) :]
        inner = self.nested.get((start, stop))
        if inner is not None:
            return self.run_segments([start, *inner, stop], values, inputs)
        return self._run_kept(start, stop, values, inputs)

    def _run_kept(self, start: int, stop: int, kept: dict[int, Any], inputs: tuple):
        """Pieces ``start..stop-1`` run normally, those of the chain stages that run
        selectively each stage on its own selectively."""
        if not any(start <= s < stop for s in self.selective):
            return self.run_pieces(start, stop, kept, inputs)
        for a, b in _stage_ranges(self.stage_starts, start, stop):
            if a in self.selective:
                args = self._arguments(a, b, kept, inputs)
                kept[b - 1] = run_selective(self._run_plainly, self._norms(a, b), *args)
            else:
                kept[b - 1] = self.run_pieces(a, b, kept, inputs)
            self._forget_read(kept, b)
        return kept.pop(stop - 1)

    def _run_plainly(self, start: int, stop: int, outside: tuple[int, ...], *args):
        """Pieces ``start..stop-1`` as :meth:`_run` has them, run as they are."""
        return self.run_pieces(start, stop, dict(zip(outside, args)), args[len(outside) :])

    def _norms(self, start: int, stop: int) -> list[nn.Module]:
        """The BatchNorms pieces ``start..stop-1`` run, found once."""
        norms = self._segment_norms.get((start, stop))
        if norms is None:
            norms = self._segment_norms[(start, stop)] = batch_norms(self.program.submodules(start, stop))
        return norms

    def _forget_read(self, kept: dict[int, Any], stop: int) -> None:
        """Drop from ``kept`` (in place: a nested caller holds it until its recompute
        returns) the outputs no piece from ``stop`` on reads, but piece ``stop - 1``'s."""
        for q in [q for q in kept if self.program.last_reader[q] < stop and q != stop - 1]:
            del kept[q]
