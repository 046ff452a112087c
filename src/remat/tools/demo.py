"""Plan a model for the least training-step peak and show what it saves and costs.

Run ``python -m remat.tools.demo`` (or ``make demo``) for the default: torchvision
ResNet-50, batch 32, 3x224x224, simulated on fake tensors (no memory used):
the least-peak plan against the unmodified model, both measured.
Any model spec works, e.g. ``python -m remat.tools.demo hf:gpt2?n_layer=4 --batch 4``;
``--real`` runs on real CPU tensors instead.
"""

from __future__ import annotations

import argparse
import time

import remat
from remat import measure_step
from remat.tools import models
from remat.report import format_bytes, format_table

DEFAULT_SPEC = "torchvision:resnet50"
DEFAULT_BATCH = 32


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m remat.tools.demo", description=__doc__.split("\n")[0])
    parser.add_argument("spec", nargs="?", default=DEFAULT_SPEC, help=f"model spec (default {DEFAULT_SPEC})")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"batch size (default {DEFAULT_BATCH})")
    parser.add_argument("--real", action="store_true", help="run on real CPU tensors, not fake ones")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        source = models.load(args.spec, args.batch)
    except ValueError as error:
        parser.error(str(error))
    build_seconds = time.perf_counter() - start
    optimized = remat.optimize(source.model, source.example_inputs)
    plan = optimized.plan
    fake = not args.real
    before = measure_step(source.model, source.example_inputs, fake=fake)
    after = measure_step(optimized, source.example_inputs, fake=fake)

    def cut(a: int, b: int) -> str:
        return f"{1 - b / a:.1%}" if a else "-"

    shape = " x ".join("x".join(map(str, x.shape[1:])) or "scalar" for x in source.tensors)
    print(f"{source.name}, batch {args.batch}, input {shape}, "
          f"{'real CPU' if args.real else 'fake (simulated)'} tensors, model built in {build_seconds:.1f} s")
    rows = [
        ("step peak", format_bytes(before.peak_bytes), format_bytes(after.peak_bytes),
         cut(before.peak_bytes, after.peak_bytes)),
        ("activation peak", format_bytes(before.activation_peak_bytes),
         format_bytes(after.activation_peak_bytes),
         cut(before.activation_peak_bytes, after.activation_peak_bytes)),
        ("predicted step peak", "", format_bytes(plan.predicted_peak_bytes), ""),
        ("forward + backward GFLOPs", f"{(before.forward_flops + before.backward_flops) / 1e9:.1f}",
         f"{(after.forward_flops + after.backward_flops) / 1e9:.1f}", ""),
        ("recompute overhead", "", f"{plan.recompute_overhead:.1%} of a forward", ""),
        ("kept activations", "all", f"{len(plan.checkpoints)} of {len(plan.stage_names) - 1}", ""),
        ("planning time", "", f"{plan.capture_seconds + plan.solve_seconds:.1f} s", ""),
    ]
    print(format_table(rows, ["", "baseline", "remat", "cut"]))


if __name__ == "__main__":
    main()
