"""The ``remat`` command line: will this model fit, at which batch size, and at what cost.

Commands (``remat COMMAND --help`` for the options):

* ``remat plan MODEL [--budget 2GiB]``: the least-peak checkpoint plan (or the
  plan predicted fastest within a budget), its peak and its cost.
* ``remat bench MODEL``: strategies (none, sqrt, per-block, remat, remat@BUDGET,
  and torch.compile's own torch-budget[@FRACTION|@BUDGET]) side by side.
* ``remat report MODEL --out DIR``: memory and Pareto-front plots and a markdown summary.
* ``remat demo``: what ``make demo`` runs.
* ``remat fit MODEL --budget 24GiB``: the largest batch whose plan fits the budget.

MODEL is a spec for :func:`remat.tools.models.load`: ``torchvision:NAME``,
``hf:NAME?opts``, ``file.py:factory`` or ``remat:NAME``. Errors print one
line and exit with status 1; ``remat --traceback COMMAND ...`` shows the
whole traceback instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

import remat
from remat import measure_step
from remat.tools import models
from remat.measure.step import StepMeasurement
from remat.budget import parse_bytes
from remat.report import format_bytes
from remat.tools.strategies import STRATEGIES, compare, parse_strategies, step_seconds

__all__ = ["app"]

app = typer.Typer(
    help="Least-memory gradient checkpointing: will this fit, at which batch size, and at what cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_settings = {"traceback": False}

# -- options shared by the commands -----------------------------------------------

Model = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="model spec: torchvision:NAME, hf:NAME?opts (e.g. hf:gpt2?n_layer=4), file.py:factory or remat:NAME",
        show_default=False,
    ),
]
Batch = Annotated[int | None, typer.Option("--batch", "-b", help="batch size (default: the model's)")]
InputShape = Annotated[
    str | None,
    typer.Option("--input", metavar="SHAPE", help="one sample's shape without the batch, e.g. 3x224x224 or 128"),
]
Fake = Annotated[
    bool, typer.Option("--fake/--real", help="simulate on fake tensors (no memory used) or run real ones")
]
Device = Annotated[str, typer.Option("--device", help="where the model runs: cpu, cuda, cuda:1, ...")]
Budget = Annotated[
    str | None,
    typer.Option("--budget", help="step peak limit, e.g. 2GiB: the plan predicted fastest within it"),
]
_TIMED_STEPS = 5  # real steps `remat plan --real` times of the model and the plan, each

OptimizerName = Annotated[
    str | None,
    typer.Option(
        "--optimizer", metavar="NAME",
        help="plan the whole step with this optimizer's state and step(): adamw, adam, sgd, sgd-momentum, ...",
    ),
]
JsonOut = Annotated[Path | None, typer.Option("--json", metavar="FILE", help="also write the results as JSON")]


@app.callback()
def _main(
    traceback: Annotated[bool, typer.Option("--traceback", help="show the full traceback on errors")] = False,
) -> None:
    _settings["traceback"] = traceback


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn errors about the user's input into one line on stderr and a non-zero exit."""
    try:
        yield
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as error:
        if _settings["traceback"]:
            raise
        lines = str(error).strip().splitlines()
        message = lines[0] if lines else type(error).__name__
        if type(error) is RuntimeError:  # from PyTorch, e.g. inputs of the wrong shape
            message = f"running the model failed: {message}"
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(1) from None


def _status(message: str):
    """A spinner on stderr while a slow step runs (nothing when stderr is not a terminal)."""
    return Console(stderr=True).status(message)


def _parse_shape(text: str) -> tuple[int, ...]:
    """``"3x224x224"`` as ``(3, 224, 224)``."""
    try:
        shape = tuple(int(part) for part in text.lower().replace("*", "x").split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"bad input shape {text!r}: expected positive integers joined by x, e.g. 3x224x224 or 128")
    return shape


def _load(spec: str, batch: int | None, input_shape: str | None, device: str, fake: bool = False) -> models.ModelSource:
    """The model and example inputs, on ``device``; with ``fake``, built without weights (fake tensors)."""
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    with _status(f"building {spec}" + (" without weights" if fake else "")):
        source = models.load(spec, batch, input_shape=_parse_shape(input_shape) if input_shape else None, fake=fake)
    if target.type != "cpu":
        source.to(target)
    return source


def _describe(source: models.ModelSource, fake: bool) -> str:
    """One line: the model, batch, sample shape and kind of tensors."""
    shapes = " + ".join("x".join(map(str, x.shape[1:])) or "scalar" for x in source.tensors)
    batch = source.tensors[0].shape[0] if source.tensors[0].dim() else 1
    tensors = "fake (simulated)" if fake else f"real, {source.tensors[0].device}"
    return f"{source.name}, batch {batch}, input {shapes}, {tensors} tensors"


