"""Exact, deterministic measurement of memory and FLOPs of one training step.

On CPU, ``meta`` and fake tensors, memory is counted at the dispatcher: every
tensor storage created by an operator is registered once (views, aliases and
in-place results share their input's storage and are not counted again) and is
un-registered by a weakref finalizer when PyTorch frees it. The result is
byte-exact and does not depend on threads or timing, and it works under
``FakeTensorMode``, so a model that does not fit anywhere can be measured in
milliseconds. On CUDA the allocator's own statistics give the peak.

Example:
    >>> import torch
    >>> from remat import track_memory
    >>> with track_memory() as mem:
    ...     y = torch.ones(1024)            # 4 KiB
    ...     del y
    ...     z = torch.ones(256)             # 1 KiB
    >>> mem.peak_bytes, mem.current_bytes
    (4096, 1024)
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch._C import DispatchKey
from torch._prims.rng_prims import run_and_save_rng_state, run_with_rng_state
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from remat.chain.time import Work
from remat.measure.flops import flop_formula

__all__ = ["MemoryTracker", "has_storage", "round_to_of", "storage_bytes", "rounded_bytes", "track_memory", "unique_storage_bytes"]

CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator rounds every block up to this

# Ops whose output never counts as a new allocation. ``lift_fresh`` returns its
# (already allocated) input on real tensors but a fresh storage under
# FakeTensorMode; treating it as an alias keeps real and fake runs equal.
_ALIAS_OPS = {torch.ops.aten.lift_fresh.default}
# Metadata queries, not computations: fake tensors answer ``.device`` through
# the dispatcher, real tensors do not. Leaving them out of the timeline keeps
# real and fake timelines (and op counts) equal.
_METADATA_OPS = {torch.ops.prim.device.default}
# Normalizations, forward and backward: the step-time model prices what they write apart, since
# some devices run them several times slower per byte than elementwise operators (CPUs).
_NORM_OPS = {
    getattr(torch.ops.aten, name)
    for name in (
        "native_batch_norm", "native_batch_norm_backward", "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional", "_batch_norm_with_update",
        "_batch_norm_with_update_functional", "_batch_norm_no_update", "batch_norm_backward", "cudnn_batch_norm",
        "cudnn_batch_norm_backward", "miopen_batch_norm", "miopen_batch_norm_backward", "native_layer_norm",
        "native_layer_norm_backward", "native_group_norm", "native_group_norm_backward",
    )
    if hasattr(torch.ops.aten, name)
}


def round_to_of(device: torch.device | str | None) -> int:
    """Allocation granularity: 512 bytes on CUDA, exact elsewhere."""
    return CUDA_BLOCK_BYTES if device is not None and torch.device(device).type == "cuda" else 1


def rounded_bytes(nbytes: int, round_to: int) -> int:
    """``nbytes`` rounded up to the allocator's block size ``round_to``."""
    return -(-nbytes // round_to) * round_to


def storage_bytes(storage: torch.UntypedStorage, round_to: int) -> int:
    return rounded_bytes(storage.nbytes(), round_to)


@dataclasses.dataclass
class _StorageRecord:
    nbytes: int
    born: int  # index into the timeline when the storage was created
    died: int | None = None


class MemoryTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages created while it is active.

    Use it through :func:`track_memory`. Attributes after (or during) use:

    * ``peak_bytes`` / ``current_bytes``: bytes of storages created inside the
      context, at their peak (since entry, or since the last :meth:`mark`) and
      now. On CUDA, the allocator's figures relative to what was allocated on
      entry: they include what operators allocate inside themselves
      (cuDNN/cuBLAS workspaces), which no dispatcher-level count sees.
    * ``timeline``: ``(op name, live bytes)`` after every operator, for plots.
    * ``flops``: FLOPs of the operators run inside (``torch.utils.flop_counter``
      formulas; operators without a formula count zero).
    * ``work()``: those FLOPs with the operators run and the bytes they
      wrote (what the step-time model prices, :class:`remat.chain.time.Work`).
    """

    def __init__(self, round_to: int = 1, cuda_device: torch.device | None = None):
        super().__init__()
        self.round_to = round_to
        self.cuda_device = cuda_device
        self._counted = 0  # bytes of live storages created here (dispatcher count)
        self._counted_peak = 0
        self.flops = 0
        self._views = 0  # operators that return views (detach, reshape): no kernel, little time
        self._cheap_ops = 0  # operators without FLOPs that are not views
        self._cheap_written = 0  # bytes those wrote
        self._written = 0  # bytes every operator but views wrote: new storages, or in place
        self._norm_written = 0  # the part normalizations wrote
        self.timeline: list[tuple[str, int]] = []
        self._live: dict[int, _StorageRecord] = {}  # keyed by id(storage) while alive
        self._records: list[_StorageRecord] = []
        self._cuda_start = 0
        self._allocator_figures: tuple[int, int] | None = None  # (peak, current) frozen on exit

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Without this, torch.compile silently falls back to eager under the mode.
        return True

    # -- storage bookkeeping ---------------------------------------------------
    def _register(self, storage: torch.UntypedStorage) -> bool:
        """Count a storage made inside; False if it was already counted."""
        key = id(storage)
        if key in self._live:
            return False
        record = _StorageRecord(storage_bytes(storage, self.round_to), len(self.timeline))
        self._live[key] = record
        self._records.append(record)
        self._counted += record.nbytes
        self._counted_peak = max(self._counted_peak, self._counted)
        weakref.finalize(storage, self._release, key, record)
        return True

    def _release(self, key: int, record: _StorageRecord) -> None:
        record.died = len(self.timeline)
        self._counted -= record.nbytes
        if self._live.get(key) is record:
            del self._live[key]

    @property
    def current_bytes(self) -> int:
        if self._allocator_figures is not None:
            return self._allocator_figures[1]
        if self.cuda_device is not None:
            return torch.cuda.memory_allocated(self.cuda_device) - self._cuda_start
        return self._counted

    @property
    def peak_bytes(self) -> int:
        if self._allocator_figures is not None:
            return self._allocator_figures[0]
        if self.cuda_device is not None:
            return torch.cuda.max_memory_allocated(self.cuda_device) - self._cuda_start
        return self._counted_peak

    def work(self) -> Work:
        """The operators run (views aside) and bytes they wrote inside so far, with their FLOPs."""
        return Work(
            flops=self.flops,
            ops=len(self.timeline) - self._views,
            written_bytes=self._written,
            cheap_ops=self._cheap_ops,
            cheap_written_bytes=self._cheap_written,
            norm_bytes=self._norm_written,
        )

    def mark(self) -> None:
        """Start a new peak window: ``peak_bytes`` then counts from what is live now."""
        if self.cuda_device is not None:
            torch.cuda.synchronize(self.cuda_device)
            torch.cuda.reset_peak_memory_stats(self.cuda_device)
        self._counted_peak = self._counted

    def live_bytes(self, storages: Iterable[torch.UntypedStorage]) -> int:
        """Bytes of those of ``storages`` (alive, as the caller holds them) created here."""
        records = {id(s): self._live.get(id(s)) for s in storages}
        return sum(record.nbytes for record in records.values() if record is not None)

    def live_bytes_besides(self, storages: Iterable[torch.UntypedStorage]) -> int:
        """Bytes of every storage created here and still alive but ``storages``."""
        besides = {id(s) for s in storages}
        return sum(record.nbytes for key, record in self._live.items() if key not in besides)

    def record_of(self, tensor: torch.Tensor) -> _StorageRecord | None:
        """The record of ``tensor``'s storage if it was created here and is alive."""
        return self._live.get(id(tensor.untyped_storage()))

    # -- dispatch --------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _METADATA_OPS:
            return out
        formula = flop_formula(func)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        elif func.is_view:
            self._views += 1
        else:
            self._cheap_ops += 1
        if func not in _ALIAS_OPS:
            inputs = {
                id(t.untyped_storage())
                for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor) and has_storage(t)
            }
            written = 0
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and has_storage(t):
                    storage = t.untyped_storage()
                    if id(storage) not in inputs:
                        if self._register(storage):
                            written += self._records[-1].nbytes
                    elif not func.is_view:  # in place (or out=)
                        written += t.nbytes
            self._written += written
            if formula is None:
                self._cheap_written += written
            if func._overloadpacket in _NORM_OPS:
                self._norm_written += written
        self.timeline.append((str(func._overloadpacket), self.current_bytes))
        return out

    def __enter__(self):
        if self.cuda_device is not None:
            torch.cuda.synchronize(self.cuda_device)
            torch.cuda.reset_peak_memory_stats(self.cuda_device)
            self._cuda_start = torch.cuda.memory_allocated(self.cuda_device)
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        if self.cuda_device is not None:
            torch.cuda.synchronize(self.cuda_device)
            self._allocator_figures = (self.peak_bytes, self.current_bytes)
        return result


