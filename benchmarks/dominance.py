"""Dominance: remat at every peer's point, on fake tensors (whole-step peaks, counted FLOPs).

For each model at its standard size, every peer's training step is measured:
per-block checkpointing (``torch.utils.checkpoint`` around every block; Hugging Face
models: ``gradient_checkpointing_enable()``), the same with selective checkpointing's
usual policy (save the outputs of matmuls, convolutions and attention), sqrt(n) equal
segments (``checkpoint_sequential``'s split, on remat's capture of the model), and
``torch.compile``'s min-cut partitioner at each ``activation_memory_budget`` of
``--fractions``. remat is then planned at each peer's measured step peak
(``budget=`` that peak, ``objective="flops"``: the least recompute) and measured the
same way. A row is a win for remat where its measured peak is at most the peer's and it
recomputes no more FLOPs; "least" compares remat's least peak with the peer's.

One capture and profile of each model serves every remat plan (the planner's own
``ProfiledModel``): "plan s" is each plan's solve, the first row of a model also its
capture and profile.

Run: ``make bench-dominance`` (or ``.venv/bin/python benchmarks/dominance.py``); ``--all``
for every torchvision classification model, ``--only resnet50,vgg11`` for a subset (printed;
written only with ``--out``). Writes ``benchmarks/results/dominance.md``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from remat import InfeasibleBudget, measure_step
from remat.planner.choose import solve
from remat.planner.profiled import ProfiledModel
from remat.report import format_bytes
from remat.tools import models
from remat.tools.strategies import strategy
from machine import command_line, each_model, model_parser, pick_models, results_header, write_results

# (short name, spec, batch, per-sample input shape): one of each family, at standard sizes
MODELS = [
    ("resnet50", "torchvision:resnet50", 32, (3, 224, 224)),
    ("densenet121", "torchvision:densenet121", 16, (3, 224, 224)),
    ("mobilenet_v3_large", "torchvision:mobilenet_v3_large", 32, (3, 224, 224)),
    ("efficientnet_b0", "torchvision:efficientnet_b0", 32, (3, 224, 224)),
    ("vgg11", "torchvision:vgg11", 16, (3, 224, 224)),
    ("vit_b_16", "torchvision:vit_b_16", 16, (3, 224, 224)),
    ("swin_t", "torchvision:swin_t", 16, (3, 224, 224)),
    ("convnext_tiny", "torchvision:convnext_tiny", 16, (3, 224, 224)),
    ("gpt2", "hf:gpt2?n_layer=12&seq=1024", 4, None),
]
FRACTIONS = [round(0.1 * i, 1) for i in range(11)]
PEERS = ["checkpoint-blocks", "selective-blocks", "sqrt"]

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "dominance.md"


def every_torchvision_model() -> list[tuple]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return [(n, f"torchvision:{n}", 16, (3, 299, 299) if n == "inception_v3" else (3, 224, 224)) for n in names]


def total_flops(m) -> int:
    return m.forward_flops + m.backward_flops


def run_one(spec: str, batch: int, shape, fractions: list[float]) -> dict:
    source = models.load(spec, batch, input_shape=shape)
    model, x = source.model, source.example_inputs
    none = measure_step(model, x, fake=True)
    peers = {}
    for name in PEERS + [f"torch-budget@{f}" for f in fractions]:
        try:
            module, _ = strategy(name)(model, x, None)
            peers[name] = measure_step(module, x, fake=True)
        except Exception as error:  # a peer that cannot run this model: reported, not fatal
            peers[name] = f"{type(error).__name__}: {error}"[:120]
        torch._dynamo.reset()
        print(f"  {name}: {peers[name] if isinstance(peers[name], str) else format_bytes(peers[name].peak_bytes)}",
              flush=True)
    start = time.perf_counter()
    profiled = ProfiledModel.of(model, x, None)
    least = solve(profiled, None, objective="flops")
    setup = time.perf_counter() - start
    plans = {"least": (least, measure_step(profiled.module(least), x, fake=True), setup)}
    for name, peer in peers.items():
        if isinstance(peer, str):
            continue
        start = time.perf_counter()
        try:
            plan = solve(profiled, peer.peak_bytes, objective="flops")
        except InfeasibleBudget:
            plans[name] = None
            continue
        plans[name] = (plan, measure_step(profiled.module(plan), x, fake=True), time.perf_counter() - start)
        print(f"  remat at {name}: {format_bytes(plan.predicted_peak_bytes)} in {plans[name][2]:.1f} s", flush=True)
    return {"none": none, "peers": peers, "plans": plans}


def format_model(name: str, spec: str, batch: int, result: dict) -> tuple[list[str], int]:
    none, least = result["none"], result["plans"]["least"]
    forward = none.forward_flops

    def share(step) -> str:
        return f"{(total_flops(step) - total_flops(none)) / forward:.1%}"

    lines = [
        f"## {name} ({spec}, batch {batch})",
        "",
        f"Store everything: step peak {format_bytes(none.peak_bytes)}. remat's least peak: "
        f"{format_bytes(least[1].peak_bytes)} measured (predicted {format_bytes(least[0].predicted_peak_bytes)}), "
        f"recompute {share(least[1])} of a forward, capture + profile + plan {least[2]:.1f} s.",
        "",
        "| peer | peer step peak | peer recompute (% fwd) | remat step peak (predicted) | remat recompute (% fwd) "
        "| plan s | least peak | at the peer's peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    losses = 0
    for peer_name, peer in result["peers"].items():
        if isinstance(peer, str):
            lines.append(f"| {peer_name} | failed: {peer} | | | | | | |")
            continue
        least_verdict = "yes" if least[1].peak_bytes <= peer.peak_bytes else "**NO**"
        planned = result["plans"].get(peer_name)
        if planned is None:
            losses += 1
            lines.append(f"| {peer_name} | {format_bytes(peer.peak_bytes)} | {share(peer)} | no plan | | | {least_verdict} | **NO** |")
            continue
        plan, step, seconds = planned
        wins = step.peak_bytes <= peer.peak_bytes and total_flops(step) <= total_flops(peer)
        losses += (not wins) + (least_verdict != "yes")
        lines.append(
            f"| {peer_name} | {format_bytes(peer.peak_bytes)} | {share(peer)} | {format_bytes(step.peak_bytes)} "
            f"({'=' if plan.predicted_peak_bytes == step.peak_bytes else format_bytes(plan.predicted_peak_bytes)}) "
            f"| {share(step)} | {seconds:.1f} | {least_verdict} | {'yes' if wins else '**NO**'} |"
        )
    return lines + [""], losses


def main(argv=None) -> int:
    parser = model_parser(__doc__, DEFAULT_OUT, timeout=3600)
    parser.add_argument("--all", action="store_true", help="every torchvision classification model (batch 16)")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                        help="torch.compile activation_memory_budget values (default 0.0,0.1,...,1.0)")
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    chosen, out = pick_models(parser, args, every_torchvision_model() if args.all else MODELS, DEFAULT_OUT)
    command = command_line("dominance.py")
    lines = [
        *results_header("remat at every peer's point (fake tensors)", command, "bench-dominance"),
        "",
        *__doc__.split("\n\n")[1:3],
        "",
        "Peaks are whole training steps (forward, `mean(out**2)`, backward) measured with",
        "`remat.measure_step(..., fake=True)`; recompute is the step's FLOPs beyond the unmodified",
        "model's (matmuls, convolutions, attention: pointwise operators count zero on both sides),",
        "as % of one forward. \"(=)\": remat's predicted peak equals its measured one.",
        "",
    ]
    failed, losses = False, 0
    for name, spec, batch, shape in chosen:
        found: list[int] = []

        def run() -> list[str]:
            model_lines, lost = format_model(name, spec, batch, run_one(spec, batch, shape, fractions))
            found.append(lost)
            return model_lines

        model_lines, ok = each_model(name, spec, batch, args.timeout, run)
        failed |= not ok
        lines += model_lines
        losses += sum(found)
    lines.insert(len(results_header("", "")), f"- verdicts where a peer wins: {losses}")
    write_results(lines, out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
