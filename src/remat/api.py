"""The one-call API: ``remat.plan``, ``remat.optimize``, ``remat.pareto``, ``remat.max_batch``.

Pipeline: capture the model as a torch.fx (or torch.export) graph, cut it
into a chain of pieces joined by single tensors, profile every piece (on fake
tensors, or on the device), solve the chain for the least peak or the least
recompute within a budget, and run the plan with the user's own modules.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from remat.budget import InfeasibleBudget, parse_bytes
from remat.capture.graph import Piece, opaque_modules, piece_module, split_linear, structure_key, trace
from remat.capture.profile import BackwardSkipsStage, profile_selectively, profile_stages
from remat.capture.timing import stage_seconds
from remat.execute.engine import nested_starts, run_selective, segment_starts, stored_starts
from remat.execute.module import RematModule
from remat.execute.offload import CheckpointOffload
from remat.measure.step import as_tuple, default_loss, measure_step, model_device, step_model
from remat.measure.tracker import round_to_of, track_memory, unique_storage_bytes
from remat.plan import Plan
from remat.execute.remake import CostlyCall, costly_calls
from remat.chain.cost import largest_retained, recompute_flops_of, segment_stages, single_tensor_boundaries
from remat.chain.model import Chain, ChainSolution
from remat.solvers.checkpoints import min_peak, min_recompute, pareto_front
from remat.solvers.nested import MAX_STAGES as MAX_NESTED_STAGES
from remat.solvers.nested import min_peak_nested, min_recompute_nested

__all__ = ["plan", "optimize", "pareto", "max_batch"]

#: Kinds of costly calls (:attr:`remat.remake.CostlyCall.kind`) a budget plan may remake: the
#: ones with the most output bytes; measuring what each saves costs one simulated step.
MAX_COSTLY_KINDS = 8
#: Trades of remade costly calls (:meth:`_Profiled._traded`) a budget plan takes at most: each
#: one tried costs a simulated step.
MAX_TRADES = 4


@dataclasses.dataclass
class Captured:
    """A model cut into pieces, ready to profile or run."""

    pieces: list[Piece]
    modules: list[fx.GraphModule]
    input_names: list[str]
    codegen: Any  # the traced graph's input flattening / output unflattening
    reads: list[tuple[int, ...]] = dataclasses.field(default_factory=list)  # earlier pieces each piece reads

    def __post_init__(self) -> None:
        if not self.reads:
            made_by = {p.output: i for i, p in enumerate(self.pieces)}
            self.reads = [tuple(made_by[v] for v in p.inputs) for p in self.pieces]
        # The last piece that reads each piece's output (the output's own index if none).
        self.last_reader = list(range(len(self.pieces)))
        for i, read in enumerate(self.reads):
            for q in read:
                self.last_reader[q] = max(self.last_reader[q], i)

    def outside_reads(self, start: int, stop: int) -> tuple[int, ...]:
        """The outputs of pieces before ``start`` that pieces ``start..stop-1`` read."""
        return tuple(sorted({q for p in range(start, stop) for q in self.reads[p] if q < start}))

    def check_boundaries(self, boundaries: Sequence[int]) -> None:
        """Refuse segment starts that would drop a tensor a later segment reads.

        Each segment may read only the outputs of the pieces that end earlier
        segments (those are kept); a value made inside a segment and read
        after it is not.
        """
        bounds = [0, *boundaries, len(self.pieces)]
        kept = set()
        for start, stop in zip(bounds[:-1], bounds[1:]):
            missing = set(self.outside_reads(start, stop)) - kept
            if missing:
                q = min(missing)
                raise ValueError(
                    f"a segment starting at piece {start} reads the output of piece {q} "
                    f"({self.pieces[q].name}), which is made inside an earlier segment: start a "
                    f"segment at piece {q + 1} too, or use the boundaries of a remat plan"
                )
            kept.add(stop - 1)
    opaque: tuple[str, ...] = ()  # submodules that could not be traced, called whole

    def tensor_names(self, index: int, root: nn.Module) -> list[str]:
        """Names (on ``root``) of the parameters and buffers piece ``index`` reads."""
        names = set()
        for n in self.pieces[index].nodes:
            if n.op == "call_module":
                module = root.get_submodule(n.target)
                names.update(f"{n.target}.{k}" for k, _ in module.named_parameters())
                names.update(f"{n.target}.{k}" for k, _ in module.named_buffers())
            names.update(a.target for a in [n, *n.all_input_nodes] if a.op == "get_attr")
        return sorted(names)

    def submodules(self, start: int, stop: int, root: nn.Module) -> list[nn.Module]:
        """The modules that pieces ``start..stop-1`` call."""
        return [
            root.get_submodule(n.target)
            for piece in self.pieces[start:stop]
            for n in piece.nodes
            if n.op == "call_module"
        ]


def capture(model: nn.Module, example_inputs: tuple, *, carried: bool = True) -> Captured:
    """Trace ``model`` and cut it into a chain of pieces (see :func:`split_linear`)."""
    gm = trace(model, example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    pieces = split_linear(gm, carried=carried)
    model_tensors = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    model_tensors |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    modules = [piece_module(gm, p, placeholders, model_tensors) for p in pieces]
    return Captured(pieces, modules, [p.target for p in placeholders], gm.graph._codegen, opaque=opaque_modules(gm))


def fingerprint(model: nn.Module, example_inputs: tuple) -> str:
    """Parameter names/shapes/dtypes and input shapes, hashed."""
    parts = [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in model.state_dict().items()]
    parts += [f"in:{tuple(t.shape)}:{t.dtype}" for t in example_inputs if isinstance(t, torch.Tensor)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


Profile = Literal["fake", "device"]
Costs = Literal["flops", "profile"]


def check_model_and_inputs(model: nn.Module, inputs: tuple) -> None:
    """Refuse, before tracing, a model and inputs that cannot make a training step to plan.

    Raises ValueError, with what to do, when the model is in eval mode (the
    captured graph would keep eval behaviour), when an input tensor is on a
    device the model's parameters and buffers are not on, when floating-point
    inputs have none of the floating dtypes of the parameters (outside
    autocast), or when neither a parameter nor an input requires grad (there
    is no backward pass).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remat plans an nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    if not model.training:
        raise ValueError(
            f"{name} is in eval mode: call model.train() first: remat plans training steps "
            "(dropout and BatchNorm are captured in training mode; the optimized module still "
            "runs the model's own forward after .eval() or under torch.no_grad())"
        )
    tensors = [*model.parameters(), *model.buffers()]
    model_devices = {t.device for t in tensors}
    input_tensors = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    for t in input_tensors:
        if model_devices and t.device not in model_devices and not (t.dim() == 0 and t.device.type == "cpu"):
            where = ", ".join(sorted(map(str, model_devices)))
            raise ValueError(
                f"the example inputs are on {t.device} but {name}'s parameters and buffers are on "
                f"{where}: move the inputs to {where} (or the model to {t.device}) before planning"
            )
    _check_float_dtypes(name, model, input_tensors)
    if not any(p.requires_grad for p in model.parameters()) and not any(
        t.requires_grad for t in input_tensors
    ):
        raise ValueError(
            f"no parameter of {name} requires grad and no example input requires grad, so there "
            "is no backward pass to plan: unfreeze some parameters (requires_grad_(True)) or pass "
            "an input that requires grad"
        )