def has_storage(t: torch.Tensor) -> bool:
    # Nested/sparse/functional wrappers have no plain storage to key on.
    return t.layout == torch.strided and not t.is_nested and type(t).__name__ != "FunctionalTensor"


# NOTE [random operators replayed]
#     A compiled backward that recomputes a random operator replays the generator
#     state the forward drew from: the forward runs it under ``run_and_save_rng_state``
#     and the backward under ``run_with_rng_state``, higher-order operators that a
#     dispatch mode must handle itself. The tracker runs their implementation with
#     itself active again, so the operator inside is counted like any other.
@run_and_save_rng_state.py_impl(MemoryTracker)
def _run_and_save_rng_state(mode: MemoryTracker, op, *args, **kwargs):
    with mode:
        return run_and_save_rng_state.py_kernels[DispatchKey.BackendSelect](op, *args, **kwargs)


@run_with_rng_state.py_impl(MemoryTracker)
def _run_with_rng_state(mode: MemoryTracker, rng_state, op, *args, **kwargs):
    with mode:
        if isinstance(rng_state, FakeTensor):  # nothing to replay on fake tensors (as FakeTensorMode does)
            return op(*args, **kwargs)
        return run_with_rng_state.py_kernels[DispatchKey.BackendSelect](rng_state, op, *args, **kwargs)


