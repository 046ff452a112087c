"""remat's budget plans against torch.compile's min-cut partitioner under ``activation_memory_budget``.

For each model, at budgets of 90/70/50/30% of the store-everything activation
peak (``P - (1 - f) * A``, as in tests/test_budget.py), one training step of
``remat.optimize(model, x, budget=..., objective="flops")`` is measured on fake tensors; its
measured step peak is then the target for PyTorch's own answer: the model
under ``torch.compile`` with ``aot_autograd``, the min-cut partitioner and
eager (``aot_eager``'s boxed) compilers, at the ``activation_memory_budget``
with the least recompute whose measured step peak is no higher
(:class:`remat.tools.strategies.TorchBudgetSearch`: 1.0, a grid, a closer look
around the lowest peak where nothing fits, then bisection).
Both are measured the same way, by ``remat.measure_step(..., fake=True)``, and
recompute is the step's FLOPs beyond those of the unmodified model.

Run: ``make bench-compile`` (or ``.venv/bin/python benchmarks/compile_budget.py``).
Writes ``benchmarks/results/compile_budget.md``. ``--only resnet50,gpt2`` runs
a subset (printed; written only with ``--out``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import remat
from remat import InfeasibleBudget, measure_step
from remat.tools import models
from remat.report import format_bytes
from remat.tools.strategies import TorchBudgetSearch
from machine import command_line, each_model, model_parser, pick_models, results_header, write_results

# (short name, spec, batch, per-sample input shape or None): the standard sizes of e2e_models.py
MODELS = [
    ("resnet50", "torchvision:resnet50", 64, (3, 224, 224)),
    ("gpt2", "hf:gpt2?n_layer=12&seq=1024", 8, None),
    ("densenet121", "torchvision:densenet121", 16, (3, 224, 224)),
    ("vit_b_16", "torchvision:vit_b_16", 16, (3, 224, 224)),
]
FRACTIONS = [0.9, 0.7, 0.5, 0.3]

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "compile_budget.md"


def total_flops(m) -> int:
    return m.forward_flops + m.backward_flops


def run_one(spec: str, batch: int, shape) -> dict:
    """remat's plan and torch's tuned budget at each fraction, and every torch trial."""
    source = models.load(spec, batch, input_shape=shape)
    model, x = source.model, source.example_inputs
    none = measure_step(model, x, fake=True)
    search = TorchBudgetSearch(model, x)
    rows = []
    for fraction in FRACTIONS:
        budget = int(none.peak_bytes - (1 - fraction) * none.activation_peak_bytes)
        row = {"fraction": fraction, "budget": budget}
        try:
            optimized = remat.optimize(model, x, budget=budget, objective="flops")
        except InfeasibleBudget as error:
            row["remat_error"] = f"no plan: least peak {format_bytes(error.least_peak_bytes)}"
            rows.append(row)
            continue
        planned = measure_step(optimized, x, fake=True)
        row.update(remat_peak=planned.peak_bytes, remat_recompute=total_flops(planned) - total_flops(none))
        found = search.least_recompute_within(planned.peak_bytes)
        if found is not None:
            chosen = search.trials[found]
            row.update(torch_budget=found, torch_peak=chosen.peak_bytes,
                       torch_recompute=total_flops(chosen) - total_flops(none))
        rows.append(row)
        print(f"  {fraction:.0%}: {row}", flush=True)
    trials = [
        (b, m.peak_bytes, total_flops(m) - total_flops(none), search.seconds[b])
        for b, m in sorted(search.trials.items())
    ]
    return {"none": none, "rows": rows, "trials": trials}


def gflop(flops: int) -> str:
    return f"{flops / 1e9:,.1f}"


def format_model(name: str, spec: str, batch: int, result: dict) -> list[str]:
    none = result["none"]
    forward = none.forward_flops
    lines = [
        f"## {name} ({spec}, batch {batch})",
        "",
        f"Store everything: step peak {format_bytes(none.peak_bytes)}, activation peak "
        f"{format_bytes(none.activation_peak_bytes)}, forward {gflop(forward)} GFLOP.",
        "",
        "| budget (% of activations) | remat step peak | remat recompute GFLOP (% fwd) "
        "| torch activation_memory_budget | torch step peak | torch recompute GFLOP (% fwd) | remat <= torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        head = f"| {r['fraction']:.0%} ({format_bytes(r['budget'])})"
        if "remat_error" in r:
            lines.append(f"{head} | {r['remat_error']} | | | | | - |")
            continue
        remat_cells = f"{format_bytes(r['remat_peak'])} | {gflop(r['remat_recompute'])} ({r['remat_recompute'] / forward:.1%})"
        if "torch_budget" not in r:
            lines.append(f"{head} | {remat_cells} | none tried reaches it | | | yes |")
            continue
        verdict = "yes" if r["remat_recompute"] <= r["torch_recompute"] else "**NO**"
        lines.append(
            f"{head} | {remat_cells} | {r['torch_budget']:.4g} | {format_bytes(r['torch_peak'])} | "
            f"{gflop(r['torch_recompute'])} ({r['torch_recompute'] / forward:.1%}) | {verdict} |"
        )
    seconds = [t[3] for t in result["trials"]]
    lines += [
        "",
        f"torch.compile trials ({len(seconds)}, compile + one measured step each: "
        f"{sum(seconds):.0f} s in all, {min(seconds):.1f} to {max(seconds):.1f} s each):",
        "",
        "| activation_memory_budget | step peak | recompute GFLOP (% fwd) |",
        "|---|---|---|",
        *(f"| {b:.4g} | {format_bytes(peak)} | {gflop(flops)} ({flops / forward:.1%}) |"
          for b, peak, flops, _ in result["trials"]),
        "",
    ]
    return lines


def main(argv=None) -> int:
    parser = model_parser(__doc__, DEFAULT_OUT, timeout=1200)
    args = parser.parse_args(argv)
    chosen, out = pick_models(parser, args, MODELS, DEFAULT_OUT)
    command = command_line("compile_budget.py")
    lines = [
        *results_header("remat budget plans against torch.compile's activation_memory_budget (fake tensors)",
                        command, "bench-compile"),
        "",
        "At each budget (the step peak if the activations alone shrank to that share of the",
        "store-everything activation peak), remat's plan (`remat.optimize(..., budget=, objective='flops')`) is measured;",
        "torch is `torch.compile` with `aot_autograd`, `min_cut_rematerialization_partition` and",
        "the `aot_eager` boxed compilers, at the `torch._functorch.config.activation_memory_budget`",
        "with the least recompute whose measured step peak is at most remat's (`TorchBudgetSearch`:",
        "1.0, then 0.75/0.5/0.25/0; if none fits, up to 3 rounds of the midpoints next to the lowest",
        "peak; then up to 5 bisection steps; trials shared between budgets). Where no fraction tried",
        "reaches remat's peak, remat wins by default: see the least peak in the trials table.",
        "Everything is one training step (forward, `mean(out**2)`, backward) measured with",
        "`remat.measure_step(..., fake=True)`; recompute = the step's FLOPs beyond the unmodified",
        "model's (`remat.measure.flop_formula`: torch.utils.flop_counter's formulas for matmuls,",
        "convolutions and attention, CPU attention counted as on CUDA; pointwise operators count",
        "zero, so both sides' recomputed pointwise ops are free here).",
        "",
    ]
    failed = False
    for name, spec, batch, shape in chosen:
        model_lines, ok = each_model(
            name, spec, batch, args.timeout, lambda: format_model(name, spec, batch, run_one(spec, batch, shape))
        )
        failed |= not ok
        lines += model_lines
    write_results(lines, out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
