"""The step-time model: what a plan makes the device do, and how long that takes.

A training step's time is modelled as the work it does priced at a device's
rates (:class:`Speed`): FLOPs, operators launched, bytes written (what
memory-bound operators cost; normalizations, slower per byte on some devices,
apart), and the executor's own costs, each a count
(:class:`Work`): recompute regions entered (remat's own, or
``torch.utils.checkpoint`` calls), and operators run under a Python dispatch
mode (selective checkpointing's, or the recorder of remade values). A plan's
time is the store-everything step's plus what the plan adds
(:func:`plan_work`): its recomputed stages' forward work, one region per
recomputed segment (a checkpoint call in plans with nested checkpoints or
offload), one checkpoint call per selective stage, and a selective stage's
operators intercepted twice (forward and recompute) with those without FLOPs
run again.

Example:
    >>> speed = Speed(flops_per_second=1e11, bytes_per_second=1e10, seconds_per_op=5e-6,
    ...               seconds_per_region=2e-4, seconds_per_intercepted_op=1e-5, seconds_per_recorded_op=4e-5)
    >>> round(speed.seconds(Work(flops=10**9, ops=100, regions=2)) * 1e3, 2)  # ms
    10.9
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from remat.chain.model import Chain, Inner

__all__ = ["Speed", "Work", "early_stop_shares", "plan_work", "recompute_counts", "recompute_weights"]


@dataclasses.dataclass(frozen=True)
class Work:
    """What (part of) a step makes the device do; counts add up.

    ``written_bytes`` counts the outputs of every operator but views, in place
    or not; ``norm_bytes`` is the part normalizations (BatchNorm, LayerNorm,
    GroupNorm, forward and backward) write. ``cheap_ops`` and
    ``cheap_written_bytes`` are the part of ``ops`` and ``written_bytes`` of
    operators without FLOPs (what selective checkpointing runs again);
    ``regions`` are remat's own recompute regions entered
    (:mod:`remat.execute.recompute`), ``checkpoint_calls`` calls of
    ``torch.utils.checkpoint`` (selective stages, the segments of plans with
    nested checkpoints or offload), ``intercepted_ops`` operators run under
    selective checkpointing's dispatch modes and ``recorded_ops`` under the
    recorder of remade values.
    """

    flops: int = 0
    ops: int = 0
    written_bytes: int = 0
    cheap_ops: int = 0
    cheap_written_bytes: int = 0
    norm_bytes: int = 0
    regions: int = 0
    intercepted_ops: int = 0
    recorded_ops: int = 0
    checkpoint_calls: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __sub__(self, other: Work) -> Work:
        return Work(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclasses.dataclass(frozen=True)
class Speed:
    """A device's rates for each kind of :class:`Work` (see :mod:`remat.profile.speed`)."""

    flops_per_second: float
    bytes_per_second: float  # written by memory-bound operators
    seconds_per_op: float  # an operator's launch, dispatch and autograd bookkeeping
    seconds_per_region: float  # one recompute region: its hooks, RNG state and recompute call
    seconds_per_intercepted_op: float  # an operator under selective checkpointing's dispatch mode
    seconds_per_recorded_op: float  # an operator under the recorder of remade values
    source: str = ""  # where the rates come from, for reports
    norm_bytes_per_second: float | None = None  # written by normalizations (None: bytes_per_second)
    seconds_per_checkpoint_call: float | None = None  # one torch.utils.checkpoint call (None: a region's)

    def seconds(self, work: Work) -> float:
        return (
            work.flops / self.flops_per_second
            + (work.written_bytes - work.norm_bytes) / self.bytes_per_second
            + work.norm_bytes / (self.norm_bytes_per_second or self.bytes_per_second)
            + work.ops * self.seconds_per_op
            + work.regions * self.seconds_per_region
            + work.checkpoint_calls * (self.seconds_per_checkpoint_call or self.seconds_per_region)
            + work.intercepted_ops * self.seconds_per_intercepted_op
            + work.recorded_ops * self.seconds_per_recorded_op
        )


def recompute_counts(n: int, checkpoints: Sequence[int], stored: Sequence[int] = (), inner: Inner = ()) -> np.ndarray:
    """How many times each stage (entry ``i - 1`` for stage ``i``) runs its forward again in
    backward: once in every recomputed segment, once more in each nested one (see
    :class:`~remat.chain.model.ChainSolution`).

    Example:
        >>> recompute_counts(6, [2, 4], stored=[2], inner=[(0, 2, (1,))]).tolist()
        [2, 1, 0, 0, 0, 0]
    """
    counts = np.zeros(n, dtype=np.int64)
    nested = {(l, r): tuple(cs) for l, r, cs in inner}
    bounds = [0, *checkpoints]
    pending = [(l, r) for l, r in zip(bounds[:-1], bounds[1:]) if l not in set(stored)]
    while pending:
        l, r = pending.pop()
        counts[l:r] += 1
        cs = nested.get((l, r), ())
        pending += zip((l, *cs[:-1]), cs)
    return counts