def _gflop(flops: int) -> str:
    """FLOPs in GFLOP, three significant digits below 1,000: ``"36.3 GFLOP"``, ``"2,620 GFLOP"``."""
    value = flops / 1e9
    return f"{value:.3g} GFLOP" if value < 1000 else f"{value:,.0f} GFLOP"


def _percent_cut(before: int, after: int) -> float:
    return 1 - after / before if before else 0.0


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], numbers: bool = True) -> None:
    """``title`` on a line, then a rich table: the first column left, the others right (``numbers``) or left."""
    table = Table()
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if i and numbers else "left", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(title, highlight=False, markup=False)
    console.print(table)


# -- plan -------------------------------------------------------------------------


def _make_plan(
    source: models.ModelSource,
    fake: bool,
    budget: str | None,
    costs: str = "flops",
    grad_accumulation: bool = False,
    remake: bool = True,
    compile: str | None = None,
    optimizer: str | None = None,
    objective: str = "time",
) -> tuple[remat.Plan, StepMeasurement, float | None]:
    """The plan, one step of the planned module measured (on fake or real tensors), and on
    real tensors its step time over the model's (interleaved steps, median of :data:`_TIMED_STEPS`).
    A plan compiled with inductor is measured on fake tensors by its aot_eager graphs (the
    same partition: fused kernels run real tensors only)."""
    budget_bytes = parse_bytes(budget) if budget is not None else None
    best = "fastest plan" if objective == "time" else "least recompute"
    goal = "the least peak" if budget is None else f"the {best} within {format_bytes(budget_bytes)}"
    with _status(f"capturing the model and solving for {goal}"):
        optimized = remat.optimize(
            source.model, source.example_inputs, budget=budget_bytes, costs=costs,
            grad_accumulation=grad_accumulation, remake=remake, compile=compile or False, optimizer=optimizer,
            objective=objective,
        )
    with _status(f"measuring one step with the plan on {'fake' if fake else 'real'} tensors"):
        stepped = optimized
        if fake and compile == "inductor":
            stepped = remat.optimize(source.model, source.example_inputs, plan=optimized.plan, compile="aot_eager")
        measured = measure_step(
            stepped, source.example_inputs, fake=fake, grad_accumulation=grad_accumulation, optimizer=optimizer
        )
    slowdown = None
    if not fake:
        with _status("timing real steps of the model and the plan"):
            seconds = step_seconds({"model": source.model, "plan": optimized}, source.example_inputs, _TIMED_STEPS)
        slowdown = seconds["plan"] / seconds["model"]
    return optimized.plan, measured, slowdown


def _plan_rows(
    plan: remat.Plan, measured: StepMeasurement, fake: bool, slowdown: float | None = None
) -> list[tuple[str, str]]:
    """The plan's table, as (what, value) rows (``slowdown``: the measured step time over the model's)."""
    kept = ", ".join(plan.checkpoint_names) or "none (store everything)"
    return [
        ("stages", f"{len(plan.stage_names)} (the loss last)"),
        ("kept activations", f"{len(plan.checkpoints)}: {kept}"),
        *([("nested checkpoints", _nested_text(plan).strip(" ()"))] if plan.inner else []),
        *([("stored segments", f"{len(plan.stored)} run without recompute")] if plan.stored else []),
        *(
            [("selective stages", f"{len(plan.selective)} keep only what has FLOPs to remake")]
            if plan.selective
            else []
        ),
        *([("cheap values", "remade in backward (predicted peak: a simulated step)")] if plan.remake else []),
        *([("compiled", f"{plan.compiled} (predicted peak: a simulated step of its graphs)")] if plan.compiled else []),
        ("baseline peak (measured)", format_bytes(plan.baseline_peak_bytes)),
        ("budget", _budget_text(plan.budget_bytes)),
        ("parameter gradients", "exist all step (accumulation)" if plan.grad_accumulation else "made in backward"),
        *([("optimizer", f"{plan.optimizer}: state {format_bytes(plan.optimizer_state_bytes)}, and its step")]
          if plan.optimizer else []),
        ("predicted peak", format_bytes(plan.predicted_peak_bytes)),
        (f"measured peak ({'fake' if fake else 'real'} tensors)", format_bytes(measured.peak_bytes)),
        ("peak cut", f"{_percent_cut(plan.baseline_peak_bytes, plan.predicted_peak_bytes):.1%}"),
        ("recompute", f"{_gflop(plan.recompute_flops)} ({plan.recompute_overhead:.1%} of a forward)"),
        *(
            [("recompute time (measured)", f"{plan.recompute_seconds * 1e3:.1f} ms per step")]
            if plan.recompute_seconds is not None
            else []
        ),
        *(
            [("step time (predicted)", f"{plan.predicted_slowdown:.2f}x the model's ({plan.time_source})")]
            if plan.predicted_slowdown is not None
            else []
        ),
        *(
            [("step time (measured)", f"{slowdown:.2f}x the model's (median of {_TIMED_STEPS})")]
            if slowdown is not None
            else []
        ),
        ("capture / solve time", f"{plan.capture_seconds:.2f} s / {plan.solve_seconds:.3f} s"),
    ]


