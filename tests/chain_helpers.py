"""Helpers shared by the chain-solver tests (plain functions, no fixtures).

Test files import this module directly (``from chain_helpers import ...``):
pytest puts the ``tests`` folder on ``sys.path`` because it is not a package.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import checkpoint

from remat.execute.offload import CheckpointOffload


def all_plans(n: int) -> Iterator[tuple[int, ...]]:
    """Every checkpoint subset of a chain of ``n`` stages: subsets of ``1..n-1``."""
    boundaries = range(1, n)
    for size in range(n):
        yield from itertools.combinations(boundaries, size)


def plans_with_stored(n: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every (checkpoints, stored starts) plan of an n-stage chain."""
    for size in range(n):
        for cps in itertools.combinations(range(1, n), size):
            starts = (0, *cps)
            for k in range(len(starts)):
                for stored in itertools.combinations(starts[:-1], k):
                    following = [starts[starts.index(l) + 1] for l in stored]
                    if not any(f in stored or f == starts[-1] for f in following):
                        yield cps, stored


def plans_with_selective(n: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Every (checkpoints, stored starts, selective starts) plan: each segment but the last is
    recomputed, stored or stored and selective, the last plain or selective; a stored segment
    followed by a kept one (stored or the last) runs the other way."""
    for size in range(n):
        for cps in itertools.combinations(range(1, n), size):
            starts = (0, *cps)
            # 0 recomputed, 1 stored plainly, 2 stored selectively; the last: 1 or 2
            for modes in itertools.product((0, 1, 2), repeat=len(starts) - 1):
                for last in (1, 2):
                    every = (*modes, last)
                    if any(a and b and a == b for a, b in zip(every, every[1:])):
                        continue
                    if modes and modes[-1] and cps[-1] == n - 1:  # the loss alone after a stored segment
                        continue
                    stored = tuple(l for l, m in zip(starts, modes) if m)
                    selective = tuple(l for l, m in zip(starts, every) if m == 2)
                    yield cps, stored, selective


def nested_options(l: int, r: int) -> Iterator[tuple]:
    """Every way to nest checkpoints in the recompute of segment ``(l, r]``, as
    ``ChainSolution.inner`` entries (the first option nests none)."""
    yield ()
    for cs in all_plans(r - l):
        if not cs:
            continue
        cs = tuple(l + c for c in cs)
        subs = list(zip((l, *cs[:-1]), cs))
        for parts in itertools.product(*(list(nested_options(s, e)) for s, e in subs)):
            yield ((l, r, cs), *itertools.chain.from_iterable(parts))


def nested_plans(n: int) -> Iterator[tuple[tuple[int, ...], tuple]]:
    """Every (checkpoints, inner) plan of an n-stage chain with at least one nested checkpoint."""
    for cps in all_plans(n):
        bounds = (0, *cps)
        segments = list(zip(bounds[:-1], bounds[1:]))
        for parts in itertools.product(*(list(nested_options(l, r)) for l, r in segments)):
            inner = tuple(itertools.chain.from_iterable(parts))
            if inner:
                yield cps, inner


def segmentations(m: int) -> Iterator[tuple[tuple[int, int], ...]]:
    """Every partition of ``m`` stages into consecutive segments ``(start, stop)``."""
    for cuts in all_plans(m):
        bounds = (0, *cuts, m)
        yield tuple(zip(bounds[:-1], bounds[1:]))


class StockCheckpointed(nn.Module):
    """A sequential model run with stock ``torch.utils.checkpoint`` segments.

    ``segments`` is a list of ``(start, stop, checkpointed)`` over module
    indices: a checkpointed segment runs through
    ``checkpoint(..., use_reentrant=False)`` with its defaults (the baseline a
    user gets without this library), a plain one runs normally.
    """

    def __init__(self, modules, segments):
        super().__init__()
        for index, module in enumerate(modules):
            self.add_module(str(index), module)
        self.segments = list(segments)

    def _run(self, start: int, stop: int, x: torch.Tensor) -> torch.Tensor:
        for index in range(start, stop):
            x = self._modules[str(index)](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for start, stop, checkpointed in self.segments:
            if checkpointed:
                x = checkpoint(self._run, start, stop, x, use_reentrant=False)
            else:
                x = self._run(start, stop, x)
        return x


class SimulatedOffload(CheckpointOffload):
    """The offload path on CPU tensors, for tests.

    The "host" copy is made with the dispatch modes (the memory tracker)
    switched off, so measurement does not see it, as the CUDA allocator does
    not see pinned host memory; the copy back is an ordinary, tracked clone,
    as the copy to the device is a new device allocation. Records what went
    through the hooks.
    """

    def __init__(self):
        super().__init__()
        self.moved: list[int] = []  # storage addresses of the tensors copied out
        self.loaded = 0

    def _to_host(self, t: torch.Tensor):
        with _disable_current_modes():
            host = t.detach().clone()
        self.moved.append(t.untyped_storage().data_ptr())

        def load() -> torch.Tensor:
            self.loaded += 1
            return host.clone()

        return load