def _check_float_dtypes(name: str, model: nn.Module, inputs: list[torch.Tensor]) -> None:
    """Floating inputs of a dtype no parameter has (float64 into a float32 model) fail deep
    inside tracing; say so first. Under autocast the operators cast, so anything goes."""
    floats = {t.dtype for t in inputs if t.is_floating_point()}
    params = {p.dtype for p in model.parameters() if p.is_floating_point()}
    devices = {t.device.type for t in inputs} | {p.device.type for p in model.parameters()}
    if not floats or not params or floats & params:
        return
    if any(torch.is_autocast_enabled(d) for d in devices if torch.amp.is_autocast_available(d)):
        return
    given = ", ".join(sorted(map(str, floats)))
    wanted = ", ".join(sorted(map(str, params)))
    raise ValueError(
        f"the example inputs are {given} but {name}'s parameters are {wanted}: convert the inputs "
        f"(e.g. x.to({sorted(map(str, params))[0]})) or the model (model.to(dtype)) so they match, "
        "or plan inside torch.autocast(...) if the model is meant to run under autocast"
    )


def _offload_possible(model: nn.Module, inputs: tuple) -> bool:
    """Whether kept activations can go to host memory: only from a CUDA device (warns otherwise)."""
    device = model_device(model, inputs)
    if device.type == "cuda":
        return True
    warnings.warn(
        f"remat: offload=True does nothing here: the model is on {device}, and kept activations "
        "are offloaded only from a CUDA device to pinned host memory; planning them on the device "
        "instead (move the model and inputs to CUDA to offload)",
        stacklevel=4,
    )
    return False


def _profile(
    model: nn.Module,
    captured: Captured,
    inputs: tuple,
    loss_fn,
    profile: Profile = "fake",
    selective_groups: list[list[int]] | None = None,
) -> tuple[Chain, list[list[int]], frozenset[int]]:
    """The chain of ``captured``'s pieces (plus the loss), measured on fake tensors or the
    device, and its grouping of pieces into chain stages.

    With ``selective_groups`` (the pieces of each chain stage, as a first
    profile grouped them), every chain stage is measured run selectively
    instead (:func:`remat.execute.run_selective`, one region per stage), but
    those that cannot run so, whose indices (0-based) come back third.
    """
    if profile not in ("fake", "device"):
        raise ValueError(f"profile must be 'fake' or 'device', got {profile!r}")
    host = RematModule(model, captured, ())  # the model's modules and root tensors, same names
    inputs = host.flat_inputs(inputs, {})  # arguments left to their defaults filled in
    with step_model(host, inputs, fake=profile == "fake") as (fake_host, fake_inputs):
        named = dict(fake_host.named_parameters(remove_duplicate=False))  # tied weights by every name
        specs, keys = [], []
        last = len(captured.modules) - 1
        finish = fake_host.structured_output  # the model's output structure
        for index, piece in enumerate(fake_host.captured.modules):

            def run(x, piece=piece, index=index):
                args = ((), fake_host, *x) if index == 0 else (x, fake_host, *fake_inputs)
                return finish(piece(*args)) if index == last else piece(*args)

            used = captured.tensor_names(index, fake_host)
            trainable = [named[k] for k in used if k in named and named[k].requires_grad]
            specs.append((captured.pieces[index].name, run, trainable))
            keys.append(structure_key(piece, fake_host) + ("<last>" if index == last else ""))
        device = next((t.device for t in fake_inputs if isinstance(t, torch.Tensor)), None)
        tensors = [*fake_host.parameters(), *fake_host.buffers(), *fake_inputs]
        base = unique_storage_bytes(tensors, round_to_of(device)) + _cached_casts(fake_host, fake_inputs, device)
        common = dict(base_bytes=base, device=device, exact=profile == "fake")
        if selective_groups is None:
            # A stage measured once for several places hands the next stage stand-in values;
            # untraced code may branch on values, so then every stage runs on the real ones.
            keys = None if captured.opaque else keys
            chain, groups = profile_stages(specs, fake_inputs, loss_fn, keys=keys, reads=captured.reads, **common)
            return chain, groups, frozenset()
        selective, group_keys, reads = _stage_specs(fake_host, specs, keys, selective_groups, captured, True)
        plain, _, _ = _stage_specs(fake_host, specs, keys, selective_groups, captured, False)
        keys = None if captured.opaque else group_keys
        return profile_selectively(selective, plain, fake_inputs, loss_fn, keys=keys, reads=reads, **common)


