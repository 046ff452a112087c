"""The one-call API: ``remat.plan``, ``remat.optimize``, ``remat.pareto``, ``remat.max_batch``.

Each is the same short pipeline: validate the model and inputs
(:mod:`remat.validate`), capture it as pieces and profile them into a chain
(:meth:`remat.planner.profiled.ProfiledModel.of`: :mod:`remat.capture`, then
:mod:`remat.profile`), choose a plan (:mod:`remat.planner.choose`, over the
families of :mod:`remat.solvers`), and build the module that runs it
(:mod:`remat.execute`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from remat.budget import InfeasibleBudget, parse_bytes
from remat.capture.captured import capture, fingerprint, input_shapes
from remat.execute.compiled import BACKENDS, module_for
from remat.execute.module import DropInModule
from remat.execute.shapes import PerShapeModule
from remat.measure.optimizer import OptimizerSpec
from remat.measure.step import has_meta, positional, without_weights
from remat.plan import Plan
from remat.planner.choose import pareto_plans, solve
from remat.planner.profiled import Costs, Objective, ProfiledModel
from remat.profile.model import CUT_MODES, Profile
from remat.validate import check_choice, check_model_and_inputs, offload_possible

__all__ = ["plan", "optimize", "pareto", "max_batch"]


def plan(
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    budget: int | str | None = None,
    *,
    profile: Profile = "fake",
    offload: bool = False,
    costs: Costs = "flops",
    grad_accumulation: bool = False,
    remake: bool = True,
    compile: bool | str = False,
    optimizer: OptimizerSpec | None = None,
    objective: Objective = "time",
) -> Plan:
    """Find the checkpoints for ``model``: the least peak, or the fastest plan within ``budget``.

    Planning runs on fake tensors: it needs no memory for activations, so a
    model that does not fit can be planned on any machine.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace or
            ``torch.export`` can export.
        example_inputs: a tensor or tuple of positional inputs, at the size
            you will train with.
        loss_fn: model output -> scalar loss (default: mean of squares of the
            first output, in float32). Only its cost matters for planning.
        budget: the whole step's peak may not exceed this (bytes, or a string
            such as ``"20GiB"``); the plan is then the one predicted to take
            the least step time (``Plan.predicted_seconds``: recompute, and
            the executor's own costs, at rates measured on the model's
            device) among the least-recompute plans of each family, the
            Pareto front and the one-level plan whose recomputes are predicted
            fastest (see ``objective``). ``None``: the least peak (or, where one is predicted
            faster, a plan whose peak is within 0.1% of it, see
            ``remat.planner.choose.PEAK_TOLERANCE``). A budget no plan meets raises
            :class:`remat.InfeasibleBudget`, which states the least peak.
        profile: ``"fake"`` (measure on fake tensors) or ``"device"``.
        offload: keep the checkpoints in pinned host memory between their
            forward and their recompute (copied asynchronously, overlapped
            with compute); the plan counts them off the device, so it can
            keep more and recompute less. CUDA only: elsewhere it warns once
            and plans without.
        costs: ``"flops"`` (counted, deterministic) or ``"profile"``: also
            time every stage's forward on the model's device (real tensors at
            the example inputs' size, no autograd; warm-up, then the median
            of repeats, CUDA events on a GPU) and report the plan's recompute
            in seconds (``Plan.recompute_seconds``); ties between plans of
            equal peak go to the one that recomputes for the least time.
        grad_accumulation: plan for steps whose parameter gradients exist
            before the backward (gradient accumulation over micro-batches, or
            ``zero_grad(set_to_none=False)``): their memory is live all step,
            so the least step peak is the least activation peak. By default
            the gradients are made during the backward (``zero_grad()``
            before each step), and the plan keeps more activations early in
            the backward, where few gradients exist yet.
        remake: plans may also remake, in backward, the values autograd
            keeps that operators without FLOPs made (normalisations,
            activations, adds: :func:`remat.remake_cheap`), at no recompute
            FLOPs (the remade operators still take time, and every operator
            of the forward passes through a Python dispatch mode). Such a
            plan is chosen when it has a lower peak, or recomputes fewer
            FLOPs within the budget; its peak is a simulated step. Not with
            ``offload`` or ``costs="profile"``.
        compile: plan to run compiled (``remat.optimize(..., compile=)``):
            ``"aot_eager"`` (ATen graphs run as generated Python), ``"inductor"``
            (fused kernels) or ``True`` (inductor). The plan keeps to what a
            compiled module runs (no nested checkpoints, offload or remade
            values) and its peak, recompute and time are a simulated step of
            the compiled graphs (``aot_eager``, fake tensors).
        optimizer: plan the whole step, ending with this optimizer's
            ``step()`` and ``zero_grad()`` (an optimizer over the model's
            parameters, or a name: ``"adamw"``, ``"adam"``, ``"sgd"``,
            ``"sgd-momentum"``, ... see :mod:`remat.measure.optimizer`). Its
            state, as its first step makes it (measured on fake tensors, not
            assumed), is held all step, and its ``step()`` runs with every
            gradient made: both count in every peak. The optimizer given is
            not touched.
        objective: ``"time"`` (the least predicted step time within ``budget``, and
            the least peak's ties to it) or ``"flops"``: the least recompute FLOPs
            (ties: the least time), as the peers are compared. FLOPs are what a
            step recomputes on any device; time also counts what costs no FLOPs
            (checkpoint regions, dispatch modes, remade normalizations), at rates
            measured on this machine, so ``"time"`` may recompute more FLOPs to
            run faster (DenseNet-121 on a CPU: 1x1 convolutions instead of
            BatchNorms), and its choice may differ between machines.

    Example:
        >>> import torch, remat
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
        >>> p = remat.plan(net, torch.randn(256, 64))
        >>> p.predicted_peak_bytes < p.baseline_peak_bytes
        True
    """
    budget_bytes = None if budget is None else parse_bytes(budget)
    with without_weights(model, example_inputs) as example_inputs:
        offload = offload and offload_possible(model, positional(model, example_inputs))
        profiled = ProfiledModel.of(
            model, example_inputs, loss_fn, profile, carried=not offload, grad_accumulation=grad_accumulation,
            optimizer=optimizer,
        )
        return solve(profiled, budget_bytes, offload, costs, remake, _backend(compile), objective)


def _backend(compile: bool | str) -> str:
    """``compile=`` as a backend of :mod:`remat.execute.compiled` (``""``: not compiled)."""
    if compile is True:
        return "inductor"
    if compile:
        check_choice("compile backend", compile, BACKENDS)
    return compile or ""


def pareto(
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    remake: bool = True,
    compile: bool | str = False,
    optimizer: OptimizerSpec | None = None,
) -> list[Plan]:
    """Every plan worth having, from the lowest peak that recomputes nothing to the least peak.

    Each plan recomputes the least possible for its peak, and each has a
    lower peak than the one before it (and recomputes more). Plans with
    stored or selective segments are among them (see :class:`Plan`): the
    first plan stores everything, or runs stages selectively where that
    lowers the peak at no recompute FLOPs; with ``remake``, so are the
    front's plans run with cheap values remade in backward (see :func:`plan`),
    one simulated step each. With ``compile`` (as in :func:`plan`), the front's
    plans compiled, each priced by a simulated step of its compiled graphs. With
    ``optimizer``, every peak counts its state and its step (as in :func:`plan`).

    Example:
        >>> import torch, remat
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
        >>> x = torch.randn(256, 64)
        >>> front = remat.pareto(net, x)
        >>> front[0].recompute_flops == 0
        True
        >>> front[-1].predicted_peak_bytes == remat.plan(net, x).predicted_peak_bytes
        True
    """
    with without_weights(model, example_inputs) as example_inputs:
        profiled = ProfiledModel.of(model, example_inputs, loss_fn, optimizer=optimizer)
        return pareto_plans(profiled, remake, _backend(compile))


def max_batch(
    model: str | nn.Module,
    budget: int | str,
    *,
    make_inputs: Callable[[int], Any] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    limit: int = 1 << 16,
    compile: bool | str = False,
    optimizer: OptimizerSpec | None = None,
) -> tuple[int, Plan]:
    """The largest batch size whose best plan fits ``budget``, and that plan.

    Args:
        model: a model spec (``"torchvision:resnet50"``, see
            :mod:`remat.tools.models`) or a module, with ``make_inputs``.
        budget: the step's peak limit, bytes or a string like ``"8GiB"``.
        make_inputs: batch size -> example inputs (needed for a module).
        limit: the largest batch size tried.
        compile: the largest batch whose compiled plan fits, as in :func:`plan`.
        optimizer: count its state and its step, as in :func:`plan`.

    Example:
        >>> import remat
        >>> batch, p = remat.max_batch("remat:mlp?depth=4&width=64", "1MiB")
        >>> batch > 1 and p.predicted_peak_bytes <= 2**20
        True
    """
    budget_bytes = parse_bytes(budget)
    if isinstance(model, str):
        from remat.tools import models

        source = models.load(model, fake=True)  # planned on fake tensors: no weights needed
        model, make_inputs = source.model, source.make_inputs
    if make_inputs is None:
        raise TypeError("max_batch needs make_inputs=lambda batch: example_inputs for a module")

    def best(batch: int) -> Plan | None:
        try:
            with without_weights(model, make_inputs(batch)) as inputs:
                profiled = ProfiledModel.of(model, inputs, loss_fn, optimizer=optimizer)
                return solve(profiled, budget_bytes, compiled=_backend(compile))
        except InfeasibleBudget:
            return None

    fitting = best(1)
    if fitting is None:
        least = plan(model, make_inputs(1), loss_fn, compile=compile, optimizer=optimizer).predicted_peak_bytes
        raise InfeasibleBudget(budget_bytes, least)
    low, high = 1, 2  # low fits; find a high that does not
    while high <= limit and (candidate := best(high)) is not None:
        low, fitting, high = high, candidate, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        candidate = best(middle)
        if candidate is None:
            high = middle
        else:
            low, fitting = middle, candidate
    return low, fitting


def optimize(
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    budget: int | str | None = None,
    *,
    plan: Plan | None = None,
    profile: Profile = "fake",
    offload: bool = False,
    costs: Costs = "flops",
    grad_accumulation: bool = False,
    remake: bool = True,
    compile: bool | str = False,
    per_shape: bool | int = False,
    optimizer: OptimizerSpec | None = None,
    objective: Objective = "time",
) -> nn.Module:
    """A drop-in module that trains ``model`` with the least-peak checkpoints.

    The returned module shares the model's parameters and buffers (nothing is
    copied; ``state_dict()`` keys and values are the model's), computes the
    same loss and gradients, and updates BatchNorm statistics once per step.
    Its ``.plan`` says what it keeps and what that costs.

    Args:
        plan: a plan made earlier (``Plan.load(path)``) for the same model and
            input size; skips capture's profile and the search (the plan records
            how the model was cut and how its pieces form stages).
        profile: ``"fake"`` or ``"device"``, as in :func:`plan`.
        offload: keep the checkpoints in pinned host memory, as in
            :func:`plan` (with ``plan=``, the plan's own setting is used).
        costs: ``"flops"`` or ``"profile"`` (time the stages), as in :func:`plan`.
        grad_accumulation: plan for gradients that exist all step, as in :func:`plan`.
        remake: plans may remake cheap values in backward, as in :func:`plan`.
        compile: run the plan compiled (:class:`remat.execute.compiled.CompiledModule`):
            ``"aot_eager"``, ``"inductor"`` or ``True`` (inductor), planned as in
            :func:`plan`. The forward is one call of a compiled graph and the
            backward recomputes exactly what the plan recomputes, with no Python
            per piece. The module is compiled for the example inputs' shapes. With
            ``plan=``, that plan is compiled (it may not nest, offload or remake).
        per_shape: for training loops whose batches change shape (sequence
            length, batch size): a :class:`remat.execute.shapes.PerShapeModule`
            that plans (and compiles) again for each new input shape, keeping the
            plans of the last ``per_shape`` shapes (``True``: 8), each one made
            with the arguments given here. Logged on the ``remat`` logger.
        optimizer: plan the whole step with this optimizer's state and step, as
            in :func:`plan` (the module itself does not step it: train as usual).
        objective: ``"time"`` or ``"flops"``, as in :func:`plan`.

    Example:
        >>> import torch, remat
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
        >>> x = torch.randn(256, 64)
        >>> fast = remat.optimize(net, x)
        >>> torch.equal(fast(x), net(x))
        True
    """
    if per_shape:
        if plan is not None:
            raise ValueError("a plan is made for one input shape: pass plan= or per_shape=, not both")
        options = dict(
            loss_fn=loss_fn, budget=budget, profile=profile, offload=offload, costs=costs,
            grad_accumulation=grad_accumulation, remake=remake, compile=compile, optimizer=optimizer,
            objective=objective,
        )
        return PerShapeModule(
            model, lambda args, kwargs: optimize(model, (args, kwargs), **options), example_inputs,
            8 if per_shape is True else per_shape,
        )
    if has_meta(model, example_inputs):
        raise ValueError(
            f"{type(model).__name__} is on the meta device: it has no weights to train. Plan it "
            "(remat.plan(model, batch), then plan.save(path)), build the model with its weights, and "
            "call remat.optimize(model, batch, plan=remat.Plan.load(path))"
        )
    backend = _backend(compile)
    with without_weights(model, example_inputs) as example_inputs:  # a model built under a FakeTensorMode
        inputs = positional(model, example_inputs)
        if plan is not None:
            return _apply(model, inputs, dataclasses.replace(plan, compiled=backend) if backend else plan)
        budget_bytes = None if budget is None else parse_bytes(budget)
        offload = offload and offload_possible(model, inputs)
        profiled = ProfiledModel.of(
            model, inputs, loss_fn, profile, carried=not offload, grad_accumulation=grad_accumulation,
            optimizer=optimizer,
        )
        return profiled.module(solve(profiled, budget_bytes, offload, costs, remake, backend, objective))


def _apply(model: nn.Module, inputs: tuple, plan: Plan) -> DropInModule:
    """``model`` run with a saved ``plan``: captured as the plan was (its cut mode), its pieces
    grouped into the plan's stages; nothing is profiled again."""
    check_model_and_inputs(model, inputs)
    if plan.fingerprint != fingerprint(model, inputs):
        given = input_shapes(inputs)
        if plan.input_shapes and plan.input_shapes != given:
            raise ValueError(
                f"this plan was made for inputs {', '.join(plan.input_shapes)}, and these are {', '.join(given)}: "
                "call remat.optimize without plan= for these shapes (or with per_shape=8 for shapes that change)"
            )
        raise ValueError(
            f"this plan was made for another model: {type(model).__name__}'s parameter or buffer names, shapes "
            "or dtypes differ from those it was planned with; call remat.optimize without plan= to make a new one"
        )
    if plan.cuts not in CUT_MODES:
        raise ValueError(
            f"this plan's cut mode {plan.cuts!r} is not one of {sorted(CUT_MODES)} (a plan from another remat "
            "version?): call remat.optimize without plan= to make a new one"
        )
    captured = capture(model, inputs, **CUT_MODES[plan.cuts])
    if [p for stage in plan.stage_pieces for p in stage] != list(range(len(captured.pieces))):
        raise ValueError(
            f"this plan's stages hold {sum(map(len, plan.stage_pieces))} pieces, but the model is cut into "
            f"{len(captured.pieces)} pieces here (a plan from another remat version?): call remat.optimize "
            "without plan= to make a new one"
        )
    return module_for(model, captured, plan, inputs)
