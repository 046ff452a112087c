"""How long a plan takes to make: the least peak and budget plans, on fake tensors, capture included.

For each model at its standard size, ``remat.plan`` is called (in one process, each call
from scratch: capture, profile, solve) for the least peak, and within three budgets: the
step peak of per-block checkpointing (``torch.utils.checkpoint`` around every block,
measured), 1.1x remat's least peak, and 40% of the way from the least peak to storing
everything. The default objective (the least predicted step time) throughout.

Run: ``make bench-plan`` (or ``.venv/bin/python benchmarks/planning_time.py``); ``--only resnet50`` for a subset
(printed; written only with ``--out``). Writes ``benchmarks/results/planning_time.md``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import remat
from remat import measure_step
from remat.report import format_bytes
from remat.tools import models
from remat.tools.strategies import checkpoint_blocks
from machine import command_line, each_model, model_parser, pick_models, results_header, write_results

MODELS = [
    ("resnet50", "torchvision:resnet50", 64, (3, 224, 224)),
    ("resnet152", "torchvision:resnet152", 16, (3, 224, 224)),
    ("densenet121", "torchvision:densenet121", 32, (3, 224, 224)),
    ("efficientnet_b0", "torchvision:efficientnet_b0", 64, (3, 224, 224)),
    ("gpt2", "hf:gpt2?n_layer=12&seq=1024", 8, None),
]
ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "planning_time.md"


def run_one(name: str, spec: str, batch: int, shape) -> list[str]:
    source = models.load(spec, batch, input_shape=shape, fake=True)
    model, x = source.model, source.example_inputs
    start = time.perf_counter()
    least = remat.plan(model, x)
    rows = [("least peak", None, least, time.perf_counter() - start)]
    per_block = measure_step(checkpoint_blocks(model), x, fake=True).peak_bytes
    budgets = {
        "per-block checkpointing's peak": per_block,
        "1.1x the least peak": int(1.1 * least.predicted_peak_bytes),
        "40% towards storing everything": int(0.6 * least.predicted_peak_bytes + 0.4 * least.baseline_peak_bytes),
    }
    for label, budget in budgets.items():
        start = time.perf_counter()
        plan = remat.plan(model, x, budget=budget)
        rows.append((label, budget, plan, time.perf_counter() - start))
    lines = []
    for label, budget, plan, seconds in rows:
        lines.append(
            f"| {name} b{batch} | {label} | {format_bytes(budget) if budget else '-'} | "
            f"{format_bytes(plan.predicted_peak_bytes)} | {plan.recompute_overhead:.1%} | "
            f"{'yes' if plan.remake else 'no'} | {seconds:.1f} | {plan.solve_seconds:.1f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    parser = model_parser(__doc__, DEFAULT_OUT, timeout=1200)
    args = parser.parse_args(argv)
    chosen, out = pick_models(parser, args, MODELS, DEFAULT_OUT)
    command = command_line("planning_time.py")
    lines = [
        *results_header("Planning time (fake tensors)", command, "bench-plan"),
        "",
        __doc__.split("\n\n")[1],
        "",
        "| model | plan | budget | predicted step peak | recompute (% fwd) | remade values | plan s (all) | of which solve s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    failed = False
    for name, spec, batch, shape in chosen:
        model_lines, ok = each_model(name, spec, batch, args.timeout, lambda: run_one(name, spec, batch, shape))
        failed |= not ok
        lines += model_lines if ok else [f"| {name} b{batch} | failed: {model_lines[2].removeprefix('FAILED: ')} | | | | | | |"]
    write_results(lines, out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