def _stage_specs(
    host: RematModule, specs: list, keys: list, groups: list[list[int]], captured: Captured, selectively: bool
):
    """Specs, keys and reads of the chain stages (groups of pieces, each piece after a
    group's first reading only the one before: merged views), run selectively or not."""

    def run_group(group: list[int], spec, *leaves):
        x = tree_unflatten(list(leaves), spec)
        for index in group:
            x = specs[index][1](x if index == group[0] else (x,))
        return x

    def run(x, group: list[int], modules: list[nn.Module]):
        # The region's inputs one by one, as the executor passes them: checkpoint keeps
        # tensor arguments through saved-tensor hooks (which the profile sees), and
        # containers of tensors only by reference.
        leaves, spec = tree_flatten(x)
        if not selectively:
            return run_group(group, spec, *leaves)
        return run_selective(functools.partial(run_group, group, spec), modules, *leaves)

    grouped = []
    for group in groups:
        modules = captured.submodules(group[0], group[-1] + 1, host)
        trainable = list({id(p): p for i in group for p in specs[i][2]}.values())
        stage = functools.partial(run, group=group, modules=modules)
        grouped.append((" + ".join(specs[i][0] for i in group), stage, trainable))
    group_keys = ["|".join(keys[i] for i in group) for group in groups]
    group_of = {index: k for k, group in enumerate(groups) for index in group}
    reads = [tuple(group_of[q] for q in captured.reads[group[0]]) for group in groups]
    return grouped, group_keys, reads


def _cached_casts(host: RematModule, inputs: tuple, device: torch.device | None) -> int:
    """Bytes of the weight copies autocast makes and caches in a forward (0 outside autocast).

    Autocast keeps a parameter's low-precision copy from its first use until
    the autocast block exits, so for a step run in one block they are live to
    its end: counted with the parameters. The forward run here fills the
    cache, so the stage profiles that follow see no cast of their own.
    """
    if device is None or not (torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)):
        return 0
    with torch.no_grad(), track_memory(device, exact=True) as mem:
        host.run_pieces(0, len(host.captured.modules), {}, inputs)
    return mem.current_bytes


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
) -> Plan:
    """Find the checkpoints for ``model``: the least peak, or the least recompute within ``budget``.

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
            such as ``"20GiB"``); the plan then recomputes as little as
            possible. ``None``: the least peak. A budget no plan meets raises
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

    Example:
        >>> import torch, remat
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
        >>> p = remat.plan(net, torch.randn(256, 64))
        >>> p.predicted_peak_bytes < p.baseline_peak_bytes
        True
    """
    return _profile_and_solve(
        model, example_inputs, loss_fn, budget, profile, offload, costs, grad_accumulation, remake
    )[1]