def _nested_text(plan: remat.Plan) -> str:
    """`` (+5 kept inside 3 recomputes)`` for a plan with nested checkpoints, else empty."""
    if not plan.inner:
        return ""
    return f" (+{sum(len(cs) for _, _, cs in plan.inner)} kept inside {len(plan.inner)} recomputes)"


def _exact_bytes(n: int) -> str:
    """``n`` bytes readable, and exactly: ``"2.00 GiB (2147483648 B)"``."""
    return f"{format_bytes(n)} ({n} B)"


def _budget_text(budget_bytes: int | None) -> str:
    return "none (least peak)" if budget_bytes is None else _exact_bytes(budget_bytes)


def _plan_json(
    source: models.ModelSource, plan: remat.Plan, measured: StepMeasurement, fake: bool, slowdown: float | None = None
) -> dict:
    """The machine-readable summary that ``remat plan --json`` writes (bytes, FLOPs, seconds)."""
    return {
        "model": source.name,
        "batch": int(source.tensors[0].shape[0]),
        "input_shapes": [list(x.shape) for x in source.tensors],
        "fake": fake,
        "stages": list(plan.stage_names),
        "checkpoints": list(plan.checkpoints),
        "kept": list(plan.checkpoint_names),
        "baseline_peak_bytes": plan.baseline_peak_bytes,
        "budget_bytes": plan.budget_bytes,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "measured_peak_bytes": measured.peak_bytes,
        "peak_cut": _percent_cut(plan.baseline_peak_bytes, plan.predicted_peak_bytes),
        "forward_flops": plan.forward_flops,
        "recompute_flops": plan.recompute_flops,
        "recompute_overhead": plan.recompute_overhead,
        "recompute_seconds": plan.recompute_seconds,
        "predicted_seconds": plan.predicted_seconds,
        "eager_seconds": plan.eager_seconds,
        "predicted_slowdown": plan.predicted_slowdown,
        "measured_slowdown": slowdown,
        "nested_checkpoints": [[l, r, list(cs)] for l, r, cs in plan.inner],
        "stored_segments": list(plan.stored),
        "selective_stages": list(plan.selective),
        "grad_accumulation": plan.grad_accumulation,
        "remake": plan.remake,
        "remade_costly": list(plan.remade_costly),
        "compiled": plan.compiled,
        "capture_seconds": plan.capture_seconds,
        "solve_seconds": plan.solve_seconds,
    }


@app.command()
def plan(
    model: Model,
    batch: Batch = None,
    input: InputShape = None,
    fake: Fake = True,
    device: Device = "cpu",
    budget: Budget = None,
    json_out: JsonOut = None,
    save: Annotated[
        Path | None, typer.Option("--save", metavar="PLAN.json", help="save the plan for remat.optimize(plan=...)")
    ] = None,
    costs: Annotated[
        str,
        typer.Option(
            "--costs",
            help="flops (counted) or profile (also time every stage's forward on --device, real tensors)",
        ),
    ] = "flops",
    grad_accumulation: Annotated[
        bool,
        typer.Option(
            "--grad-accumulation",
            help="plan for steps whose parameter gradients exist from the start (gradient accumulation)",
        ),
    ] = False,
    remake: Annotated[
        bool,
        typer.Option(
            "--remake/--no-remake",
            help="plans may remake cheap values (norms, activations, adds) in backward instead of keeping them",
        ),
    ] = True,
    compile: Annotated[
        str | None,
        typer.Option(
            "--compile",
            metavar="BACKEND",
            help="plan to run compiled: aot_eager (ATen graphs) or inductor (fused kernels)",
        ),
    ] = None,
    optimizer: OptimizerName = None,
    objective: Annotated[
        str,
        typer.Option(
            "--objective",
            help="time (within --budget, the plan predicted fastest on this machine) or flops (the least "
            "recompute, as peers are compared)",
        ),
    ] = "time",
) -> None:
    """The least-peak checkpoint plan (or the fastest within --budget): what it keeps, its peak, its cost.

    A budget no plan meets exits with status 1 and one line giving the least achievable peak.
    """
    with _user_errors():
        if budget is not None:
            parse_bytes(budget)  # a bad size is reported before the model is built
        # Planned and stepped on fake tensors, the model needs no weights (timing stages needs them).
        source = _load(model, batch, input, device, fake=fake and costs == "flops")
        chosen, measured, slowdown = _make_plan(
            source, fake, budget, costs, grad_accumulation, remake, compile, optimizer, objective
        )
        rows = _plan_rows(chosen, measured, fake, slowdown)
        _print_table(_describe(source, fake), ["", "remat plan"], rows, numbers=False)
        if json_out is not None:
            _write_json(json_out, _plan_json(source, chosen, measured, fake, slowdown))
        if save is not None:
            chosen.save(save)


