"""A sequential model (a list of modules) run with a checkpoint plan, on the segment engine."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from remat.execute.engine import SegmentEngine, in_pieces
from remat.execute.offload import CheckpointOffload

__all__ = ["CheckpointedSequential"]


class CheckpointedSequential(nn.Module):
    """A sequential model run with a checkpoint plan; a drop-in for the original.

    The stages are the user's own modules (parameters shared, nothing copied),
    so ``state_dict()`` has the same values (keys gain no prefix when the
    original is an ``nn.Sequential``: they are ``"0.weight"``, ... as in the original).

    Args:
        stages: the model's stages, in order.
        checkpoints: boundaries ``i`` (1..len(stages)) whose activation, the
            output of stage ``i``, is kept; every segment before the last one
            is recomputed in backward.
        stage_pieces: optional grouping of module indices into chain stages (from
            :func:`remat.profile.sequential.profile_sequential`); checkpoints
            then count stage_pieces, not modules.
        offload: keep the checkpoints in host memory with this.
        inner: checkpoints nested in recomputed segments, as in
            ``ChainSolution.inner`` (not with ``offload``).
        stored: starts (0 or a checkpoint) of segments that run normally,
            keeping what their backward needs, instead of being recomputed
            (as in ``ChainSolution.stored``).
        selective: chain stages (1-based, as checkpoints count them) that
            run selectively, each on its own (:func:`~remat.execute.engine.run_selective`); only
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
        stage_pieces: Sequence[Sequence[int]] | None = None,
        offload: CheckpointOffload | None = None,
        inner: Sequence = (),
        stored: Sequence[int] = (),
        selective: Sequence[int] = (),
    ):
        super().__init__()
        for index, stage in enumerate(stages):
            self.add_module(str(index), stage)
        stage_pieces = stage_pieces or [[i] for i in range(len(stages))]
        self.checkpoints = tuple(checkpoints)
        self._engine = SegmentEngine(
            _Modules(list(stages)), len(stages), offload=offload,
            **in_pieces(stage_pieces, checkpoints, inner, stored, selective),
        )

    def forward(self, x):
        return self._engine.run((x,))


class _Modules:
    """A list of modules as the engine's :class:`~remat.execute.engine.Program`: each module reads
    the output of the one before it, the first one the model's input."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        n = len(modules)
        self.reads = [(i - 1,) if i else () for i in range(n)]
        self.last_reader = [i + 1 if i + 1 < n else i for i in range(n)]

    def outside_reads(self, start: int, stop: int) -> tuple[int, ...]:
        return (start - 1,) if start else ()

    def submodules(self, start: int, stop: int) -> list[nn.Module]:
        return self.modules[start:stop]

    def reads_inputs(self, start: int) -> bool:
        return start == 0

    def call(self, index: int, read: tuple, inputs: tuple):
        return self.modules[index](*(read or inputs))

    def span(self, start: int, stop: int) -> None:
        return None  # each module is one call already