@dataclasses.dataclass
class _Profiled:
    """A model captured and measured as a chain, ready to be solved any number of times."""

    model: nn.Module
    inputs: tuple
    loss_fn: Callable[[Any], torch.Tensor]
    captured: Captured
    chain: Chain
    groups: list[list[int]]
    capture_seconds: float
    baseline: Any = None
    fake: bool = True  # measured on fake tensors
    _seconds: np.ndarray | None = None  # forward seconds per stage, for costs="profile"
    _plain: _Profiled | None = None  # profiled with single-tensor cuts only, for nested plans
    grad_accumulation: bool = False  # parameter gradients exist all step (see plan())
    _selective: Chain | None = None  # the chain with selective costs too (see selective_chain())
    _plainly: frozenset[int] = frozenset()  # chain stages (1-based) that cannot run selectively
    _simulated: dict = dataclasses.field(default_factory=dict)  # remade plan -> (peak, recompute), see remade()

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
    ) -> _Profiled:
        inputs = as_tuple(example_inputs)
        check_model_and_inputs(model, inputs)
        loss_fn = loss_fn or default_loss
        start = time.perf_counter()
        captured, chain, groups, profile = _capture_and_profile(model, inputs, loss_fn, profile, carried)
        elapsed = time.perf_counter() - start
        return cls(
            model, inputs, loss_fn, captured, chain, groups, elapsed,
            fake=profile == "fake", grad_accumulation=grad_accumulation,
        )

    def plain(self) -> _Profiled:
        """The model cut only where a single tensor is live: nested plans need such a chain."""
        if not self.chain.carries:
            return self
        if self._plain is None:
            profile = "fake" if self.fake else "device"
            self._plain = _Profiled.of(
                self.model, self.inputs, self.loss_fn, profile, carried=False, grad_accumulation=self.grad_accumulation
            )
            self._plain.baseline = self.baseline
        return self._plain

    def selective_chain(self) -> Chain:
        """This chain with the costs of its stages run selectively too (measured once).

        Only chains cut at single tensors have them (stored segments are planned on
        those). Stages that selective checkpointing refuses (an in-place change of a
        tensor it keeps) have their plain costs and run plainly; where the profile
        fails otherwise, the plain chain, with a warning.
        """
        if self._selective is None:
            try:
                measured, _, plainly = _profile(
                    self.model, self.captured, self.inputs, self.loss_fn,
                    "fake" if self.fake else "device", selective_groups=self.groups,
                )
                self._selective = self.chain.with_selective(measured)
                self._plainly = frozenset(k + 1 for k in plainly)
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

    def module(self, plan: Plan) -> RematModule:
        """The model run with ``plan``, on the capture the plan was made for."""
        source = self if plan.stage_names == self.chain.names else self.plain()
        return _module(self.model, source.captured, source.groups, plan)

    def stage_seconds(self) -> np.ndarray:
        """Forward seconds of every chain stage on the model's device (measured once)."""
        if self._seconds is None:
            host = RematModule(self.model, self.captured, ())
            inputs = host.flat_inputs(self.inputs, {})
            self._seconds = stage_seconds(host, inputs, self.groups, self.loss_fn)
        return self._seconds

    def plan(
        self,
        solution: ChainSolution,
        solve_seconds: float,
        budget_bytes: int | None,
        offload: bool = False,
        recompute_seconds: float | None = None,
    ) -> Plan:
        if self.baseline is None:
            self.baseline = measure_step(
                self.model, self.inputs, self.loss_fn, fake=self.fake, grad_accumulation=self.grad_accumulation
            )
        source = self.plain() if solution.inner or solution.stored or solution.selective else self
        return Plan(
            stage_names=source.chain.names,
            checkpoints=solution.checkpoints,
            predicted_peak_bytes=solution.peak_bytes,
            baseline_peak_bytes=self.baseline.peak_bytes,
            forward_flops=int(self.chain.fwd_flops[:-1].sum()),
            recompute_flops=solution.recompute_flops,
            parameter_bytes=self.baseline.parameter_bytes,
            input_bytes=self.baseline.input_bytes,
            solve_seconds=solve_seconds,
            capture_seconds=self.capture_seconds + (self._plain.capture_seconds if self._plain else 0.0),
            fingerprint=fingerprint(self.model, self.inputs),
            budget_bytes=budget_bytes,
            offload=offload,
            costs="flops" if recompute_seconds is None else "profile",
            recompute_seconds=recompute_seconds,
            inner=solution.inner,
            grad_accumulation=self.grad_accumulation,
            stored=solution.stored,
            selective=tuple(
                i for i in segment_stages(source.chain.n, solution.checkpoints, solution.selective)
                if i not in source._plainly
            ),
        )

    def solve(
        self, budget_bytes: int | None, offload: bool = False, costs: Costs = "flops", remake: bool = True
    ) -> Plan:
        """The least-peak plan, or the least recompute within ``budget_bytes`` (see :func:`plan`)."""
        if costs not in ("flops", "profile"):
            raise ValueError(f"costs must be 'flops' or 'profile', got {costs!r}")
        try:
            chosen = self._solve_chain(budget_bytes, offload, costs)
        except InfeasibleBudget:
            chosen = None
        if remake and not offload and costs == "flops":
            chosen = self._remade(chosen, budget_bytes)
        if chosen is None:
            least = self.solve(None, offload, costs, remake)
            raise InfeasibleBudget(budget_bytes, least.predicted_peak_bytes)
        return chosen

    def _solve_chain(self, budget_bytes: int | None, offload: bool, costs: Costs) -> Plan:
        """The best plan of the chain cost model's families (no remade values)."""
        chain = self.planned(self.chain)
        if costs == "profile":
            # The solvers weigh recompute by the chain's forward costs: nanoseconds here.
            chain = dataclasses.replace(chain, fwd_flops=np.round(self.stage_seconds() * 1e9).astype(np.int64))
        start = time.perf_counter()
        if budget_bytes is None:
            solution = min_peak(chain, offload=offload)
        else:
            solution = min_recompute(chain, budget_bytes, offload=offload)
        profiled_plain = self._plain is not None
        if not offload and costs == "flops":
            solution = self._on_plain_chain(solution, budget_bytes)
        if solution is None:
            # The nested least-peak plan may be below every plan the budget search's
            # grid (or the one-level family) reaches: it is the plan if it fits.
            least = self._solve_chain(None, offload, costs)
            if least.predicted_peak_bytes > budget_bytes:
                raise InfeasibleBudget(budget_bytes, least.predicted_peak_bytes)
            return dataclasses.replace(least, budget_bytes=budget_bytes)
        seconds = time.perf_counter() - start
        if not profiled_plain and self._plain is not None:  # its capture counts as capture, not solve
            seconds -= self._plain.capture_seconds
        recompute_seconds = None
        if costs == "profile":
            recompute_seconds = solution.recompute_flops / 1e9
            solution = dataclasses.replace(
                solution, recompute_flops=recompute_flops_of(self.chain, solution.checkpoints, solution.stored)
            )
        return self.plan(solution, seconds, budget_bytes, offload, recompute_seconds)

    def front(self) -> list[ChainSolution]:
        """The chain's Pareto front of plans (peak descending, recompute ascending), with the stored
        and selective segments of the chain cut at single tensors where that chain is small enough."""
        front = pareto_front(self.chain)
        if self.plain().chain.n <= MAX_NESTED_STAGES:
            richer = pareto_front(self.plain().selective_chain(), store=True)
            front = _lower_envelope(front + [s for s in richer if s.stored or s.selective], lambda s: s.peak_bytes)
        return front

    def remade(self, plan: Plan, costly: tuple[int, ...] = ()) -> Plan | None:
        """``plan`` with cheap values remade in backward (:mod:`remat.remake`), and the outputs
        of the ``costly`` calls too; its peak and recompute simulated (one step). None (with
        a warning) where the model does something remaking cannot follow.

        A plan with selective stages is also simulated with them run plainly (remaking
        does value by value what they do per stage); the lower peak is kept.
        """
        variants = [plan, dataclasses.replace(plan, selective=())] if plan.selective else [plan]
        simulated = []
        for variant in variants:
            variant = dataclasses.replace(variant, remake=True, remade_costly=costly)
            # The searches of _remade_costly come back to plans they simulated before.
            runs = (variant.stage_names, variant.checkpoints, variant.inner, variant.stored, variant.selective,
                    variant.offload, costly)
            if runs not in self._simulated:
                try:
                    step = measure_step(
                        self.module(variant), self.inputs, self.loss_fn,
                        fake=self.fake, grad_accumulation=self.grad_accumulation,
                    )
                except RuntimeError as error:
                    warnings.warn(f"remat: planning without remade values ({error})", stacklevel=4)
                    return None
                flops = step.forward_flops + step.backward_flops
                baseline = self.baseline.forward_flops + self.baseline.backward_flops
                self._simulated[runs] = step.peak_bytes, flops - baseline
            peak, recompute = self._simulated[runs]
            simulated.append(dataclasses.replace(variant, predicted_peak_bytes=peak, recompute_flops=recompute))
        return min(simulated, key=lambda p: p.predicted_peak_bytes)

    def _remade(self, chosen: Plan | None, budget_bytes: int | None) -> Plan | None:
        """``chosen``, or the same plan run with remade values if that lowers the least peak.

        Within a budget, the least recompute among ``chosen``, the plans of the front run
        with remade values (the one that recomputes least first, then by bisection along
        the rest), and the first remade with the outputs of its most memory-hungry matmuls
        remade too (:meth:`_remade_costly`). Each candidate is one or two simulated steps.
        """
        start = time.perf_counter()
        if budget_bytes is None:  # the least-peak plan is there
            best = self.remade(chosen)
            if best is None or best.predicted_peak_bytes >= chosen.predicted_peak_bytes:
                best = chosen
        else:
            cheaper = [
                self.plan(s, 0.0, budget_bytes)
                for s in self.front() if chosen is None or s.recompute_flops < chosen.recompute_flops
            ]

            def remade(index: int) -> Plan | None:
                return self.remade(cheaper[index])

            # Remade throughout, the plan that recomputes least often beats plans with recomputed
            # segments (their recompute keeps everything it saves): the remade peaks fall along
            # the rest of the front only.
            first = remade(0) if cheaper else None
            if _fits(first, budget_bytes):
                candidates = [chosen, first]
            else:
                along = _least_fitting(remade, 1, len(cheaper), budget_bytes)
                candidates = [chosen, along[1] if along else None]
                if first is not None:
                    candidates.append(self._remade_costly(cheaper, budget_bytes))
            best = min((c for c in candidates if c is not None), key=lambda c: c.recompute_flops, default=None)
        if best is None:
            return None
        # The simulated steps count as solve time, whichever plan won.
        return dataclasses.replace(
            best, solve_seconds=(chosen.solve_seconds if chosen else 0.0) + time.perf_counter() - start
        )

    def _remade_costly(self, front: list[Plan], budget_bytes: int) -> Plan | None:
        """The plan of ``front`` (by recompute ascending) with costly calls remade too that fits
        the budget at the least recompute found; or None. Plans run remade and without
        selective stages.

        Calls are remade in the order of the peak bytes their kind saves per FLOP
        (:meth:`_costly_worth`): attention before the first matmul of an MLP, say;
        kinds that save nothing never. For the best kind, then the best two, and so
        on: the first plan of the front that fits with every call of those kinds
        remade, then the fewest calls remade on it (both by bisection). A kind
        worth less is only tried where it lets an earlier plan of the front fit.
        The best plan found is then improved by trades of its calls (:meth:`_traded`).
        """
        front = [dataclasses.replace(p, selective=(), remake=False, remade_costly=()) for p in front]
        census: dict[int, list[CostlyCall]] = {}  # per plan of the front, its costly calls

        def census_of(index: int) -> list[CostlyCall]:
            if index not in census:
                census[index] = self._costly_calls(front[index])
            return census[index]

        worth = self._costly_worth(front[0], census_of(0))
        best_first = sorted((kind for kind, w in worth.items() if w > 0), key=worth.get, reverse=True)
        rank = {kind: i for i, kind in enumerate(best_first)}
        calls: dict[int, list[CostlyCall]] = {}

        def candidates(index: int, kinds: int = len(rank)) -> list[CostlyCall]:
            """The calls of ``front[index]`` of the ``kinds`` best kinds, best first."""
            if index not in calls:
                found = [c for c in census_of(index) if c.kind in rank]
                calls[index] = sorted(found, key=lambda c: rank[c.kind])  # stable: forward order within a kind
            return [c for c in calls[index] if rank[c.kind] < kinds]

        def remade(index: int, count: int) -> Plan | None:
            return self.remade(front[index], tuple(sorted(c.index for c in candidates(index)[:count])))

        best, best_index, high = None, 0, len(front)
        for kinds in range(1, len(rank) + 1):
            fitting = _least_fitting(lambda i: remade(i, len(candidates(i, kinds))), 0, high, budget_bytes)
            if fitting is None:
                continue
            index, plan = fitting
            # With the kinds before alone, every call remade did not fit on this plan.
            fewer = len(candidates(index, kinds - 1)) + 1 if kinds > 1 else 1
            most = len(candidates(index, kinds))
            fewest = _least_fitting(lambda count: remade(index, count), fewer, most, budget_bytes)
            plan = fewest[1] if fewest else plan
            if best is None or plan.recompute_flops < best.recompute_flops:
                best, best_index = plan, index
            high = index
        return best if best is None else self._traded(front[best_index], best, candidates(best_index), budget_bytes)

    def _traded(self, base: Plan, found: Plan, calls: list[CostlyCall], budget_bytes: int) -> Plan:
        """``found`` (``base`` with some of ``calls`` remade: of each kind, the first in forward
        order) improved one trade at a time while it fits the budget: a remade call given up,
        or traded for a call of another kind that costs fewer FLOPs; the trade that saves
        most first, at most :data:`MAX_TRADES` taken. Kinds that save as many bytes per
        FLOP are in no useful order, and the last kind's count overshoots the bytes the
        budget needs by up to a call: trades land the mix closer."""
        kinds = _by_kind(calls)
        flops = {kind: group[0].flops for kind, group in kinds.items()}
        remade = set(found.remade_costly)
        counts = {kind: sum(c.index in remade for c in group) for kind, group in kinds.items()}
        tried = {tuple(counts.values())}  # a mix that did not fit or save before will not now
        for _ in range(MAX_TRADES):
            trades = [({give: -1}, flops[give]) for give in kinds if counts[give]]
            trades += [
                ({give: -1, take: 1}, flops[give] - flops[take])
                for give in kinds if counts[give]
                for take in kinds if counts[take] < len(kinds[take]) and flops[take] < flops[give]
            ]
            for trade, _ in sorted(trades, key=lambda t: -t[1]):
                mix = {kind: counts[kind] + trade.get(kind, 0) for kind in kinds}
                if tuple(mix.values()) in tried:
                    continue
                tried.add(tuple(mix.values()))
                plan = self.remade(base, tuple(sorted(c.index for kind, n in mix.items() for c in kinds[kind][:n])))
                if _fits(plan, budget_bytes) and plan.recompute_flops < found.recompute_flops:
                    found, counts = plan, mix
                    break
            else:
                break
        return found

    def _costly_calls(self, plan: Plan) -> list[CostlyCall]:
        with step_model(self.module(plan), self.inputs, fake=self.fake) as (module, inputs):
            return costly_calls(lambda: module(*inputs))

    def _costly_worth(self, plan: Plan, calls: list[CostlyCall]) -> dict[tuple, float]:
        """Peak bytes saved per recomputed FLOP when every call of a kind (:attr:`CostlyCall.kind`)
        among ``plan``'s costly ``calls`` is remade, for the :data:`MAX_COSTLY_KINDS` kinds with
        the most output bytes (one simulated step each). A kind whose outputs are never saved
        for backward, or whose remake keeps its larger inputs alive, saves nothing."""
        kinds = _by_kind(calls)
        largest = sorted(kinds, key=lambda kind: -sum(c.output_bytes for c in kinds[kind]))[:MAX_COSTLY_KINDS]
        plain = self.remade(plan)
        if plain is None:
            return {}
        worth = {}
        for kind in largest:
            remade = self.remade(plan, tuple(c.index for c in kinds[kind]))
            if remade is not None and remade.recompute_flops > plain.recompute_flops:
                saved = plain.predicted_peak_bytes - remade.predicted_peak_bytes
                worth[kind] = saved / (remade.recompute_flops - plain.recompute_flops)
        return worth

    def _on_plain_chain(self, solution: ChainSolution | None, budget_bytes: int | None) -> ChainSolution | None:
        """``solution``, or a plan on the chain cut only at single tensors that does
        better: nested checkpoints (a lower peak, or less recompute within the budget;
        they recompute at most one forward, plans without recompute less), or stored
        and selective segments (a lower peak, or less recompute within the budget).
        Ties keep ``solution``."""
        # The single-tensor cuts are the carried chain's boundaries that nothing live crosses.
        cuts = [0, *single_tensor_boundaries(self.chain), self.chain.n]
        if len(cuts) > MAX_NESTED_STAGES:
            return solution
        # Profiling the plain chain is only worth it if none of its stages (between two
        # cuts) retains, for its own backward, more than the peak to beat.
        to_beat = solution.peak_bytes if budget_bytes is None else budget_bytes
        if self.chain.base_bytes + largest_retained(self.planned(self.chain), cuts) >= to_beat:
            return solution
        chain = self.planned(self.plain().chain)
        if chain.n > MAX_NESTED_STAGES:
            return solution
        forward = int(chain.fwd_flops[:-1].sum())
        richer = self.planned(self.plain().selective_chain())
        if budget_bytes is None:
            nested = min_peak_nested(chain, max_recompute_flops=forward)
            stored = min_peak(richer, store=True)
        else:
            nested = min_recompute_nested(chain, budget_bytes)
            stored = min_recompute(richer, budget_bytes, store=True)
        candidates = [
            solution,
            nested if nested is not None and nested.inner and nested.recompute_flops <= forward else None,
            stored if stored is not None and (stored.stored or stored.selective) else None,
        ]
        if budget_bytes is None:
            return min((c for c in candidates if c is not None), key=lambda c: (c.peak_bytes, c.recompute_flops))
        return min((c for c in candidates if c is not None), key=lambda c: c.recompute_flops, default=None)


