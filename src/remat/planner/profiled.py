"""A model captured and profiled once, and the plans made on it."""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from remat.capture.captured import Captured, fingerprint, input_shapes
from remat.chain.cost import segment_stages
from remat.chain.model import Chain, ChainSolution
from remat.chain.time import Speed, Work, plan_work
from remat.execute.compiled import module_for
from remat.execute.module import DropInModule, RematModule
from remat.measure.optimizer import OptimizerSpec, describe
from remat.measure.step import StepMeasurement, default_loss, measure_step, model_device, positional
from remat.plan import Plan
from remat.profile.model import Profile, capture_and_profile, profile_model
from remat.profile.speed import measure_speed
from remat.profile.timing import stage_seconds
from remat.validate import check_model_and_inputs

__all__ = ["Costs", "Objective", "ProfiledModel", "by_flops", "by_time", "sort_key"]

Costs = Literal["flops", "profile"]
Objective = Literal["time", "flops"]


def by_time(plan: Plan) -> tuple[float, int]:
    """Sort key of plans: the least predicted step time first, then the least recompute (plans
    without a predicted time by recompute alone)."""
    return (_seconds(plan), plan.recompute_flops)


def by_flops(plan: Plan) -> tuple[int, float]:
    """Sort key of plans: the least recompute first, then the least predicted step time."""
    return (plan.recompute_flops, _seconds(plan))


def _seconds(plan: Plan) -> float:
    return plan.predicted_seconds if plan.predicted_seconds is not None else 0.0


def sort_key(objective: Objective) -> Callable[[Plan], tuple]:
    """The sort key of plans for ``objective`` (see :func:`remat.plan`)."""
    return by_time if objective == "time" else by_flops


