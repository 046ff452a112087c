"""Offloaded checkpoints: kept segment inputs wait in pinned host memory until their recompute."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch

__all__ = ["CheckpointOffload", "saving"]


def saving(offload: CheckpointOffload | None, boundary):
    """What a recomputed segment whose input is ``boundary`` runs in: offloading it, or nothing."""
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
        >>> from remat.execute.sequential import CheckpointedSequential
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