def _module(model: nn.Module, captured: Captured, groups: list[list[int]], plan: Plan) -> RematModule:
    """``model`` run with ``plan`` on ``captured``, cut into chain stages by ``groups``."""
    return RematModule(
        model,
        captured,
        segment_starts(groups, plan.checkpoints),
        plan,
        CheckpointOffload() if plan.offload else None,
        nested_starts(groups, plan.inner),
        stored_starts(groups, plan.stored),
        frozenset(groups[i - 1][0] for i in plan.selective),
        tuple(group[0] for group in groups),
        remake=plan.remake,
        remade_costly=plan.remade_costly,
    )


def _capture_and_profile(
    model: nn.Module, inputs: tuple, loss_fn, profile: Profile, carried: bool
) -> tuple[Captured, Chain, list[list[int]], Profile]:
    """Capture and profile ``model``; also returns the profile mode used.

    ``carried``: cut inside blocks too (several tensors live across a cut).
    Offloaded plans use single-tensor cuts only: the offload cost model moves
    each segment's one input tensor to the host.
    """
    captured = capture(model, inputs, carried=carried)
    if captured.opaque:
        # Untraced code may branch on values, which fake tensors do not have: measure
        # on the real ones; the plan is exact for the branches the example inputs take.
        profile = "device"
    try:
        chain, groups, _ = _profile(model, captured, inputs, loss_fn, profile)
    except BackwardSkipsStage:
        # A branch the loss ignores: cut only where a single tensor is live,
        # so that branch stays inside a stage whose profile sees it.
        captured = capture(model, inputs, carried=False)
        chain, groups, _ = _profile(model, captured, inputs, loss_fn, profile)
    return captured, chain, groups, profile


