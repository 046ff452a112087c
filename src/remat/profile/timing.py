"""Time every chain stage's forward on the real device (``costs="profile"``).

FLOPs (the default cost) miss what memory-bound operators cost (normalizations,
pointwise ops, copies) and how fast each kernel runs on a given device. This
module runs the captured pieces forward, stage by stage, on the real example
inputs and times each stage: a few warm-up runs, then the median of repeats,
with CUDA events on a GPU. It runs without autograd (only the live values of
one forward are held) and leaves the model as it was: BatchNorm statistics,
``.grad`` and the random number generators are restored.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from remat.measure.step import step_model

__all__ = ["stage_seconds"]


def _timer(device: torch.device | None) -> Callable[[Callable[[], Any]], tuple[float, Any]]:
    """``time(run) -> (seconds, result)``: CUDA events on a GPU, the wall clock otherwise."""
    if device is not None and device.type == "cuda":

        def time_cuda(run: Callable[[], Any]) -> tuple[float, Any]:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = run()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / 1e3, result

        return time_cuda

    def time_host(run: Callable[[], Any]) -> tuple[float, Any]:
        start = time.perf_counter()
        result = run()
        return time.perf_counter() - start, result

    return time_host


def stage_seconds(
    host: torch.nn.Module,
    inputs: tuple,
    stage_pieces: Sequence[Sequence[int]],
    loss_fn: Callable[[Any], torch.Tensor],
    *,
    warmup: int = 2,
    repeats: int = 5,
) -> np.ndarray:
    """Median forward seconds of every chain stage (the loss last).

    Args:
        host: a :class:`~remat.execute.module.RematModule` over the captured model
            (it runs the pieces with the model's own modules and tensors).
        inputs: the graph's flat inputs, real tensors on the model's device.
        stage_pieces: the pieces of each chain stage, in order.
        loss_fn: the model output -> scalar loss (the chain's last stage).
        warmup / repeats: untimed runs, then timed runs of each stage.
    """
    captured = host.captured
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), None)
    measure = _timer(device)
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    seconds = []
    with torch.random.fork_rng(devices=devices), step_model(host, inputs, fake=False), torch.no_grad():
        values: dict[int, Any] = {}
        last = len(captured.modules) - 1

        def run(pieces: Sequence[int]) -> dict[int, Any]:
            made = {}
            for p in pieces:
                read = tuple(made[q] if q in made else values[q] for q in captured.reads[p])
                made[p] = captured.modules[p](read, host, *inputs)
            return made

        for pieces in stage_pieces:
            for _ in range(warmup):
                run(pieces)
            times = []
            for _ in range(repeats):
                elapsed, made = measure(lambda: run(pieces))
                times.append(elapsed)
            seconds.append(statistics.median(times))
            values.update(made)
            done = pieces[-1]
            values = {q: v for q, v in values.items() if captured.last_reader[q] > done or q == last}
        output = host.structured_output(values[last])
        for _ in range(warmup):
            loss_fn(output)
        seconds.append(statistics.median(measure(lambda: loss_fn(output))[0] for _ in range(repeats)))
    return np.asarray(seconds, dtype=np.float64)
