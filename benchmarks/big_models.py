"""Models bigger than the machine: Llama-2-7B- and 70B-shaped configs planned without weights.

Each model is built from its spec with ``fake=True`` (on the meta device, then fake tensors:
no weights, no initialisation) and planned for its least peak and within a budget, each in
its own process, so the resident memory reported is that model's planning alone.

Run: ``make bench-big`` (or ``.venv/bin/python benchmarks/big_models.py``). Writes
``benchmarks/results/big_models.md``; ``--only llama-7b`` runs a subset (printed only).
Targets (issue 22): the 7B shape planned in under 60 s, the 70B in under 5 minutes, the
planning process under 8 GiB of RAM.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from machine import pick_models, results_header

LLAMA = "hf:llama?vocab_size=32000&max_position_embeddings=4096&seq=4096&dtype=bfloat16"
# (short name, spec, batch, budget, planning target in seconds)
MODELS = [
    ("llama-7b", f"{LLAMA}&hidden_size=4096&intermediate_size=11008&num_hidden_layers=32&num_attention_heads=32"
     "&num_key_value_heads=32", 1, "32GiB", 60),
    ("llama-70b", f"{LLAMA}&hidden_size=8192&intermediate_size=28672&num_hidden_layers=80&num_attention_heads=64"
     "&num_key_value_heads=8", 1, "260GiB", 300),
]
ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "big_models.md"


def run_one(spec: str, batch: int, budget: str | None) -> dict:
    import remat
    from remat.tools import models

    start = time.perf_counter()
    source = models.load(spec, batch, fake=True)
    built = time.perf_counter() - start
    start = time.perf_counter()
    plan = remat.plan(source.model, source.example_inputs, budget=budget)
    return {
        "build_s": built, "plan_s": time.perf_counter() - start, "baseline": plan.baseline_peak_bytes,
        "peak": plan.predicted_peak_bytes, "recompute": plan.recompute_overhead,
        "slowdown": plan.predicted_slowdown, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "parameters": sum(p.numel() for p in source.model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated short names")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", nargs=3, metavar=("SPEC", "BATCH", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        spec, batch, budget = args.one
        print(json.dumps(run_one(spec, int(batch), None if budget == "-" else budget)))
        return
    from remat.report import format_bytes

    chosen, out = pick_models(parser, args, MODELS, DEFAULT_OUT)
    header = "| model | parameters | budget | plan time (target) | baseline peak | plan peak | recompute | predicted time | planning RSS |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, spec, batch, budget, target in chosen:
        for limit in (None, budget):
            result = subprocess.run(
                [sys.executable, __file__, "--one", spec, str(batch), limit or "-"],
                capture_output=True, text=True, check=True,
            )
            r = json.loads(result.stdout.strip().splitlines()[-1])
            row = (
                f"| {name} (b{batch}) | {r['parameters'] / 1e9:.1f} B | {limit or 'least peak'} | "
                f"{r['plan_s']:.1f} s ({target} s) | {format_bytes(r['baseline'])} | {format_bytes(r['peak'])} | "
                f"{r['recompute']:.1%} of a forward | {r['slowdown']:.2f}x | {format_bytes(r['rss'])} |"
            )
            print(row, flush=True)
            lines.append(row)
    if out is not None:
        text = results_header(
            "Models bigger than the machine: planned without weights", "python benchmarks/big_models.py", "bench-big"
        )
        text += ["", "Specs: " + "; ".join(f"{n}: `{s}`" for n, s, *_ in chosen), "", *lines, ""]
        out.write_text("\n".join(text))


if __name__ == "__main__":
    main()
