"""Validate remat on a CUDA device: predicted vs allocator peak, and step-time overhead.

    python benchmarks/gpu_check.py                      # resnet50 b64, gpt2 b8 seq 1024
    python benchmarks/gpu_check.py --device cpu --quick # a dry run of the script itself

For each model: the plan is made on fake tensors of the target device (no
memory); then one real training step of the unmodified model and one of the
optimized module are run, each after a warm-up step, with the allocator's peak
(``torch.cuda.max_memory_allocated``) compared with the prediction. Memory that
was already allocated before the step besides parameters, buffers and inputs
(the cuBLAS workspace, made by the warm-up) is not part of the step and is
taken out. Step time is the median of ``--steps`` steps of each module,
interleaved, in the same run. The least-peak plan with ``offload=True`` (kept
activations in pinned host memory) is checked the same way, and its gradients
are compared bit for bit with the plain model's; so is the plan for gradient
accumulation (``grad_accumulation=True``), on a step that adds into existing
gradients. A budget halfway between the least peak and the baseline is planned
on the device too: its measured peak, its selective stages (which remake
normalisations and activations in backward), its step time and its gradients.
The first plan of ``remat.pareto`` (the least peak with no recompute FLOPs,
usually one that remakes cheap values value by value, ``Plan.remake``, whose
prediction is a fake-tensor step) is checked the same way: peak, time, gradients.
Writes a markdown table (``--out``). Then the table of ``make bench-time`` on the device
(:func:`step_time.run_one`: eager, per-block checkpointing, remat's plans, with
``--compile`` torch.compile too) for ResNet-50 at a launch-bound batch and at 64, and GPT-2.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import remat
import step_time
from remat.tools import models
from remat.measure.step import default_loss
from remat.measure.tracker import round_to_of, track_memory, unique_storage_bytes
from remat.report import format_bytes
from machine import cpu_name

DEFAULT_MODELS = ["torchvision:resnet50@64", "hf:gpt2@8"]
QUICK_MODELS = ["remat:mlp?depth=8&width=256@512", "hf:gpt2?n_layer=2&n_embd=128&n_head=4&seq=64@2"]
# (name, spec, batch, per-sample shape) of the step-time table
TIME_MODELS = [
    ("resnet50", "torchvision:resnet50", 8, (3, 224, 224)),
    ("resnet50", "torchvision:resnet50", 64, (3, 224, 224)),
    ("gpt2", "hf:gpt2", 8, None),
]
TIME_QUICK = [("resnet18", "torchvision:resnet18", 2, (3, 32, 32))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(module, inputs) -> None:
    loss = default_loss(module(*inputs))
    loss.backward()


def _measured_peak(module, inputs, device, resident_step_bytes: int, accumulate: bool = False) -> int:
    """Allocator peak of one step, less what was allocated before it that is not the step's.

    With ``accumulate``, the step adds into gradients left by the warm-up step
    (zeroed, not freed): they are the step's, counted from the start.
    """
    _step(module, inputs)  # warm-up: workspaces, lazy initialisation
    module.zero_grad(set_to_none=not accumulate)
    _sync(device)
    if device.type != "cuda":
        module.zero_grad(set_to_none=True)
        return remat.measure_step(module, inputs, grad_accumulation=accumulate).peak_bytes
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    resident = resident_step_bytes + unique_storage_bytes(grads, round_to_of(device))
    other = torch.cuda.memory_allocated(device) - resident
    torch.cuda.reset_peak_memory_stats(device)
    _step(module, inputs)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - other
    module.zero_grad(set_to_none=True)
    return peak


def _dispatch_peak(module, inputs, device, resident_step_bytes: int) -> int:
    """The step's peak counted at the dispatcher (what the planner models).

    The allocator's peak can be higher by what operators allocate inside
    themselves (cuDNN and cuBLAS workspaces), which the dispatcher never sees.
    """
    with track_memory(device, exact=True) as mem:
        _step(module, inputs)
    module.zero_grad(set_to_none=True)
    return resident_step_bytes + mem.peak_bytes


def _grads_equal(model, optimized: torch.nn.Module, inputs) -> bool:
    """One step of each with the same seed: every parameter gradient bit-for-bit equal."""
    grads = []
    for module in (model, optimized):
        torch.manual_seed(0)
        _step(module, inputs)
        grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
        module.zero_grad(set_to_none=True)
    return all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(*grads)
    )


def _median_step_seconds(modules, inputs, device, steps: int) -> list[float]:
    times = [[] for _ in modules]
    for _ in range(steps):
        for index, module in enumerate(modules):
            _sync(device)
            start = time.perf_counter()
            _step(module, inputs)
            _sync(device)
            times[index].append(time.perf_counter() - start)
            module.zero_grad(set_to_none=True)
    return [statistics.median(t) for t in times]


def check(spec: str, batch: int, device: torch.device, steps: int) -> dict:
    source = models.load(spec, batch)
    model = source.model.to(device)
    inputs = tuple(t.to(device) for t in source.example_inputs)
    predicted_baseline = remat.measure_step(model, inputs, fake=True).peak_bytes
    optimized = remat.optimize(model, inputs)
    plan = optimized.plan
    resident = unique_storage_bytes([*model.parameters(), *model.buffers(), *inputs], round_to_of(device))
    baseline_peak = _measured_peak(model, inputs, device, resident)
    remat_peak = _measured_peak(optimized, inputs, device, resident)
    remat_dispatch = _dispatch_peak(optimized, inputs, device, resident)
    # Kept activations in pinned host memory (CUDA only; elsewhere a warning and no offload).
    offloaded = remat.optimize(model, inputs, offload=True)
    offload_peak = _measured_peak(offloaded, inputs, device, resident)
    # Profiled on the device: the allocator's figures, workspaces inside operators included.
    on_device = remat.optimize(model, inputs, profile="device")
    device_peak = _measured_peak(on_device, inputs, device, resident)
    # A budget halfway between the plan and the baseline, planned on the device (where
    # stages may run selectively: they remake normalisations and activations in backward).
    budget = (baseline_peak + device_peak) // 2
    budgeted = remat.optimize(model, inputs, budget=budget, profile="device")
    budget_peak = _measured_peak(budgeted, inputs, device, resident)
    # The least peak with no recompute FLOPs: cheap values remade in backward, if that is lower.
    first = remat.pareto(model, inputs)[0]
    no_recompute = remat.optimize(model, inputs, plan=first)
    no_recompute_peak = _measured_peak(no_recompute, inputs, device, resident)
    # The least peak compiled (aot_eager): the plan as AOTAutograd's partition.
    compiled = remat.optimize(model, inputs, compile="aot_eager")
    compiled_peak = _measured_peak(compiled, inputs, device, resident)
    base_s, remat_s, offload_s, budget_s, first_s, compiled_s = _median_step_seconds(
        [model, optimized, offloaded, budgeted, no_recompute, compiled], inputs, device, steps
    )
    # Planned for gradient accumulation: the step adds into gradients that exist before it.
    accumulating = remat.optimize(model, inputs, grad_accumulation=True)
    accumulate_peak = _measured_peak(accumulating, inputs, device, resident, accumulate=True)
    return {
        "model": f"{spec} b{batch}",
        "baseline predicted": predicted_baseline,
        "baseline measured": baseline_peak,
        "remat predicted": plan.predicted_peak_bytes,
        "nested": sum(len(cs) for _, _, cs in plan.inner),
        "remat measured": remat_peak,
        "remat dispatch": remat_dispatch,
        "recompute": plan.recompute_overhead,
        "time ratio": remat_s / base_s,
        "baseline step s": base_s,
        "device predicted": on_device.plan.predicted_peak_bytes,
        "device measured": device_peak,
        "budget": budget,
        "budget measured": budget_peak,
        "budget recompute": budgeted.plan.recompute_overhead,
        "budget selective": len(budgeted.plan.selective),
        "budget time ratio": budget_s / base_s,
        "budget grads equal": _grads_equal(model, budgeted, inputs),
        "offload": offloaded.plan.offload,
        "offload predicted": offloaded.plan.predicted_peak_bytes,
        "offload measured": offload_peak,
        "offload recompute": offloaded.plan.recompute_overhead,
        "offload time ratio": offload_s / base_s,
        "offload grads equal": _grads_equal(model, offloaded, inputs),
        "accumulate predicted": accumulating.plan.predicted_peak_bytes,
        "accumulate measured": accumulate_peak,
        "first remake": first.remake,
        "first predicted": first.predicted_peak_bytes,
        "first measured": no_recompute_peak,
        "first time ratio": first_s / base_s,
        "first grads equal": _grads_equal(model, no_recompute, inputs),
        "compiled predicted": compiled.plan.predicted_peak_bytes,
        "compiled measured": compiled_peak,
        "compiled time ratio": compiled_s / base_s,
        "compiled grads equal": _grads_equal(model, compiled, inputs),
    }


def _error(predicted: int, measured: int) -> str:
    return f"{predicted / measured - 1:+.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default=None, help="comma-separated SPEC@BATCH")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small models: a dry run")
    parser.add_argument("--out", default="benchmarks/results/gpu_check.md")
    parser.add_argument("--compile", action="store_true", help="torch.compile rows in the step-time table")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --quick for a dry run")
    specs = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    header = (
        f"Command: `python benchmarks/gpu_check.py{' --quick' if args.quick else ''}"
        f"{f' --models {args.models}' if args.models else ''}`  \n"
        f"Device: {card}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}\n\n"
        "| model | baseline peak (pred / measured, err) | remat peak (pred / measured, err) "
        "| remat peak at the dispatcher (err) | peak cut | recompute (% of fwd) | step time ratio "
        "| profiled on device: pred / measured, err | budget: measured <= budget? (recompute) "
        "| budget: selective stages, step time ratio, grads exact "
        "| offload: pred / measured, err | offload recompute | offload step time ratio | offload grads exact "
        "| grad accumulation: pred / measured, err | nested checkpoints in the remat plan "
        "| no recompute FLOPs: remade?, pred / measured, err | its step time ratio, grads exact "
        "| compiled least peak (aot_eager): pred / measured, err | its step time ratio, grads exact |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    print(header, flush=True)
    for item in specs:
        spec, _, batch = item.rpartition("@")
        r = check(spec, int(batch), device, args.steps)
        line = (
            f"| {r['model']} | {format_bytes(r['baseline predicted'])} / {format_bytes(r['baseline measured'])}, "
            f"{_error(r['baseline predicted'], r['baseline measured'])} "
            f"| {format_bytes(r['remat predicted'])} / {format_bytes(r['remat measured'])}, "
            f"{_error(r['remat predicted'], r['remat measured'])} "
            f"| {format_bytes(r['remat dispatch'])}, {_error(r['remat predicted'], r['remat dispatch'])} "
            f"| {1 - r['remat measured'] / r['baseline measured']:.1%} | {r['recompute']:.1%} "
            f"| {r['time ratio']:.2f}x (baseline {r['baseline step s'] * 1e3:.1f} ms) "
            f"| {format_bytes(r['device predicted'])} / {format_bytes(r['device measured'])}, "
            f"{_error(r['device predicted'], r['device measured'])} "
            f"| {format_bytes(r['budget measured'])} <= {format_bytes(r['budget'])}: "
            f"{'yes' if r['budget measured'] <= r['budget'] else 'NO'} ({r['budget recompute']:.0%}) "
            f"| {r['budget selective']}, {r['budget time ratio']:.2f}x, {'yes' if r['budget grads equal'] else 'NO'} "
            f"| {'' if r['offload'] else '(not offloaded) '}{format_bytes(r['offload predicted'])} / "
            f"{format_bytes(r['offload measured'])}, {_error(r['offload predicted'], r['offload measured'])} "
            f"| {r['offload recompute']:.1%} | {r['offload time ratio']:.2f}x "
            f"| {'yes' if r['offload grads equal'] else 'NO'} "
            f"| {format_bytes(r['accumulate predicted'])} / {format_bytes(r['accumulate measured'])}, "
            f"{_error(r['accumulate predicted'], r['accumulate measured'])} | {r['nested']} "
            f"| {'remade' if r['first remake'] else 'not remade'}, {format_bytes(r['first predicted'])} / "
            f"{format_bytes(r['first measured'])}, {_error(r['first predicted'], r['first measured'])} "
            f"| {r['first time ratio']:.2f}x, {'yes' if r['first grads equal'] else 'NO'} "
            f"| {format_bytes(r['compiled predicted'])} / {format_bytes(r['compiled measured'])}, "
            f"{_error(r['compiled predicted'], r['compiled measured'])} "
            f"| {r['compiled time ratio']:.2f}x, {'yes' if r['compiled grads equal'] else 'NO'} |"
        )
        lines.append(line)
        print(line, flush=True)
    timed = TIME_QUICK if args.quick else TIME_MODELS
    rows = [row for name, spec, batch, shape in timed for row in step_time.run_one(
        name, spec, batch, shape, max(args.steps, 7), args.compile, str(device))]
    lines += ["", "Step time (`make bench-time`'s table, on this device):", "", *step_time.table(rows)]
    print("\n".join(lines[-len(rows) - 4:]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
