"""Pareto fronts (step peak against recompute) of ResNet-50 and GPT-2, on fake tensors.

For each model, every plan on the front has the least recompute for its
predicted step peak (:func:`remat.pareto`), from storing everything (no
recompute) to the least peak. Planning runs on fake tensors: no activation
memory is allocated.

Run: ``make bench-pareto`` (or ``.venv/bin/python benchmarks/pareto.py``).
Writes ``benchmarks/results/pareto.md``, ``pareto_resnet50.png`` and
``pareto_gpt2.png``.
"""

from __future__ import annotations

import time
from pathlib import Path


import remat
from machine import results_header
from remat.tools import models
from remat.tools.plots import pareto_front

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

# (short name, spec, batch, one sample's shape or None)
MODELS = [
    ("resnet50", "torchvision:resnet50", 32, (3, 224, 224)),
    ("gpt2", "hf:gpt2?n_layer=12&seq=1024", 8, None),
]


def front_table(front: list[remat.Plan]) -> str:
    """The front as a markdown table: one row per plan, no recompute first."""
    lines = [
        "| plan | step peak (GiB) | recompute (% of forward) | kept activations | stored segments "
        "| selective stages | cheap values remade |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, plan in enumerate(front):
        first = "store everything" if plan.stores_everything else "no recompute"
        name = first if index == 0 else "least peak" if index == len(front) - 1 else ""
        peak = plan.predicted_peak_bytes / 2**30
        lines.append(
            f"| {name} | {peak:.3f} | {100 * plan.recompute_overhead:.1f} | {len(plan.checkpoints)} "
            f"| {len(plan.stored)} | {len(plan.selective)} | {'yes' if plan.remake else ''} |"
        )
    return "\n".join(lines)


def main() -> None:
    header = [
        *results_header(
            "Pareto fronts: step peak against recompute (fake tensors)",
            "python benchmarks/pareto.py",
            "bench-pareto",
        ),
        "",
        "Each row is a plan from `remat.pareto`: the least recompute for its predicted step peak",
        "(parameters, inputs, activations and gradients; default loss `mean(out**2)`). Recompute is",
        "the forward FLOPs run again in backward, as % of one forward. Peaks fall and recompute rises",
        "down each table, from the least peak with no recompute FLOPs (stages run selectively where",
        "that lowers the peak: they keep what their matmuls and convolutions made and remake the rest;",
        "or cheap values are remade one by one in backward, `remat.remake_cheap`, whose plans' peaks",
        "are simulated steps) to the least peak.",
    ]
    sections = []
    for name, spec, batch, shape in MODELS:
        start = time.perf_counter()
        source = models.load(spec, batch, input_shape=shape)
        front = remat.pareto(source.model, source.example_inputs)
        seconds = time.perf_counter() - start
        sample = "x".join(map(str, source.example_inputs[0].shape[1:]))
        title = f"{name}, batch {batch}, input {sample}"
        png = pareto_front(front, RESULTS / f"pareto_{name}.png", f"{title}: step peak against recompute")
        sections.append(
            "\n\n".join(
                [
                    f"## {title} (`{spec}`)",
                    f"{len(front)} plans, found in {seconds:.1f} s (capture, profile and every solve).",
                    front_table(front),
                    f"![{name} Pareto front]({png.name})",
                ]
            )
        )
        print(f"{name}: {len(front)} plans in {seconds:.1f} s, wrote {png}", flush=True)
    out = RESULTS / "pareto.md"
    out.write_text("\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
