"""Checkpointing strategies side by side: the unmodified model, remat's plan and baselines.

A strategy turns a model into the module to train. ``none`` is the model
itself, ``remat`` is :func:`remat.optimize` (the least-peak plan),
``remat@BUDGET`` (e.g. ``remat@1GiB``) the plan with the least recompute whose
step peak fits BUDGET, ``sqrt`` is Chen et al.'s sqrt(n) equal segments and
``per-block`` keeps every piece boundary; the two baselines run on the same capture and executor as ``remat``,
so only the choice of checkpoints differs. :func:`compare` measures them all
in one run.

Example:
    >>> import torch
    >>> from remat.strategies import compare
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
    >>> rows = compare(net, torch.randn(256, 64), ["none", "remat"])
    >>> [r.strategy for r in rows], rows[1].peak_bytes <= rows[0].peak_bytes
    (['none', 'remat'], True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from remat.api import _Profiled, optimize
from remat.budget import parse_bytes
from remat.execute import RematModule, segment_starts
from remat.measure import as_tuple, default_loss, measure_step, step_model
from remat.solvers.chain import Chain, ChainSolution, sqrt_segments, uniform_segments

__all__ = [
    "STRATEGIES",
    "StrategyResult",
    "compare",
    "parse_strategies",
    "step_seconds",
    "strategy",
    "with_solver",
]

LossFn = Callable[[Any], torch.Tensor]


def with_solver(
    model: nn.Module, example_inputs: Any, solver: Callable[[Chain], ChainSolution], loss_fn: LossFn | None = None
) -> tuple[RematModule, float]:
    """``model`` run with the checkpoints ``solver`` picks on its chain, and the solve time.

    The model is captured and profiled exactly as :func:`remat.optimize` does;
    ``solver`` (e.g. :func:`~remat.solvers.chain.sqrt_segments`) replaces the
    least-peak search.
    """
    profiled = _Profiled.of(model, example_inputs, loss_fn)
    start = time.perf_counter()
    solution = solver(profiled.chain)
    solve_seconds = time.perf_counter() - start
    starts = segment_starts(profiled.groups, solution.checkpoints)
    return RematModule(model, profiled.captured, starts), solve_seconds


def _none(model: nn.Module, inputs: tuple, loss_fn: LossFn | None) -> tuple[nn.Module, float]:
    return model, 0.0


def _remat(model: nn.Module, inputs: tuple, loss_fn: LossFn | None) -> tuple[nn.Module, float]:
    module = optimize(model, inputs, loss_fn)
    return module, module.plan.solve_seconds


def _sqrt(model: nn.Module, inputs: tuple, loss_fn: LossFn | None) -> tuple[nn.Module, float]:
    return with_solver(model, inputs, sqrt_segments, loss_fn)


def _per_block(model: nn.Module, inputs: tuple, loss_fn: LossFn | None) -> tuple[nn.Module, float]:
    return with_solver(model, inputs, lambda chain: uniform_segments(chain, chain.n), loss_fn)


#: name -> (model, inputs, loss_fn) -> (module to train, solve seconds)
STRATEGIES: dict[str, Callable[[nn.Module, tuple, LossFn | None], tuple[nn.Module, float]]] = {
    "none": _none,
    "sqrt": _sqrt,
    "per-block": _per_block,
    "remat": _remat,
}


_BUDGETED = "remat@"  # remat@BUDGET: the least recompute within BUDGET


def strategy(name: str) -> Callable[[nn.Module, tuple, LossFn | None], tuple[nn.Module, float]]:
    """The strategy called ``name``: one of :data:`STRATEGIES`, or ``remat@BUDGET``.

    Raises:
        ValueError: the name is unknown, or its budget is not a size
            (:func:`remat.parse_bytes`).
    """
    if name.startswith(_BUDGETED):
        budget_bytes = parse_bytes(name[len(_BUDGETED):])

        def within_budget(model: nn.Module, inputs: tuple, loss_fn: LossFn | None) -> tuple[nn.Module, float]:
            module = optimize(model, inputs, loss_fn, budget=budget_bytes)
            return module, module.plan.solve_seconds

        return within_budget
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: choose from {', '.join(STRATEGIES)}, remat@BUDGET (e.g. remat@1GiB)")
    return STRATEGIES[name]


def parse_strategies(text: str) -> list[str]:
    """``"none,sqrt,remat@1GiB"`` as a list of valid strategy names, in order, without repeats.

    Raises:
        ValueError: a name is unknown or has a bad budget, or there is none.

    Example:
        >>> parse_strategies(" none, remat,none, remat@2GiB ")
        ['none', 'remat', 'remat@2GiB']
    """
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise ValueError(f"no strategy given: choose from {', '.join(STRATEGIES)}, remat@BUDGET (e.g. remat@1GiB)")
    for name in names:
        strategy(name)
    return names


@dataclasses.dataclass(frozen=True)
class StrategyResult:
    """One strategy's training step. Sizes in bytes, work in FLOPs, times in seconds.

    Attributes:
        strategy: the strategy's name.
        peak_bytes: the step's peak (parameters, inputs, activations, gradients).
        activation_peak_bytes: the peak without parameters, inputs and gradients.
        recompute_flops: forward + backward FLOPs beyond those of ``none``.
        step_time_ratio: median real step time over that of ``none``, or None
            where steps were not timed.
        solve_seconds: time spent choosing the checkpoints (0 for ``none``).
        forward_flops: the forward pass's FLOPs (the same for every strategy),
            to put ``recompute_flops`` in proportion; not in :meth:`as_json`.
    """

    strategy: str
    peak_bytes: int
    activation_peak_bytes: int
    recompute_flops: int
    step_time_ratio: float | None
    solve_seconds: float
    forward_flops: int = dataclasses.field(default=0, repr=False)

    def as_json(self) -> dict[str, Any]:
        """The stable record ``remat bench --json`` writes (see the README)."""
        return {
            "strategy": self.strategy,
            "peak_bytes": self.peak_bytes,
            "activation_peak_bytes": self.activation_peak_bytes,
            "recompute_flops": self.recompute_flops,
            "step_time_ratio": self.step_time_ratio,
            "solve_seconds": self.solve_seconds,
        }


def step_seconds(
    modules: Mapping[str, nn.Module], example_inputs: Any, steps: int, loss_fn: LossFn | None = None
) -> dict[str, float]:
    """Median wall-clock seconds of a real training step (forward, loss, backward) of each module.

    The modules take turns, one step each per round, so that other load on
    the machine slows them alike; a first round warms up and is not counted,
    then ``steps`` rounds are timed. The parameters' ``.grad`` and the buffers
    are put back afterwards, as :func:`remat.measure_step` does.
    """
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, not {steps}")
    loss_fn = loss_fn or default_loss
    times: dict[str, list[float]] = {name: [] for name in modules}
    with contextlib.ExitStack() as stack:
        running = {name: stack.enter_context(step_model(m, example_inputs, fake=False)) for name, m in modules.items()}
        for _ in range(steps + 1):
            for name, (model, inputs) in running.items():
                times[name].append(_timed_step(model, inputs, loss_fn))
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def _timed_step(model: nn.Module, inputs: tuple, loss_fn: LossFn) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = {t.device for t in [*params, *inputs] if isinstance(t, torch.Tensor) and t.device.type == "cuda"}
    for p in params:
        p.grad = None
    for device in cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    loss_fn(model(*inputs)).backward()
    for device in cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def compare(
    model: nn.Module,
    example_inputs: Any,
    strategies: Sequence[str],
    *,
    fake: bool = True,
    steps: int | None = None,
    loss_fn: LossFn | None = None,
) -> list[StrategyResult]:
    """Measure one training step of ``model`` under each of ``strategies``.

    Memory and FLOPs come from :func:`remat.measure_step` (on fake tensors by
    default). With ``steps`` (real tensors only) each strategy also runs that
    many real steps and reports its median step time over that of ``none``.
    ``none`` is always measured, as the reference, even where not listed.
    """
    if steps is not None and fake:
        raise ValueError("step times need real tensors: pass fake=False with steps")
    inputs = as_tuple(example_inputs)
    modules = {name: strategy(name)(model, inputs, loss_fn) for name in dict.fromkeys(["none", *strategies])}
    measured = {name: measure_step(module, inputs, loss_fn, fake=fake) for name, (module, _) in modules.items()}
    seconds = step_seconds({name: module for name, (module, _) in modules.items()}, inputs, steps, loss_fn) if steps else {}
    reference = measured["none"]
    reference_flops = reference.forward_flops + reference.backward_flops
    return [
        StrategyResult(
            strategy=name,
            peak_bytes=measured[name].peak_bytes,
            activation_peak_bytes=measured[name].activation_peak_bytes,
            recompute_flops=measured[name].forward_flops + measured[name].backward_flops - reference_flops,
            step_time_ratio=seconds[name] / seconds["none"] if seconds else None,
            solve_seconds=modules[name][1],
            forward_flops=measured[name].forward_flops,
        )
        for name in strategies
    ]
