"""A device's rates for the step-time model (:class:`remat.chain.time.Speed`), measured.

Each rate comes from a short training step on real tensors of the device,
timed (median of a few runs) and counted by the storage tracker, so that a rate
prices exactly what the tracker counts in a model's step:

* per operator: a chain of operators on one-element tensors (launch, dispatch
  and autograd bookkeeping, nothing else);
* per byte written: elementwise operators on large tensors, less their operators' cost;
* per byte normalizations write: BatchNorm (training) on a large tensor, less its operators'
  cost and the other bytes its step writes (LayerNorm runs faster per byte on CPUs, up to
  twice: priced so, its recompute is overrated, never underrated);
* per FLOP: matmuls and convolutions, less their operators' and bytes' cost;
* per recompute region: the engine's recomputed segment around a tiny block,
  less the block's own cost; per ``torch.utils.checkpoint`` call the same, run
  as plans with nested checkpoints or offload run it;
* per operator under selective checkpointing's modes, and under the recorder of
  remade values: the slope of the step's time over the number of operators run
  in one region, less what those operators cost anyway.

About a second on a CPU. Where the device cannot run (a CUDA model planned on a
machine without one, the meta device), the rates are assumed, and labelled so.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

from remat.chain.time import Speed, Work
from remat.execute.engine import run_segment_recomputed, run_selective
from remat.execute.remake import remake_cheap
from remat.measure.tracker import track_memory

__all__ = ["ASSUMED_CUDA", "measure_speed"]

#: Rates for a CUDA device remat cannot run on here: a recent data-centre GPU in half
#: precision, its per-operator costs those of PyTorch's eager mode on a fast host.
ASSUMED_CUDA = Speed(
    flops_per_second=300e12,
    bytes_per_second=1.5e12,
    norm_bytes_per_second=1e12,  # a normalization reads its input twice
    seconds_per_op=8e-6,
    seconds_per_region=5e-5,
    seconds_per_checkpoint_call=1.5e-4,
    seconds_per_intercepted_op=1.5e-5,
    seconds_per_recorded_op=4e-5,
    source="assumed (no CUDA device to measure)",
)
_REPEATS = 7


def measure_speed(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Speed:
    """The rates of ``device`` for tensors of ``dtype``, measured once per device, dtype and
    thread count (see the module docstring).

    Example:
        >>> from remat.profile.speed import measure_speed
        >>> speed = measure_speed("cpu")
        >>> speed.flops_per_second > 1e8 and 0 < speed.seconds_per_op < 1e-3
        True
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _measured(f"cuda:{index}", dtype, 1)
    if device.type == "cuda":
        return ASSUMED_CUDA
    if device.type != "cpu":
        raise ValueError(
            f"remat times steps on cpu or cuda, not {device.type}: plan with costs='flops' on a model "
            "whose parameters are on one of those (fake tensors are fine)"
        )
    return _measured("cpu", dtype, torch.get_num_threads())


@functools.cache
def _measured(device: str, dtype: torch.dtype, threads: int) -> Speed:
    on = dict(device=device, dtype=dtype)
    op = _per_op(on)
    per_byte = _per_byte(on, op)
    per_flop = _per_flop(on, op, per_byte)
    per_norm_byte = _per_norm_byte(on, op, per_byte)
    region = _per_region(on, op, early_stop=True)
    checkpoint_call = _per_region(on, op, early_stop=False)
    intercepted = _per_dispatched_op(on, op, _selective)
    recorded = _per_dispatched_op(on, op, _remade)
    kind = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu, {threads} threads"
    return Speed(
        flops_per_second=1 / per_flop,
        bytes_per_second=1 / per_byte,
        norm_bytes_per_second=1 / per_norm_byte,
        seconds_per_op=op,
        seconds_per_region=region,
        seconds_per_checkpoint_call=checkpoint_call,
        seconds_per_intercepted_op=intercepted,
        seconds_per_recorded_op=recorded,
        source=f"measured ({kind}, {str(dtype).removeprefix('torch.')})",
    )


def _step(forward: Callable[[], torch.Tensor]) -> None:
    forward().sum().backward()


def _timed(step: Callable[[], None], device: str) -> float:
    """Median seconds of ``step`` (after a warm-up run)."""
    step()
    return statistics.median(_once(step, device) for _ in range(_REPEATS))


def _extra_seconds(base: Callable[[], None], step: Callable[[], None], device: str) -> float:
    """Median over rounds of ``step``'s seconds less ``base``'s, the two run in turn in each
    round (after a warm-up of each): load and drift on a shared machine hit both alike."""
    base()
    step()
    return statistics.median(_once(step, device) - _once(base, device) for _ in range(_REPEATS))