@dataclasses.dataclass
class ProfiledModel:
    """A model captured and measured as a chain, ready to be solved any number of times."""

    model: nn.Module
    inputs: tuple
    loss_fn: Callable[[Any], torch.Tensor]
    captured: Captured
    chain: Chain
    stage_pieces: list[list[int]]
    capture_seconds: float
    cuts: str = "carried"  # the capture's cut mode (remat.profile.model.CUT_MODES)
    baseline: Any = None
    fake: bool = True  # measured on fake tensors
    _seconds: np.ndarray | None = None  # forward seconds per stage, for costs="profile"
    plain_profiled: ProfiledModel | None = None  # profiled with single-tensor cuts only, see plain()
    grad_accumulation: bool = False  # parameter gradients exist all step (see plan())
    _selective: Chain | None = None  # the chain with selective costs too (see selective_chain())
    _plainly: frozenset[int] = frozenset()  # chain stages (1-based) that cannot run selectively
    simulated: dict = dataclasses.field(default_factory=dict)  # remade plan -> its simulated step, see planner.remade
    compiled: dict = dataclasses.field(default_factory=dict)  # what an aot_eager module runs -> it, see module()
    optimizer: OptimizerSpec | None = None  # its state and step() are part of the step (see plan())

    @classmethod
    def of(
        cls,
        model: nn.Module,
        example_inputs: Any,
        loss_fn,
        profile: Profile = "fake",
        *,
        carried: bool = True,
        grad_accumulation: bool = False,
        optimizer: OptimizerSpec | None = None,
        baseline: StepMeasurement | None = None,
    ) -> ProfiledModel:
        inputs = positional(model, example_inputs)
        check_model_and_inputs(model, inputs)
        loss_fn = loss_fn or default_loss
        start = time.perf_counter()
        captured, chain, stage_pieces, profile, cuts = capture_and_profile(model, inputs, loss_fn, profile, carried)
        elapsed = time.perf_counter() - start
        profiled = cls(
            model, inputs, loss_fn, captured, chain, stage_pieces, elapsed, cuts,
            baseline=baseline, fake=profile == "fake", grad_accumulation=grad_accumulation, optimizer=optimizer,
        )
        if optimizer is not None:
            # The optimizer's state is held all step, as the parameters are.
            if profiled.baseline is None:
                profiled.baseline = profiled.step(model)
            profiled.chain = dataclasses.replace(
                chain, base_bytes=chain.base_bytes + profiled.baseline.optimizer_state_bytes
            )
        return profiled

    def step(self, module: nn.Module) -> StepMeasurement:
        """One step of ``module`` (the model, or a module running a plan of it) measured as this
        model's steps are: on the same tensors, with its gradient accumulation and optimizer."""
        return measure_step(
            module, self.inputs, self.loss_fn, fake=self.fake, grad_accumulation=self.grad_accumulation,
            optimizer=self.optimizer,
        )

    def plain(self) -> ProfiledModel:
        """The model cut only where a single tensor is live: nested plans need such a chain."""
        if not self.chain.carries:
            return self
        if self.plain_profiled is None:
            profile = "fake" if self.fake else "device"
            self.plain_profiled = ProfiledModel.of(
                self.model, self.inputs, self.loss_fn, profile, carried=False,
                grad_accumulation=self.grad_accumulation, optimizer=self.optimizer, baseline=self.baseline,
            )
        return self.plain_profiled

    def selective_chain(self) -> Chain:
        """This chain with the costs of its stages run selectively too (measured once).

        Only chains cut at single tensors have them (stored segments are planned on
        those). Stages that selective checkpointing refuses (an in-place change of a
        tensor it keeps) have their plain costs and run plainly; where the profile
        fails otherwise, the plain chain, with a warning.
        """
        if self._selective is None:
            try:
                measured, _, plainly = profile_model(
                    self.model, self.captured, self.inputs, self.loss_fn,
                    "fake" if self.fake else "device", selective_stages=self.stage_pieces,
                )
                self._selective = self.chain.with_selective(measured)
                self._plainly = plainly
            except RuntimeError as error:
                warnings.warn(
                    f"remat: no selective segments for this model ({error}); planning without them",
                    stacklevel=4,
                )
                self._selective = self.chain
        return self._selective

    def planned(self, chain: Chain) -> Chain:
        """``chain`` as the solvers should see it: with gradient accumulation the parameter
        gradients are there from the start (base bytes), and each stage's new ones are
        temporaries added into them (inside its backward peak)."""
        if not self.grad_accumulation:
            return chain
        grads = chain.param_grad_bytes
        return dataclasses.replace(chain, base_bytes=chain.base_bytes + int(grads.sum()), param_grad_bytes=0 * grads)

    def module(self, plan: Plan) -> DropInModule:
        """The model run with ``plan`` (compiled if it says so), on the capture the plan was made
        for (its cut mode). An ``aot_eager`` module is compiled once per partition: the one a
        simulated step ran (:mod:`remat.planner.compiled`) is the one returned for the plan chosen."""
        if plan.compiled != "aot_eager":
            return module_for(self.model, self.cut_as(plan).captured, plan, self.inputs)
        runs = (plan.cuts, plan.checkpoints, plan.stored, plan.selective)
        if runs not in self.compiled:
            self.compiled[runs] = module_for(self.model, self.cut_as(plan).captured, plan, self.inputs)
        module = self.compiled[runs]
        module.plan = plan  # the same graphs; the plan as priced
        return module

    @functools.cached_property
    def fingerprint(self) -> str:
        """The shapes a plan of this model is made for (see :func:`remat.capture.captured.fingerprint`)."""
        return fingerprint(self.model, self.inputs)

    def cut_as(self, plan: Plan) -> ProfiledModel:
        """This model's capture in ``plan``'s cut mode."""
        return self if plan.cuts == self.cuts else self.plain()

    def source_of(self, solution: ChainSolution) -> ProfiledModel:
        """The capture a chain ``solution`` is a plan of: with nested checkpoints, stored or
        selective segments, the one cut only at single tensors."""
        return self.plain() if solution.inner or solution.stored or solution.selective else self

    @functools.cached_property
    def speed(self) -> Speed | None:
        """The rates of the model's device for the step-time model (measured once per process),
        or None on a device remat cannot time (meta)."""
        dtypes = [p.dtype for p in self.model.parameters() if p.is_floating_point()]
        try:
            return measure_speed(model_device(self.model, self.inputs), dtypes[0] if dtypes else torch.float32)
        except ValueError:
            return None

    def timed(self, plan: Plan, step: StepMeasurement | None = None, recompute_seconds: float | None = None) -> Plan:
        """``plan`` with its predicted step time (:mod:`remat.chain.time`): the baseline step's
        work and what the plan adds on its chain, or the work of its simulated ``step`` (remade
        plans) with the executor's regions and dispatch modes; ``recompute_seconds`` (measured
        stage times) in place of the recompute's modelled time."""
        speed = self.speed
        if speed is None:
            return plan
        chain = self.cut_as(plan).chain.run_as(nested=bool(plan.inner), offload=plan.offload)
        added = plan_work(chain, plan.checkpoints, plan.stored, plan.inner, plan.selective, plan.offload)
        if step is None:
            work = self.baseline.work + added
        elif plan.compiled:  # no regions, no dispatch modes: the compiled graphs' operators are the step's
            work = step.work
        else:
            recorded = step.forward_ops if plan.remake else 0
            work = step.work + Work(
                regions=added.regions, checkpoint_calls=added.checkpoint_calls,
                intercepted_ops=added.intercepted_ops, recorded_ops=recorded,
            )
        seconds = speed.seconds(work)
        source = speed.source
        if recompute_seconds is not None:
            recomputed = plan_work(chain, plan.checkpoints, plan.stored, plan.inner)
            seconds += recompute_seconds - speed.seconds(
                Work(
                    flops=recomputed.flops, ops=recomputed.ops, written_bytes=recomputed.written_bytes,
                    norm_bytes=recomputed.norm_bytes,
                )
            )
            source += "; recompute at the stages' measured times"
        return dataclasses.replace(
            plan, predicted_seconds=seconds, eager_seconds=speed.seconds(self.baseline.work), time_source=source
        )

    def stage_seconds(self) -> np.ndarray:
        """Forward seconds of every chain stage on the model's device (measured once)."""
        if self._seconds is None:
            host = RematModule(self.model, self.captured, ())
            inputs = host.flat_inputs(self.inputs, {})
            self._seconds = stage_seconds(host, inputs, self.stage_pieces, self.loss_fn)
        return self._seconds

    def to_plan(
        self,
        solution: ChainSolution,
        solve_seconds: float,
        budget_bytes: int | None,
        offload: bool = False,
        recompute_seconds: float | None = None,
    ) -> Plan:
        """The :class:`Plan` of a chain ``solution`` (of this chain, or, with nested checkpoints,
        stored or selective segments, of the one cut only at single tensors), with the baseline
        step measured once."""
        if self.baseline is None:
            self.baseline = self.step(self.model)
        source = self.source_of(solution)
        plan = Plan(
            stage_names=source.chain.names,
            checkpoints=solution.checkpoints,
            # The optimizer's step() runs after every plan's backward, with every gradient made.
            predicted_peak_bytes=max(solution.peak_bytes, self.baseline.optimizer_peak_bytes),
            baseline_peak_bytes=self.baseline.peak_bytes,
            forward_flops=int(self.chain.fwd_flops[:-1].sum()),
            recompute_flops=solution.recompute_flops,
            parameter_bytes=self.baseline.parameter_bytes,
            input_bytes=self.baseline.input_bytes,
            solve_seconds=solve_seconds,
            capture_seconds=self.capture_seconds + (self.plain_profiled.capture_seconds if self.plain_profiled else 0.0),
            fingerprint=self.fingerprint,
            input_shapes=input_shapes(self.inputs),
            budget_bytes=budget_bytes,
            offload=offload,
            costs="flops" if recompute_seconds is None else "profile",
            recompute_seconds=recompute_seconds,
            inner=solution.inner,
            grad_accumulation=self.grad_accumulation,
            optimizer=describe(self.optimizer),
            optimizer_state_bytes=self.baseline.optimizer_state_bytes,
            stored=solution.stored,
            selective=tuple(
                i for i in segment_stages(source.chain.n, solution.checkpoints, solution.selective)
                if i not in source._plainly
            ),
            stage_pieces=tuple(map(tuple, source.stage_pieces)),
            cuts=source.cuts,
        )
        return self.timed(plan, recompute_seconds=recompute_seconds)
