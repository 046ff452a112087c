"""End-to-end: least-peak plans for the acceptance models at standard sizes.

Everything is measured on fake tensors (no activation memory is allocated):
the baseline is one training step of the unmodified model, the optimized
figure one step of the :class:`~remat.execute.module.RematModule` that
``remat.optimize`` returns, both with ``remat.measure_step(..., fake=True)``.

Run: ``make bench-e2e`` (or ``.venv/bin/python benchmarks/e2e_models.py``).
Writes ``benchmarks/results/e2e_models.md``. ``--only resnet50,gpt2`` runs a
subset (and then prints but does not write the results file unless ``--out``
is given).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

import remat
from remat import measure_step
from remat.tools import models
from remat.report import format_bytes
from machine import pick_models, results_header

# (short name, spec, batch, per-sample input shape or None, target activation cut or None,
#  whether the step accumulates into existing parameter gradients)
MODELS = [
    ("resnet152", "torchvision:resnet152", 16, (3, 224, 224), 0.85),
    ("resnet152+accum", "torchvision:resnet152", 16, (3, 224, 224), 0.85, True),
    ("densenet201", "torchvision:densenet201", 16, (3, 224, 224), 0.88),
    ("resnet50", "torchvision:resnet50", 64, (3, 224, 224), 0.70),
    ("inception_v3", "torchvision:inception_v3?init_weights=false", 32, (3, 300, 300), 0.75),
    ("gpt2", "hf:gpt2?n_layer=12&seq=1024", 8, None, 0.70),
    ("vit_b_16", "torchvision:vit_b_16", 16, (3, 224, 224), None),
    ("swin_t", "torchvision:swin_t", 16, (3, 224, 224), None),
    ("mobilenet_v3_large", "torchvision:mobilenet_v3_large", 16, (3, 224, 224), None),
    ("vgg16", "torchvision:vgg16", 16, (3, 224, 224), None),
    ("preact_resnet1001", "remat:preact_resnet?depth=1001", 16, None, None),
]
PLANNING_TARGETS = {"resnet152": 10.0, "resnet152+accum": 10.0, "preact_resnet1001": 30.0}  # s, capture + solve

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "e2e_models.md"


def run_one(name: str, spec: str, batch: int, shape, target, accumulate: bool = False) -> dict:
    source = models.load(spec, batch, input_shape=shape)
    model, inputs = source.model, source.example_inputs
    baseline = measure_step(model, inputs, fake=True, grad_accumulation=accumulate)
    start = time.perf_counter()
    fast = remat.optimize(model, inputs, grad_accumulation=accumulate)
    optimize_seconds = time.perf_counter() - start
    plan = fast.plan
    measured = measure_step(fast, inputs, fake=True, grad_accumulation=accumulate)
    act_cut = 1 - measured.activation_peak_bytes / baseline.activation_peak_bytes
    row = {
        "model": name,
        "batch": batch,
        "input": "x".join(map(str, inputs[0].shape[1:])) if inputs[0].dim() > 2 else f"seq {inputs[0].shape[1]}",
        "baseline_peak": baseline.peak_bytes,
        "optimized_peak": measured.peak_bytes,
        "baseline_act": baseline.activation_peak_bytes,
        "optimized_act": measured.activation_peak_bytes,
        "act_cut": act_cut,
        "peak_cut": 1 - measured.peak_bytes / baseline.peak_bytes,
        "target": target,
        "met": None if target is None else act_cut >= target,
        "recompute": plan.recompute_overhead,
        "pred_error": plan.predicted_peak_bytes / measured.peak_bytes - 1,
        "planning_s": plan.capture_seconds + plan.solve_seconds,
        "optimize_s": optimize_seconds,
        "planning_target": PLANNING_TARGETS.get(name),
        "stages": len(plan.stage_names),
        "checkpoints": len(plan.checkpoints),
        "nested": sum(len(cs) for _, _, cs in plan.inner),
        "accumulate": accumulate,
    }
    del fast, model, source
    gc.collect()
    return row


def format_rows(rows: list[dict]) -> str:
    headers = [
        "model", "batch", "input", "parameter gradients", "stages", "kept (nested)", "baseline step peak",
        "optimized step peak", "activation peak baseline", "activation peak optimized", "activation cut", "target cut",
        "met", "recompute (% of fwd)", "predicted vs measured peak", "planning s (capture+solve)",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | | | | | FAILED: {r['error']} |" + " |" * (len(headers) - 7))
            continue
        planning = f"{r['planning_s']:.2f}"
        if r["planning_target"] is not None:
            ok = "met" if r["planning_s"] < r["planning_target"] else "NOT met"
            planning += f" (target < {r['planning_target']:.0f} s: {ok})"
        cells = [
            r["model"], str(r["batch"]), r["input"], "accumulated" if r["accumulate"] else "made in backward",
            str(r["stages"]), f"{r['checkpoints']} ({r['nested']})",
            format_bytes(r["baseline_peak"]), format_bytes(r["optimized_peak"]),
            format_bytes(r["baseline_act"]), format_bytes(r["optimized_act"]),
            f"{r['act_cut']:.1%}",
            "-" if r["target"] is None else f"{r['target']:.0%}",
            "-" if r["met"] is None else ("met" if r["met"] else "NOT met"),
            f"{r['recompute']:.1%}" + ("" if r["recompute"] <= 1.0 else " (> 100%!)"),
            f"{r['pred_error']:+.3%}",
            planning,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated short names (e.g. resnet50,gpt2)")
    parser.add_argument("--out", type=Path, help=f"results file (default {DEFAULT_OUT} for a full run)")
    args = parser.parse_args(argv)
    chosen, out = pick_models(parser, args, MODELS, DEFAULT_OUT)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    command = "python benchmarks/e2e_models.py" + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    header = [
        *results_header("End-to-end least-peak plans (fake tensors)", command, "bench-e2e"),
        "",
        "Peaks are one training step (forward, default loss `mean(out**2)`, backward), measured",
        "with `remat.measure_step(..., fake=True)`: the baseline on the unmodified model, the",
        "optimized on the `RematModule` from `remat.optimize`. Step peak includes parameters,",
        "inputs and gradients; activation peak excludes them. Activation cut = 1 - optimized /",
        "baseline activation peak. Recompute = extra forward FLOPs in backward as % of one forward.",
        "Predicted vs measured = plan.predicted_peak_bytes / measured optimized step peak - 1.",
        "Planning = capture (trace + fake-tensor profile) + solve, from the plan. Kept: checkpoints",
        "of the forward pass (nested: kept inside recomputes). Parameter gradients \"accumulated\":",
        "the step adds into gradients that exist from the start (gradient accumulation), planned with",
        "`remat.optimize(..., grad_accumulation=True)` and measured with",
        "`measure_step(..., grad_accumulation=True)`; the activation peak does not count them.",
        "",
    ]
    rows = []
    for name, spec, batch, shape, target, *accumulate in chosen:
        start = time.perf_counter()
        print(f"{name} (batch {batch}) ...", flush=True)
        try:
            row = run_one(name, spec, batch, shape, target, *accumulate)
        except Exception as error:  # report and go on with the other models
            row = {"model": name, "batch": batch, "error": f"{type(error).__name__}: {error}"[:300]}
        rows.append(row)
        print(f"  done in {time.perf_counter() - start:.1f} s: {row}", flush=True)
    text = "\n".join(header) + format_rows(rows) + "\n"
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