def _once(step: Callable[[], None], device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def _counted(step: Callable[[], None], device: str) -> Work:
    with track_memory(torch.device(device)) as mem:
        step()
    return mem.work()


def _chain(x: torch.Tensor, ops: int) -> torch.Tensor:
    """``ops`` operators on ``x``: matmuls, each followed by a sigmoid, whose output the
    backward needs (kept, or remade from the matmul's, as in a network's layers)."""
    for _ in range(ops // 2):
        x = torch.sigmoid(x @ x)
    return x


def _per_op(on: dict) -> float:
    x = torch.ones(1, 1, requires_grad=True, **on)
    step = lambda: _step(lambda: _chain(x, 200))  # noqa: E731
    return _timed(step, on["device"]) / _counted(step, on["device"]).ops


def _per_byte(on: dict, op: float) -> float:
    x = torch.ones(1 << 22, requires_grad=True, **on)
    step = lambda: _step(lambda: torch.sigmoid(torch.sigmoid(x * 2) * 2))  # noqa: E731
    work = _counted(step, on["device"])
    return max(_timed(step, on["device"]) - work.ops * op, 0.0) / work.written_bytes


def _per_norm_byte(on: dict, op: float, per_byte: float) -> float:
    x = torch.ones(8, 64, 64, 64, requires_grad=True, **on)
    batch_norm = torch.nn.BatchNorm2d(64, **on)
    step = lambda: _step(lambda: batch_norm(x))  # noqa: E731
    work = _counted(step, on["device"])
    rest = work.ops * op + (work.written_bytes - work.norm_bytes) * per_byte
    return max(_timed(step, on["device"]) - rest, 0.0) / work.norm_bytes


def _per_flop(on: dict, op: float, per_byte: float) -> float:
    large = on["device"].startswith("cuda")
    width, channels, side = (4096, 256, 64) if large else (512, 64, 32)
    # Constant values (the generator's state is the user's): their products stay bounded.
    x = torch.full((width, width), 1 / width, requires_grad=True, **on)
    w = torch.full((width, width), 1 / width, requires_grad=True, **on)
    image = torch.full((8, channels, side, side), 0.5, requires_grad=True, **on)
    kernel = torch.full((channels, channels, 3, 3), 1 / channels, requires_grad=True, **on)

    def forward():
        return (x @ w @ w).sum() + torch.nn.functional.conv2d(image, kernel, padding=1).sum()

    step = lambda: _step(forward)  # noqa: E731
    work = _counted(step, on["device"])
    rest = work.ops * op + work.written_bytes * per_byte
    return max(_timed(step, on["device"]) - rest, 0.0) / work.flops


def _per_region(on: dict, op: float, early_stop: bool) -> float:
    x = torch.ones(1, 1, requires_grad=True, **on)
    blocks = 50

    def run(recomputed: bool):
        def forward():
            y = x
            for _ in range(blocks):
                y = run_segment_recomputed(_chain, [], y, 2, early_stop=early_stop) if recomputed else _chain(y, 2)
            return y

        return lambda: _step(forward)

    plain, regions = run(False), run(True)
    extra = _counted(regions, on["device"]).ops - _counted(plain, on["device"]).ops
    seconds = _extra_seconds(plain, regions, on["device"]) - extra * op
    return max(seconds, 0.0) / blocks


def _selective(x: torch.Tensor, ops: int) -> torch.Tensor:
    return run_selective(_chain, [], x, ops)


def _remade(x: torch.Tensor, ops: int) -> torch.Tensor:
    with remake_cheap():
        return _chain(x, ops)


def _per_dispatched_op(on: dict, op: float, run: Callable[[torch.Tensor, int], torch.Tensor]) -> float:
    """Seconds per forward operator ``run`` intercepts: the slope of its extra time over two
    chain lengths (so its region's fixed cost drops out), less the operators it adds
    (remakes, recomputes), which cost what any operator does."""
    x = torch.ones(1, 1, requires_grad=True, **on)
    extra_seconds = []
    lengths = (40, 200)
    for ops in lengths:
        plain = lambda: _step(lambda: _chain(x, ops))  # noqa: E731
        dispatched = lambda: _step(lambda: run(x, ops))  # noqa: E731
        extra = _counted(dispatched, on["device"]).ops - _counted(plain, on["device"]).ops
        extra_seconds.append(_extra_seconds(plain, dispatched, on["device"]) - extra * op)
    slope = (extra_seconds[1] - extra_seconds[0]) / (lengths[1] - lengths[0])
    intercepted = 2 if run is _selective else 1  # selective checkpointing's forward and recompute
    return max(slope, 0.0) / intercepted