# -- bench ------------------------------------------------------------------------


@app.command()
def bench(
    model: Model,
    batch: Batch = None,
    input: InputShape = None,
    fake: Fake = True,
    device: Device = "cpu",
    strategies: Annotated[
        str,
        typer.Option(
            "--strategies",
            "-s",
            help=f"comma-separated, from: {', '.join(STRATEGIES)}; remat@BUDGET (the plan predicted fastest "
            "within BUDGET, e.g. remat@1GiB); torch-budget (torch.compile's min-cut partitioner, eager aot_autograd "
            "compilers, at activation_memory_budget 1.0); torch-budget@FRACTION (at that budget, e.g. "
            "torch-budget@0.5); torch-budget@BUDGET (the budget tuned to fit BUDGET, e.g. torch-budget@1GiB: "
            "compiles and measures several times)",
        ),
    ] = "none,sqrt,remat",
    steps: Annotated[int, typer.Option("--steps", help="real steps timed per strategy (with --real)")] = 5,
    json_out: JsonOut = None,
) -> None:
    """Strategies side by side in one run: peaks, recompute FLOPs, step-time ratio (--real), solve time."""
    with _user_errors():
        names = parse_strategies(strategies)
        if steps < 1:
            raise ValueError(f"--steps must be a positive integer, not {steps}")
        source = _load(model, batch, input, device)
        work = f"measuring {', '.join(names)}" + ("" if fake else f", timing {steps} real steps each")
        with _status(work):
            results = compare(source.model, source.example_inputs, names, fake=fake, steps=None if fake else steps)
        rows = [
            (
                r.strategy,
                format_bytes(r.peak_bytes),
                format_bytes(r.activation_peak_bytes),
                f"{_gflop(r.recompute_flops)} ({r.recompute_flops / max(r.forward_flops, 1):.0%})",
                "-" if r.step_time_ratio is None else f"{r.step_time_ratio:.2f}x",
                "-" if r.predicted_time_ratio is None else f"{r.predicted_time_ratio:.2f}x",
                f"{r.solve_seconds * 1e3:.1f} ms",
            )
            for r in results
        ]
        headers = ["strategy", "step peak", "activations", "recompute (fwd %)", "step time", "predicted", "solve"]
        _print_table(_describe(source, fake), headers, rows)
        if fake:
            Console().print("step time: run with --real to time real steps against 'none'")
        if json_out is not None:
            _write_json(json_out, [r.as_json() for r in results])


# -- report -----------------------------------------------------------------------


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [" | ".join(headers), " | ".join("---" for _ in headers), *(" | ".join(r) for r in rows)]
    return "\n".join(f"| {line} |" for line in lines)


