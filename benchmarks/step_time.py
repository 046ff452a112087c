"""Step time of remat's plans against the peers, on real CPU tensors, steps interleaved.

For each model, at a launch-bound size (small inputs: per-operator overhead dominates, as
on a fast GPU) and a compute-bound size, every strategy runs in one process, one step each
per round, first round not counted, median of ``--steps`` rounds (at least 7):

- ``eager``: the model as it is (saves everything);
- ``checkpoint-blocks``: ``torch.utils.checkpoint`` around every block (Hugging Face models:
  ``gradient_checkpointing_enable``), see :func:`remat.tools.strategies.checkpoint_blocks`;
- ``remat least``: :func:`remat.optimize`, the least peak;
- ``remat @blocks``: the plan predicted fastest within checkpoint-blocks' measured step peak;
- ``remat 0-FLOP``: the lowest-peak plan of :func:`remat.pareto` that recomputes no FLOPs;
- ``remat least, aot_eager`` and ``remat @blocks, aot_eager``: the same two plans made with
  ``compile="aot_eager"`` (:mod:`remat.execute.compiled`): one compiled forward and backward
  of ATen operators whose partition saves what the plan keeps; ``remat 0-FLOP, aot_eager``:
  the lowest-peak plan of ``remat.pareto(..., remake=False)`` that recomputes no FLOPs,
  compiled (its peak is that plan's compiled step); ``remat least, inductor``:
  the least-peak plan with ``compile="inductor"``, the same partition in fused kernels (its
  peak column is the aot_eager row's);
- ``compile``: ``torch.compile`` (inductor) saving what PyTorch's partitioner saves by default;
  ``compile@0.5``: the same at ``activation_memory_budget=0.5``;
- ``remat least, compiled``: ``torch.compile`` (inductor) of remat's least-peak module: the
  plan's recomputed segments are checkpoint regions that the partitioner recomputes (fused);
  remade values and selective stages are left to the partitioner (no peak where a recomputed
  segment draws random numbers: the storage tracker cannot follow the operator that saves
  the RNG state in compiled checkpoints).

One thread (``torch.set_num_threads(1)``): the timings stay ratios of work done, not of how
two cores are shared with whatever else runs. Columns: the step peak (real tensors, the exact storage tracker; for compiled rows, the
same partition run operator by operator by aot_eager, since inductor's buffers bypass the
dispatcher), forward + backward FLOPs over eager's (``-`` for compiled rows: their kernels
are not counted), step time over eager's, remat's predicted step time over eager's
(``Plan.predicted_slowdown``, the step-time model at the rates it measured on this CPU), and planning (remat: capture + solve; compile:
the first, compiling step; remat compiled: both). Writes ``benchmarks/results/step_time.md``.

Run: ``make bench-time`` (about half an hour on 2 cores), or ``--only resnet50`` for a subset.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import remat
from machine import pick_models, results_header
from remat.measure.step import default_loss, measure_step
from remat.report import format_bytes
from remat.tools import models
from remat.tools.strategies import TorchBudgetModule, checkpoint_blocks, step_seconds

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "step_time.md"

# (name, spec, (batch, per-sample shape) launch-bound, (batch, shape) compute-bound)
MODELS = [
    ("resnet50", "torchvision:resnet50", (2, (3, 64, 64)), (8, (3, 160, 160))),
    ("densenet121", "torchvision:densenet121", (2, (3, 64, 64)), (8, (3, 128, 128))),
    ("vit_b_16", "torchvision:vit_b_16", (1, (3, 224, 224)), (4, (3, 224, 224))),
    ("gpt2-4", "hf:gpt2?n_layer=4", (1, (32,)), (4, (256,))),
]
COMPILED = (1.0, 0.5)  # activation_memory_budget of the compiled rows


def compiled(model: torch.nn.Module, inputs: tuple, fraction: float) -> tuple[torch.nn.Module, float]:
    """``model`` under torch.compile (inductor) at ``fraction``, compiled by one step; and that step's seconds.

    The budget is set inside the backend, where the partitioner runs, so a recompile at any
    later call keeps it; each fraction is its own backend, so their compiled graphs are never
    mixed up (Dynamo guards on the backend).
    """
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        with torch._functorch.config.patch(activation_memory_budget=fraction):
            return compile_fx(gm, example_inputs)

    module = torch.compile(model, backend=backend)
    start = time.perf_counter()
    default_loss(module(*inputs)).backward()
    for p in model.parameters():
        p.grad = None
    return module, time.perf_counter() - start


def run_one(
    name: str, spec: str, batch: int, shape: tuple | None, steps: int, with_compile: bool, device: str = "cpu"
) -> list[dict]:
    """Every strategy's row for one model at one size, on ``device``."""
    source = models.load(spec, batch, input_shape=shape)
    model = source.model.to(device)
    x = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in source.example_inputs)
    shape = shape or tuple(source.example_inputs[0].shape[1:])
    start = time.perf_counter()
    least = remat.optimize(model, x)
    planning = {"remat least": time.perf_counter() - start}
    blocks = checkpoint_blocks(model)
    blocks_peak = measure_step(blocks, x).peak_bytes
    at_blocks = {}
    start = time.perf_counter()
    try:
        at_blocks["remat @blocks"] = remat.optimize(model, x, budget=blocks_peak)
        planning["remat @blocks"] = time.perf_counter() - start
    except remat.InfeasibleBudget:  # per-block's measured peak is below remat's least: no row
        pass
    aot_eager = {}
    for label, budget in (("remat least, aot_eager", None), ("remat @blocks, aot_eager", blocks_peak)):
        start = time.perf_counter()
        try:
            aot_eager[label] = remat.optimize(model, x, budget=budget, compile="aot_eager")
        except remat.InfeasibleBudget:  # compiled, no plan reaches per-block's peak: no row
            continue
        planning[label] = time.perf_counter() - start
    start = time.perf_counter()
    zero = [p for p in remat.pareto(model, x) if p.recompute_flops == 0][-1]
    planning["remat 0-FLOP"] = time.perf_counter() - start
    # Compiled plans have no remade values: the lowest 0-FLOP plan without them.
    start = time.perf_counter()
    zero_plain = [p for p in remat.pareto(model, x, remake=False) if p.recompute_flops == 0][-1]
    aot_eager["remat 0-FLOP, aot_eager"] = remat.optimize(model, x, plan=zero_plain, compile="aot_eager")
    planning["remat 0-FLOP, aot_eager"] = time.perf_counter() - start
    modules = {
        "eager": model,
        "checkpoint-blocks": blocks,
        "remat least": least,
        **at_blocks,
        "remat 0-FLOP": remat.optimize(model, x, plan=zero),
        **aot_eager,
    }
    predicted = {label: modules[label].plan.predicted_slowdown for label in modules if label.startswith("remat")}
    predicted["remat 0-FLOP, aot_eager"] = None  # a plan made for the eager engine, not priced compiled
    measured = {label: measure_step(module, x) for label, module in modules.items()}
    if with_compile:
        torch._dynamo.reset()
        for fraction in COMPILED:
            label = "compile" if fraction == 1.0 else f"compile@{fraction}"
            # Peak: the same partition, run operator by operator (eager compilers) under the tracker.
            measured[label] = measure_step(TorchBudgetModule(model, fraction), x)
            modules[label], planning[label] = compiled(model, x, fraction)
        # remat's least-peak plan compiled: its recomputed segments are checkpoint regions the
        # partitioner recomputes, fused; elsewhere the partitioner saves as by default.
        try:
            measured["remat least, compiled"] = measure_step(TorchBudgetModule(least, 1.0), x)
        except NotImplementedError:
            # A compiled checkpoint around dropout saves the RNG state with an operator
            # (run_and_save_rng_state) that the storage tracker cannot follow: no peak.
            measured["remat least, compiled"] = None
        modules["remat least, compiled"], compile_seconds = compiled(least, x, 1.0)
        planning["remat least, compiled"] = planning["remat least"] + compile_seconds
        # remat's least peak planned for inductor: the same partition as its aot_eager row
        # (whose peak it is: inductor's buffers bypass the dispatcher), fused kernels.
        start = time.perf_counter()
        modules["remat least, inductor"] = remat.optimize(model, x, compile="inductor")
        planning["remat least, inductor"] = time.perf_counter() - start
        measured["remat least, inductor"] = measured["remat least, aot_eager"]
        predicted["remat least, inductor"] = None
    seconds = step_seconds(modules, x, steps)
    eager = measured["eager"]
    eager_flops = eager.forward_flops + eager.backward_flops
    rows = []
    for label, step in measured.items():
        flops = step.forward_flops + step.backward_flops if step is not None else 0
        rows.append({
            "model": name, "size": f"b{batch} {'x'.join(map(str, shape))}", "strategy": label,
            "peak": step and step.peak_bytes, "activation_peak": step and step.activation_peak_bytes,
            "flops_ratio": None if "compile" in label else flops / eager_flops,
            "time_ratio": seconds[label] / seconds["eager"], "ms": seconds[label] * 1e3,
            "predicted": predicted.get(label),
            "planning": planning.get(label),
        })
    return rows


