"""Where the executor's step time goes, on real CPU tensors (one thread, launch-bound sizes).

For each model: step time of plan variants over eager's (steps interleaved, median of 9),
and torch.profiler's events with the most self time per variant, so that what is not the
recompute itself shows: Python dispatch modes (remade values, selective stages),
the recompute machinery, BatchNorm recomputed. Then the fixed cost of one region: remat's
own, and a ``torch.utils.checkpoint`` call. Writes ``benchmarks/results/executor_profile.md``.

Run: ``python benchmarks/executor_profile.py`` (a few minutes).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

import remat
from machine import results_header
from remat.execute.recompute import run_recomputed
from remat.measure.step import default_loss, step_model
from remat.tools import models
from remat.tools.strategies import checkpoint_blocks, step_seconds

OUT = Path(__file__).resolve().parent / "results" / "executor_profile.md"
MODELS = [
    ("resnet50", "torchvision:resnet50", 2, (3, 64, 64)),
    ("densenet121", "torchvision:densenet121", 2, (3, 64, 64)),
    ("vit_b_16", "torchvision:vit_b_16", 1, (3, 224, 224)),
]
TOP = 8  # profiler events listed per variant


def variants(model: torch.nn.Module, x: tuple) -> dict[str, torch.nn.Module]:
    least = remat.optimize(model, x)
    zero = [p for p in remat.pareto(model, x) if p.recompute_flops == 0][-1]
    plain = dict(remake=False, remade_costly=())
    store = dataclasses.replace(zero, checkpoints=(), stored=(), selective=(), inner=(), **plain)
    return {
        "eager": model,
        "checkpoint-blocks": checkpoint_blocks(model),
        "remat, nothing kept (engine only)": remat.optimize(model, x, plan=store),
        f"remat least peak ({least.plan.recompute_flops / least.plan.forward_flops:.0%} of a fwd)": least,
        "remat least peak, no remade values": remat.optimize(model, x, plan=dataclasses.replace(least.plan, **plain)),
        f"remat 0-FLOP ({len(zero.selective)} selective stages, remade values)": remat.optimize(model, x, plan=zero),
        "remat 0-FLOP, no remade values": remat.optimize(model, x, plan=dataclasses.replace(zero, **plain)),
    }


def top_events(module: torch.nn.Module, x: tuple) -> list[tuple[str, float]]:
    """Events with the most self CPU time in one step (ms), averaged over 3 steps."""
    with step_model(module, x, fake=False) as (running, inputs):
        for _ in range(2):
            default_loss(running(*inputs)).backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                default_loss(running(*inputs)).backward()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.self_cpu_time_total / 3e3) for e in events[:TOP]]


def checkpoint_region_us(regions: int = 200, rounds: int = 20) -> dict[str, float]:
    """Microseconds per block of a tiny Linear+ReLU chain: plain, and each block its own
    region (remat's, or a ``torch.utils.checkpoint`` call), the rounds of each case interleaved."""
    lin, x = torch.nn.Linear(8, 8), torch.randn(4, 8, requires_grad=True)

    def chain(wrap) -> None:
        y = x
        for _ in range(regions):
            y = wrap(y)
        y.sum().backward()

    cases = {
        "plain block (forward + backward)": lambda y: lin(y).relu(),
        "checkpointed block, RNG state kept": lambda y: checkpoint(lambda t: lin(t).relu(), y, use_reentrant=False),
        "checkpointed block, no RNG state": lambda y: checkpoint(
            lambda t: lin(t).relu(), y, use_reentrant=False, preserve_rng_state=False
        ),
        "remat's region (RNG state kept, early stop)": lambda y: run_recomputed(lambda t: lin(t).relu(), [], y),
    }
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds + 1):
        for name, wrap in cases.items():
            start = time.perf_counter()
            chain(wrap)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s[1:]) / regions * 1e6 for name, s in seconds.items()}


def main() -> int:
    torch.set_num_threads(1)
    lines = results_header("Where the executor's step time goes (real CPU tensors, 1 thread)",
                           "python benchmarks/executor_profile.py")
    lines += ["", __doc__.split("\n\n")[1].replace("\n", " "), ""]
    for name, spec, batch, shape in MODELS:
        print(name, "...", flush=True)
        source = models.load(spec, batch, input_shape=shape)
        modules = variants(source.model, source.example_inputs)
        seconds = step_seconds(modules, source.example_inputs, 9)
        lines += [f"## {name}, batch {batch}, {'x'.join(map(str, shape))}", "",
                  "| variant | step ms | time / eager |", "|---|---|---|"]
        lines += [f"| {label} | {s * 1e3:.1f} | {s / seconds['eager']:.3f} |" for label, s in seconds.items()]
        for label, module in modules.items():
            if label.startswith("checkpoint-blocks"):
                continue
            events = ", ".join(f"{key} {ms:.1f}" for key, ms in top_events(module, source.example_inputs))
            lines += ["", f"- {label}: most self CPU time (ms per step): {events}"]
        lines.append("")
    lines += ["## One region", "", "| case | us per block |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in checkpoint_region_us().items()]
    text = "\n".join(lines) + "\n"
    OUT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