def _left_out(chain: Chain, checkpoints: Sequence[int], stored: Sequence[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """What early stop leaves out of a one-level plan's recomputes: the stages run not at all
    (0-based ranges), and those that stop at their last saved tensor (0-based)."""
    whole, partly = [], []
    J = chain.last_savers()
    bounds = [0, *checkpoints]
    for l, r in zip(bounds[:-1], bounds[1:]):
        if l not in set(stored):
            j = max(int(J[r]), l)
            whole.append((j, r))
            if j > l:
                partly.append(j - 1)
    return whole, partly


def recompute_weights(
    chain: Chain, checkpoints: Sequence[int], stored: Sequence[int] = (), inner: Inner = ()
) -> np.ndarray:
    """How much of each stage's forward runs again in backward: :func:`recompute_counts`, less
    what early stop leaves out (a stage stopped at its last saved tensor by the share of its
    FLOPs run by then, see :func:`early_stop_shares`)."""
    weights = recompute_counts(chain.n, checkpoints, stored, inner).astype(float)
    if not chain.early_stop or inner:
        return weights
    whole, partly = _left_out(chain, checkpoints, stored)
    for j, r in whole:
        weights[j:r] -= 1
    shares = early_stop_shares(chain)
    for i in partly:
        weights[i] -= 1 - shares[i]
    return weights


def early_stop_shares(chain: Chain) -> np.ndarray:
    """Per stage: the share of its forward that runs up to its last saved tensor (of its
    FLOPs, or of its operators where it has no FLOPs; 1 where neither was counted)."""
    ops = np.zeros(chain.n) if chain.fwd_ops is None else chain.fwd_ops
    by_ops = np.divide(chain.last_save_ops, ops, out=np.ones(chain.n), where=ops > 0)
    return np.divide(chain.last_save_flops, chain.fwd_flops, out=by_ops, where=chain.fwd_flops > 0)


def _regions(checkpoints: Sequence[int], stored: Sequence[int], inner: Inner) -> int:
    """Regions of the recomputed segments, nested ones included."""
    starts = (0, *checkpoints)[: len(checkpoints)]  # each segment that ends at a checkpoint
    return len([l for l in starts if l not in set(stored)]) + sum(len(cs) for _, _, cs in inner)


def plan_work(
    chain: Chain,
    checkpoints: Sequence[int],
    stored: Sequence[int] = (),
    inner: Inner = (),
    selective_stages: Sequence[int] = (),
    offload: bool = False,
) -> Work:
    """What a plan adds to the store-everything step: its recomputed forwards, and the
    regions, checkpoint calls and dispatch-mode work of its recomputed segments and
    selective stages (1-based); with nested checkpoints or ``offload``, each recomputed
    segment is a checkpoint call. Operator and byte counts are zero where the chain has
    none measured."""
    counts = recompute_counts(chain.n, checkpoints, stored, inner)
    zeros = np.zeros(chain.n, dtype=np.int64)

    def per_stage(values: np.ndarray | None, weights: np.ndarray) -> int:
        return int(np.dot(zeros if values is None else values, weights))

    picked = np.zeros(chain.n, dtype=np.int64)
    picked[[i - 1 for i in selective_stages]] = 1
    segments = _regions(checkpoints, stored, inner)
    work = Work(
        flops=per_stage(chain.fwd_flops, counts),
        ops=per_stage(chain.fwd_ops, counts) + per_stage(chain.fwd_cheap_ops, picked),
        written_bytes=(
            per_stage(chain.fwd_written_bytes, counts) + per_stage(chain.fwd_cheap_written_bytes, picked)
        ),
        cheap_ops=per_stage(chain.fwd_cheap_ops, counts + picked),
        cheap_written_bytes=per_stage(chain.fwd_cheap_written_bytes, counts + picked),
        norm_bytes=per_stage(chain.fwd_norm_bytes, counts + picked),
        regions=0 if inner or offload else segments,
        checkpoint_calls=(segments if inner or offload else 0) + len(selective_stages),
        intercepted_ops=2 * per_stage(chain.fwd_ops, picked),
    )
    if chain.early_stop and not inner:
        whole, partly = _left_out(chain, checkpoints, stored)
        for j, r in whole:
            work -= _stage_work(chain, slice(j, r), cheap=True)
        for i in partly:
            work -= _stage_work(chain, slice(i, i + 1)) - Work(
                flops=int(chain.last_save_flops[i]),
                ops=int(chain.last_save_ops[i]),
                written_bytes=int(chain.last_save_written_bytes[i]),
                norm_bytes=int(chain.last_save_norm_bytes[i]),
            )
    return work


def _stage_work(chain: Chain, stages: slice, cheap: bool = False) -> Work:
    """The forward work of some stages (0-based); its part without FLOPs too if ``cheap``."""
    total = lambda values: 0 if values is None else int(values[stages].sum())  # noqa: E731
    return Work(
        flops=total(chain.fwd_flops),
        ops=total(chain.fwd_ops),
        written_bytes=total(chain.fwd_written_bytes),
        cheap_ops=total(chain.fwd_cheap_ops) if cheap else 0,
        cheap_written_bytes=total(chain.fwd_cheap_written_bytes) if cheap else 0,
        norm_bytes=total(chain.fwd_norm_bytes),
    )