def _bytes(n: int | None) -> str:
    return "-" if n is None else format_bytes(n)


def table(rows: list[dict]) -> list[str]:
    """The rows of :func:`run_one` as a markdown table."""
    lines = [
        "| model | size | strategy | step peak | activation peak | FLOPs / eager | time / eager | predicted | step ms | planning s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flops = "-" if r["flops_ratio"] is None else f"{r['flops_ratio']:.3f}"
        planning = "-" if r["planning"] is None else f"{r['planning']:.1f}"
        predicted = "-" if r.get("predicted") is None else f"{r['predicted']:.3f}"
        lines.append(
            f"| {r['model']} | {r['size']} | {r['strategy']} | {_bytes(r['peak'])} | "
            f"{_bytes(r['activation_peak'])} | {flops} | {r['time_ratio']:.3f} | {predicted} | {r['ms']:.1f} | "
            f"{planning} |"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model names (e.g. resnet50,gpt2-4)")
    parser.add_argument("--out", type=Path, help=f"results file (default {DEFAULT_OUT} for a full run)")
    parser.add_argument("--steps", type=int, default=7, help="timed rounds (median; at least 7)")
    parser.add_argument("--sizes", default="launch,compute", help="launch, compute or both")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    args = parser.parse_args(argv)
    if args.steps < 7:
        parser.error("--steps: at least 7 rounds")
    chosen, out = pick_models(parser, args, MODELS, DEFAULT_OUT)
    torch.set_num_threads(1)
    sizes = args.sizes.split(",")
    rows = []
    for name, spec, launch, compute in chosen:
        for size, (batch, shape) in (("launch", launch), ("compute", compute)):
            if size not in sizes:
                continue
            print(f"{name} {size} (batch {batch}, {shape}) ...", flush=True)
            rows += run_one(name, spec, batch, shape, args.steps, not args.no_compile)
            for row in rows[-(12 if not args.no_compile else 8):]:
                print("  ", row, flush=True)
    command = "python benchmarks/step_time.py" + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    lines = results_header("Step time against the peers (real CPU tensors)", command, "bench-time")
    lines += ["", __doc__.split("\n\n", 2)[1].replace("\n", " "), "", *table(rows)]
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
