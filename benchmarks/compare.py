"""remat against hand-written checkpointing: GPT-2 and ResNet-50, side by side.

For each model one training step is measured under each strategy with
``remat.measure_step(..., fake=True)`` (fake tensors: no activation memory is
allocated, nothing is timed):

* ``none``: the unmodified model;
* ``HF gradient_checkpointing_enable()`` (GPT-2 only): Hugging Face's own
  per-layer checkpointing, on a deep copy, train mode, ``use_cache=False``,
  ``use_reentrant=False``;
* ``per-layer torch.utils.checkpoint``: checkpointing by hand, one
  ``checkpoint(block, x, use_reentrant=False)`` per layer. For GPT-2 that is
  what ``gradient_checkpointing_enable`` does (same row); for ResNet-50 each
  Bottleneck (each child of layer1..layer4) is wrapped, on a deep copy;
* remat ``sqrt``, ``per-block`` (the strategies of :mod:`remat.tools.strategies`),
  the least-peak plan (``remat``) and ``remat@<per-layer peak>``: the least
  recompute whose step peak fits the per-layer baseline's measured peak.

The remat rows share one capture and profile of the model (as
:mod:`remat.tools.strategies` would do once per strategy) and use the same solvers.

Run: ``make bench-compare`` (or ``.venv/bin/python benchmarks/compare.py``).
Writes ``benchmarks/results/compare.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from remat import InfeasibleBudget, measure_step
from remat.tools import models
from remat.planner.choose import solve
from remat.planner.profiled import ProfiledModel
from remat.execute.engine import segment_starts
from remat.execute.module import RematModule
from remat.report import format_bytes
from remat.solvers.baselines import sqrt_segments, uniform_segments
from machine import results_header

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "compare.md"

# (short name, spec, batch, per-sample input shape or None)
MODELS = [
    ("gpt2", "hf:gpt2?n_layer=12&seq=1024", 8, None),
    ("resnet50", "torchvision:resnet50", 64, (3, 224, 224)),
]


class Checkpointed(nn.Module):
    """One block run under ``torch.utils.checkpoint`` (non-reentrant), as written by hand."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


def hf_checkpointed(model: nn.Module) -> nn.Module:
    """A deep copy of a Hugging Face model with its own gradient checkpointing on."""
    copied = copy.deepcopy(model)
    copied.config.use_cache = False
    with warnings.catch_warnings():  # transformers 5 names it deprecated (activation_checkpointing_enable)
        warnings.filterwarnings("ignore", "`gradient_checkpointing_enable` is deprecated", FutureWarning)
        copied.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return copied.train()


def resnet_per_layer(model: nn.Module) -> nn.Module:
    """A deep copy of a torchvision ResNet with every residual block checkpointed."""
    copied = copy.deepcopy(model)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(copied, stage)
        for name, block in list(layer.named_children()):
            setattr(layer, name, Checkpointed(block))
    return copied.train()


def run_one(name: str, spec: str, batch: int, shape) -> dict:
    source = models.load(spec, batch, input_shape=shape)
    model, inputs = source.model, source.example_inputs
    rows: list[tuple[str, object]] = []  # (strategy, StepMeasurement or note)

    start = time.perf_counter()
    none = measure_step(model, inputs, fake=True)
    rows.append(("none (unmodified)", none))

    if name == "gpt2":
        per_layer_label = "HF gradient_checkpointing_enable() = per-layer torch.utils.checkpoint"
        per_layer = measure_step(hf_checkpointed(model), inputs, fake=True)
    else:
        per_layer_label = "per-layer torch.utils.checkpoint (each Bottleneck)"
        per_layer = measure_step(resnet_per_layer(model), inputs, fake=True)
    rows.append((per_layer_label, per_layer))

    profiled = ProfiledModel.of(model, inputs, None)
    chain = profiled.chain

    def remat_module(checkpoints) -> RematModule:
        return RematModule(model, profiled.captured, segment_starts(profiled.stage_pieces, checkpoints))

    rows.append(("remat sqrt", measure_step(remat_module(sqrt_segments(chain).checkpoints), inputs, fake=True)))
    rows.append(
        ("remat per-block", measure_step(remat_module(uniform_segments(chain, chain.n).checkpoints), inputs, fake=True))
    )
    rows.append(("remat least peak", measure_step(profiled.module(solve(profiled, None)), inputs, fake=True)))
    budget = per_layer.peak_bytes
    label = f"remat @ per-layer peak ({format_bytes(budget)})"
    try:
        plan = solve(profiled, budget)
        rows.append((label, measure_step(profiled.module(plan), inputs, fake=True)))
    except InfeasibleBudget as error:
        rows.append((label, f"InfeasibleBudget: {error}"))
    seconds = time.perf_counter() - start
    return {
        "model": name,
        "batch": batch,
        "input": "x".join(map(str, shape)) if shape else f"seq {inputs[0].shape[1]}",
        "stages": chain.n,
        "none": none,
        "rows": rows,
        "seconds": seconds,
    }