@contextlib.contextmanager
def track_memory(
    device: torch.device | str | None = None, *, exact: bool | None = None
) -> Iterator[MemoryTracker]:
    """Track live tensor memory of everything run inside the ``with`` block.

    Args:
        device: ``None`` or a CPU/meta device counts storages exactly at the
            dispatcher. A CUDA device takes the peak from the CUDA allocator
            (``max_memory_allocated``) and still records the op timeline, with
            sizes rounded to the allocator's 512-byte blocks.
        exact: force dispatcher counting (with CUDA rounding on a CUDA
            device), e.g. for fake tensors that stand for CUDA tensors.

    Example:
        >>> import torch, remat
        >>> with remat.track_memory() as mem:
        ...     x = torch.zeros(256, 256)   # 256 KiB
        >>> mem.peak_bytes
        262144
    """
    device = torch.device(device) if device is not None else None
    if round_to_of(device) > 1 and not exact:
        tracker = MemoryTracker(round_to=CUDA_BLOCK_BYTES, cuda_device=device)
    else:
        tracker = MemoryTracker(round_to=round_to_of(device))
    with tracker:
        yield tracker



def unique_storage_bytes(tensors, round_to: int = 1) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and has_storage(t):
            storage = t.untyped_storage()
            seen[id(storage)] = storage_bytes(storage, round_to)
    return sum(seen.values())