def _profile_and_solve(
    model,
    example_inputs,
    loss_fn,
    budget,
    profile: Profile = "fake",
    offload: bool = False,
    costs: Costs = "flops",
    grad_accumulation: bool = False,
    remake: bool = True,
) -> tuple[_Profiled, Plan]:
    """The model captured and profiled, and the plan solved on it."""
    budget_bytes = None if budget is None else parse_bytes(budget)
    offload = offload and _offload_possible(model, as_tuple(example_inputs))
    profiled = _Profiled.of(
        model, example_inputs, loss_fn, profile, carried=not offload, grad_accumulation=grad_accumulation
    )
    return profiled, profiled.solve(budget_bytes, offload, costs, remake)


def pareto(
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    remake: bool = True,
) -> list[Plan]:
    """Every plan worth having, from the lowest peak that recomputes nothing to the least peak.

    Each plan recomputes the least possible for its peak, and each has a
    lower peak than the one before it (and recomputes more). Plans with
    stored or selective segments are among them (see :class:`Plan`): the
    first plan stores everything, or runs stages selectively where that
    lowers the peak at no recompute FLOPs; with ``remake``, so are the
    front's plans run with cheap values remade in backward (see :func:`plan`),
    one simulated step each.

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
    profiled = _Profiled.of(model, example_inputs, loss_fn)
    start = time.perf_counter()
    front = profiled.front()
    seconds = (time.perf_counter() - start) / len(front)  # the whole front's solve time, shared out
    plans = [profiled.plan(solution, seconds, None) for solution in front]
    if remake:
        remade = [r for r in map(profiled.remade, plans) if r is not None]
        plans = _lower_envelope(plans + remade, lambda p: p.predicted_peak_bytes)
    return plans


def _by_kind(calls: list[CostlyCall]) -> dict[tuple, list[CostlyCall]]:
    """``calls`` grouped by :attr:`CostlyCall.kind`, each group in forward order."""
    kinds: dict[tuple, list[CostlyCall]] = {}
    for call in calls:
        kinds.setdefault(call.kind, []).append(call)
    return kinds


def _fits(plan: Plan | None, budget_bytes: int) -> bool:
    return plan is not None and plan.predicted_peak_bytes <= budget_bytes


def _least_fitting(
    candidate: Callable[[int], Plan | None], low: int, high: int, budget_bytes: int
) -> tuple[int, Plan] | None:
    """The least ``i`` in ``[low, high)`` whose plan ``candidate(i)`` fits the budget, with that
    plan, found by bisection (the peaks fall as ``i`` grows); or None."""
    best = None
    while low < high:
        middle = (low + high) // 2
        plan = candidate(middle)
        if _fits(plan, budget_bytes):
            best, high = (middle, plan), middle
        else:
            low = middle + 1
    return best


def _lower_envelope(items: list, peak: Callable[[Any], int]) -> list:
    """The plans (or chain solutions) no other beats on both ``peak`` and recompute, by peak descending."""
    front: list = []
    for item in sorted(items, key=lambda x: (x.recompute_flops, peak(x))):
        if not front or peak(item) < peak(front[-1]):
            front.append(item)
    return front


def max_batch(
    model: str | nn.Module,
    budget: int | str,
    *,
    make_inputs: Callable[[int], Any] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    limit: int = 1 << 16,
) -> tuple[int, Plan]:
    """The largest batch size whose best plan fits ``budget``, and that plan.

    Args:
        model: a model spec (``"torchvision:resnet50"``, see
            :mod:`remat.models`) or a module, with ``make_inputs``.
        budget: the step's peak limit, bytes or a string like ``"8GiB"``.
        make_inputs: batch size -> example inputs (needed for a module).
        limit: the largest batch size tried.

    Example:
        >>> import remat
        >>> batch, p = remat.max_batch("remat:mlp?depth=4&width=64", "1MiB")
        >>> batch > 1 and p.predicted_peak_bytes <= 2**20
        True
    """
    budget_bytes = parse_bytes(budget)
    if isinstance(model, str):
        from remat import models

        source = models.load(model)
        model, make_inputs = source.model, source.make_inputs
    if make_inputs is None:
        raise TypeError("max_batch needs make_inputs=lambda batch: example_inputs for a module")

    def best(batch: int) -> Plan | None:
        try:
            return _Profiled.of(model, make_inputs(batch), loss_fn).solve(budget_bytes)
        except InfeasibleBudget:
            return None

    fitting = best(1)
    if fitting is None:
        least = plan(model, make_inputs(1), loss_fn).predicted_peak_bytes
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
) -> RematModule:
    """A drop-in module that trains ``model`` with the least-peak checkpoints.

    The returned module shares the model's parameters and buffers (nothing is
    copied; ``state_dict()`` keys and values are the model's), computes the
    same loss and gradients, and updates BatchNorm statistics once per step.
    Its ``.plan`` says what it keeps and what that costs.

    Args:
        plan: a plan made earlier (``Plan.load(path)``) for the same model and
            input size; skips the search.
        profile: ``"fake"`` or ``"device"``, as in :func:`plan`.
        offload: keep the checkpoints in pinned host memory, as in
            :func:`plan` (with ``plan=``, the plan's own setting is used).
        costs: ``"flops"`` or ``"profile"`` (time the stages), as in :func:`plan`.
        grad_accumulation: plan for gradients that exist all step, as in :func:`plan`.
        remake: plans may remake cheap values in backward, as in :func:`plan`.

    Example:
        >>> import torch, remat
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
        >>> x = torch.randn(256, 64)
        >>> fast = remat.optimize(net, x)
        >>> torch.equal(fast(x), net(x))
        True
    """
    inputs = as_tuple(example_inputs)
    if plan is not None:
        check_model_and_inputs(model, inputs)
        if plan.fingerprint != fingerprint(model, inputs):
            raise ValueError(
                "this plan was made for another model or input size (fingerprint mismatch); "
                "call remat.optimize without plan= to make a new one"
            )
        single = plan.offload or plan.inner or plan.stored or plan.selective
        captured, chain, groups, _ = _capture_and_profile(
            model, inputs, loss_fn or default_loss, profile, carried=not single
        )
        if chain.names != plan.stage_names and not single:  # made on the chain cut at single tensors
            captured, chain, groups, _ = _capture_and_profile(
                model, inputs, loss_fn or default_loss, profile, carried=False
            )
        if chain.names != plan.stage_names:
            raise ValueError(
                "this plan's stages are not the ones the model is cut into here (another remat version?): "
                "call remat.optimize without plan= to make a new one"
            )
        return _module(model, captured, groups, plan)
    profiled, chosen = _profile_and_solve(
        model, inputs, loss_fn, budget, profile, offload, costs, grad_accumulation, remake
    )
    return profiled.module(chosen)