HEADERS = ["strategy", "step peak", "vs none", "activation peak", "recompute (% of 1 fwd)", "recompute GFLOP"]


def format_result(result: dict) -> str:
    none = result["none"]
    reference_flops = none.forward_flops + none.backward_flops
    lines = [
        f"### {result['model']} (batch {result['batch']}, {result['input']}; {result['stages']} remat stages)",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|",
    ]
    for label, m in result["rows"]:
        if isinstance(m, str):
            lines.append(f"| {label} | {m} |" + " |" * (len(HEADERS) - 2))
            continue
        recompute = m.forward_flops + m.backward_flops - reference_flops
        cells = [
            label,
            format_bytes(m.peak_bytes),
            f"{m.peak_bytes / none.peak_bytes:.1%}",
            format_bytes(m.activation_peak_bytes),
            f"{recompute / none.forward_flops:.1%}",
            f"{recompute / 1e9:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    command = "python benchmarks/compare.py" + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    header = [
        *results_header(
            "remat against hand-written checkpointing (fake tensors)", command, "bench-compare"
        ),
        "",
        "Every number is measured: one training step (forward, default loss `mean(out**2)`,",
        "backward) of each strategy's module with `remat.measure_step(..., fake=True)`, on fake",
        "tensors. Nothing is predicted by the planner. Step peak includes parameters, inputs and",
        "gradients; activation peak excludes them. Recompute = the step's forward + backward FLOPs",
        "minus those of the unmodified model, as % of one forward of the unmodified model.",
        "Wall-clock step time is not included: fake tensors do no arithmetic, so there is none to time.",
        "",
        "Strategies: `none` the unmodified model; Hugging Face's `model.gradient_checkpointing_enable()`",
        "(GPT-2; on a deep copy, train mode, `use_cache=False`, `use_reentrant=False`), which is the",
        "per-layer `torch.utils.checkpoint` people write by hand; for ResNet-50 each Bottleneck (each",
        "child of layer1..layer4) wrapped in a module calling `checkpoint(block, x, use_reentrant=False)`",
        "(on a deep copy); remat `sqrt` (Chen et al.'s sqrt(n) equal segments) and `per-block` (a",
        "checkpoint at every stage boundary), the least-peak plan, and the plan with the least",
        "recompute whose step peak fits the per-layer baseline's measured peak (same memory as the",
        "hand-written checkpointing: how much less recompute?). The remat rows share one capture and",
        "profile of the unmodified model. (transformers 5 calls `gradient_checkpointing_enable`",
        "deprecated in favour of `activation_checkpointing_enable`; it still works and is used here.)",
        "",
        "",
    ]
    sections = []
    failed = False
    for name, spec, batch, shape in MODELS:
        print(f"{name} (batch {batch}) ...", flush=True)
        try:
            result = run_one(name, spec, batch, shape)
            section = format_result(result)
            print(f"  done in {result['seconds']:.1f} s", flush=True)
        except Exception as error:  # report and go on with the other model
            failed = True
            section = f"### {name}\n\nFAILED: {type(error).__name__}: {error}"[:500]
        print(section + "\n", flush=True)
        sections.append(section)
    text = "\n".join(header) + "\n\n".join(sections) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