@app.command()
def report(
    model: Model,
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for memory.png and report.md")],
    batch: Batch = None,
    input: InputShape = None,
    fake: Fake = True,
    device: Device = "cpu",
) -> None:
    """Write OUT/memory.png (live memory over one step, baseline vs plan), OUT/pareto.png and OUT/report.md."""
    from remat.tools.plots import memory_timeline, pareto_front

    with _user_errors():
        source = _load(model, batch, input, device)
        chosen, planned, slowdown = _make_plan(source, fake, None)
        with _status("measuring the unmodified model"):
            baseline = measure_step(source.model, source.example_inputs, fake=fake)
        with _status("solving for the Pareto front"):
            front = remat.pareto(source.model, source.example_inputs)
        out.mkdir(parents=True, exist_ok=True)
        title = _describe(source, fake)
        png = memory_timeline([("baseline", baseline), ("remat plan", planned)], out / "memory.png", title)
        pareto_png = pareto_front(front, out / "pareto.png", f"{source.name}: step peak against recompute")
        rows = _plan_rows(chosen, planned, fake, slowdown)
        text = "\n\n".join(
            [
                f"# remat report: {source.name}",
                f"{title}. Made with `remat report`.",
                "## Live memory over one training step",
                f"![live memory, baseline vs remat plan]({png.name})",
                "Everything live (parameters, inputs, activations, gradients) after each operator; the "
                "forward pass is shaded and a dotted line marks where each backward pass starts. The plan "
                "recomputes segments in backward, so its step runs more operators.",
                "## Plan",
                _markdown_table(["", "remat plan"], rows),
                "## Pareto front: peak against recompute",
                f"![predicted step peak against recompute]({pareto_png.name})",
                "Each plan has the least recompute for its peak (as `remat plan --budget` picks it): from "
                "storing everything (no recompute) to the least peak. Predicted on fake tensors.",
                _markdown_table(["predicted step peak", "recompute (% of a forward)", "kept activations"],
                                _pareto_rows(front)),
            ]
        )
        (out / "report.md").write_text(text + "\n")
        Console().print(f"wrote {png}, {pareto_png} and {out / 'report.md'}")


def _pareto_rows(front: Sequence[remat.Plan]) -> list[tuple[str, str, str]]:
    """One row per plan of a Pareto front: its peak, recompute and number of kept activations."""
    return [
        (format_bytes(p.predicted_peak_bytes), f"{p.recompute_overhead:.1%}", str(len(p.checkpoints)))
        for p in front
    ]


# -- demo and fit -----------------------------------------------------------------


@app.command()
def demo(
    model: Annotated[str | None, typer.Argument(metavar="[MODEL]", help="model spec (default torchvision:resnet50)")] = None,
    batch: Batch = None,
    real: Annotated[bool, typer.Option("--real", help="run on real CPU tensors, not fake ones")] = False,
) -> None:
    """What `make demo` runs: ResNet-50 at batch 32, planned and measured (any MODEL works)."""
    from remat.tools import demo as demo_module

    argv = [model] if model else []
    argv += ["--batch", str(batch)] if batch is not None else []
    argv += ["--real"] if real else []
    with _user_errors():
        demo_module.main(argv)


@app.command()
def fit(
    model: Model,
    budget: Annotated[str, typer.Option("--budget", help="step peak limit, e.g. 24GiB")],
    input: InputShape = None,
    device: Device = "cpu",
    compile: Annotated[
        str | None,
        typer.Option("--compile", metavar="BACKEND", help="for a compiled plan: aot_eager or inductor"),
    ] = None,
    optimizer: OptimizerName = None,
) -> None:
    """The largest batch whose plan fits BUDGET, its peak and its recompute (planned on fake tensors)."""
    with _user_errors():
        budget_bytes = parse_bytes(budget)
        source = _load(model, None, input, device, fake=True)
        with _status(f"searching for the largest batch within {format_bytes(budget_bytes)}"):
            batch, chosen = remat.max_batch(
                source.model, budget_bytes, make_inputs=source.make_inputs, compile=compile or False,
                optimizer=optimizer,
            )
        with _status(f"solving batch {batch + 1} for its least peak"):
            next_least = remat.plan(
                source.model, source.make_inputs(batch + 1), compile=compile or False, optimizer=optimizer
            ).predicted_peak_bytes
        beyond = "does not fit" if next_least > budget_bytes else "fits (the search stopped at its batch limit)"
        rows = [
            ("largest batch", str(batch)),
            ("budget", _budget_text(budget_bytes)),
            ("predicted peak", _exact_bytes(chosen.predicted_peak_bytes)),
            ("without remat (store everything)", format_bytes(chosen.baseline_peak_bytes)),
            ("recompute", f"{_gflop(chosen.recompute_flops)} ({chosen.recompute_overhead:.1%} of a forward)"),
            ("kept activations", f"{len(chosen.checkpoints)} of {len(chosen.stage_names) - 1} stage outputs"
             + _nested_text(chosen)),
            (f"batch {batch + 1}", f"{beyond}: least peak {_exact_bytes(next_least)}"),
            *([("compiled", chosen.compiled)] if chosen.compiled else []),
            *([("optimizer", f"{chosen.optimizer}, state {format_bytes(chosen.optimizer_state_bytes)}")]
              if chosen.optimizer else []),
        ]
        at_batch = dataclasses.replace(source, example_inputs=source.make_inputs(batch))
        _print_table(_describe(at_batch, True), ["", "remat fit"], rows, numbers=False)


if __name__ == "__main__":
    app()
