"""Measure one training step of a model and print what it costs.

Run ``python -m remat.demo`` (or ``make demo``) for the default: torchvision
ResNet-50, batch 32, 3x224x224, simulated on fake tensors (no memory used,
about a second). Any model spec works, e.g.
``python -m remat.demo hf:gpt2?n_layer=4 --batch 4``; ``--real`` runs it on
real CPU tensors instead.
"""

from __future__ import annotations

import argparse
import time

from remat import measure_step, models
from remat.report import format_bytes, format_table

DEFAULT_SPEC = "torchvision:resnet50"
DEFAULT_BATCH = 32


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m remat.demo", description=__doc__.split("\n")[0])
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
    m = measure_step(source.model, source.example_inputs, fake=not args.real)

    shape = " x ".join("x".join(map(str, x.shape[1:])) or "scalar" for x in source.example_inputs)
    rows = [
        ("model", source.name),
        ("batch", args.batch),
        ("input (one sample)", shape),
        ("tensors", "real (CPU)" if args.real else "fake (simulated)"),
        ("step peak", format_bytes(m.peak_bytes)),
        ("activation peak", format_bytes(m.activation_peak_bytes)),
        ("saved for backward", format_bytes(m.saved_bytes)),
        ("parameters", format_bytes(m.parameter_bytes)),
        ("forward GFLOPs", f"{m.forward_flops / 1e9:.1f}"),
        ("backward GFLOPs", f"{m.backward_flops / 1e9:.1f}"),
        ("measurement time", f"{m.seconds:.2f} s"),
        ("model build time", f"{build_seconds:.2f} s"),
    ]
    print(format_table(rows, ["", "baseline"]))


if __name__ == "__main__":
    main()
