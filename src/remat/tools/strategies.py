"""Checkpointing strategies side by side: the unmodified model, remat's plan and baselines.

A strategy turns a model into the module to train. ``none`` is the model
itself, ``remat`` is :func:`remat.optimize` (the least-peak plan),
``remat@BUDGET`` (e.g. ``remat@1GiB``) the plan predicted fastest whose
step peak fits BUDGET, ``sqrt`` is Chen et al.'s sqrt(n) equal segments and
``per-block`` keeps every piece boundary; the two baselines run on the same capture and executor as ``remat``,
so only the choice of checkpoints differs. ``checkpoint-blocks`` is what users write by hand:
``torch.utils.checkpoint`` around every block of the model (its repeated submodules; Hugging Face
models: their own ``gradient_checkpointing_enable()``), on a copy of the model;
``selective-blocks`` the same with selective checkpointing's usual policy (save the outputs of
matmuls, convolutions and attention, recompute the rest). ``torch-budget`` is PyTorch's own
answer: ``torch.compile`` with the min-cut partitioner (eager compilers, so
every operator runs and is measured) at ``activation_memory_budget`` 1.0,
``torch-budget@0.5`` at that fraction, and ``torch-budget@1GiB`` at the
fraction found with the least recompute whose measured step peak fits 1 GiB
(:class:`TorchBudgetSearch`). :func:`compare` measures them all in one run.

Example:
    >>> import torch
    >>> from remat.tools.strategies import compare
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
    >>> rows = compare(net, torch.randn(256, 64), ["none", "remat"])
    >>> [r.strategy for r in rows], rows[1].peak_bytes <= rows[0].peak_bytes
    (['none', 'remat'], True)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from remat.api import optimize
from remat.planner.profiled import ProfiledModel
from remat.budget import parse_bytes
from remat.execute.engine import segment_starts
from remat.execute.module import RematModule
from remat.measure.step import StepMeasurement, default_loss, measure_step, positional, step_model
from remat.report import format_bytes
from remat.chain.model import Chain, ChainSolution
from remat.solvers.baselines import sqrt_segments, uniform_segments

__all__ = [
    "STRATEGIES",
    "StrategyResult",
    "TorchBudgetModule",
    "TorchBudgetSearch",
    "checkpoint_blocks",
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
    ``solver`` (e.g. :func:`~remat.solvers.baselines.sqrt_segments`) replaces the
    least-peak search.
    """
    profiled = ProfiledModel.of(model, example_inputs, loss_fn)
    start = time.perf_counter()
    solution = solver(profiled.chain)
    solve_seconds = time.perf_counter() - start
    starts = segment_starts(profiled.stage_pieces, solution.checkpoints)
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


#: What selective checkpointing's usual policy saves (torchtitan's, in spirit): the outputs of
#: matmuls, convolutions and attention; everything else in a block is recomputed.
SAVED_BY_POLICY = (
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default, torch.ops.aten.convolution.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
)


def checkpoint_blocks(model: nn.Module, selective: bool = False) -> nn.Module:
    """A copy of ``model`` whose every block runs under ``torch.utils.checkpoint`` (non-reentrant),
    as people checkpoint by hand; Hugging Face models through their own
    ``gradient_checkpointing_enable()``. The model itself is left as it is. With ``selective``,
    selective checkpointing: each block keeps the outputs of the operators of
    :data:`SAVED_BY_POLICY` and recomputes the rest.

    A block is a submodule with children of its own whose class repeats among its siblings
    in a container (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``): ResNet's
    bottlenecks, DenseNet's dense layers, a transformer's layers. Blocks are not looked into.

    Raises:
        ValueError: the model has no such blocks.
    """
    options: dict[str, Any] = {"use_reentrant": False}
    if selective:
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, list(SAVED_BY_POLICY))
    blocks_copy = copy.deepcopy(model)
    if getattr(blocks_copy, "supports_gradient_checkpointing", False):
        blocks_copy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        return blocks_copy
    blocks = [b for r in _repeated(blocks_copy) for b in _innermost(r)] or _blocks(blocks_copy)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to checkpoint")
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward, options)
    return blocks_copy


def _checkpointed(forward: Callable, options: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    # The recompute reads the arguments again: lists the caller appends to later (DenseNet's
    # features) are copied as they are now.
    args = tuple(list(a) if isinstance(a, list) else a for a in args)
    return checkpoint(forward, *args, **options, **kwargs)


def _blocks(module: nn.Module) -> list[nn.Module]:
    found = []
    for child in module.children():
        repeated = _repeated(child)
        found += [b for r in repeated for b in _innermost(r)] if repeated else _blocks(child)
    return found


def _innermost(block: nn.Module) -> list[nn.Module]:
    """A repeated container of repeated blocks (DenseNet's dense blocks, Swin's stages) as its blocks."""
    inner = _repeated(block)
    return [b for r in inner for b in _innermost(r)] if inner else [block]


def _repeated(module: nn.Module) -> list[nn.Module]:
    """The children of a container whose class repeats among them and that have children of their own."""
    if not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return []
    children = list(module.children())
    kinds = [type(m) for m in children]
    return [m for m in children if kinds.count(type(m)) > 1 and any(True for _ in m.children())]


def _checkpoint_blocks(model: nn.Module, inputs: tuple, loss_fn: LossFn | None) -> tuple[nn.Module, float]:
    return checkpoint_blocks(model), 0.0


def _selective_blocks(model: nn.Module, inputs: tuple, loss_fn: LossFn | None) -> tuple[nn.Module, float]:
    return checkpoint_blocks(model, selective=True), 0.0


#: name -> (model, inputs, loss_fn) -> (module to train, solve seconds)
STRATEGIES: dict[str, Callable[[nn.Module, tuple, LossFn | None], tuple[nn.Module, float]]] = {
    "none": _none,
    "sqrt": _sqrt,
    "per-block": _per_block,
    "checkpoint-blocks": _checkpoint_blocks,
    "selective-blocks": _selective_blocks,
    "remat": _remat,
}


# remat@BUDGET: the plan predicted fastest within BUDGET; remat-flops@BUDGET: the least recompute
_BUDGETED = {"remat@": "time", "remat-flops@": "flops"}
_TORCH_BUDGET = "torch-budget"  # torch-budget[@FRACTION|@BYTES]: torch.compile's min-cut partitioner
_CHOICES = (
    f"{', '.join(STRATEGIES)}, {_TORCH_BUDGET}, remat@BUDGET (e.g. remat@1GiB), remat-flops@BUDGET, "
    f"{_TORCH_BUDGET}@FRACTION|BUDGET"
)


def strategy(name: str) -> Callable[[nn.Module, tuple, LossFn | None], tuple[nn.Module, float]]:
    """The strategy called ``name``: one of :data:`STRATEGIES`, ``remat@BUDGET`` (the plan predicted
    fastest within BUDGET), ``remat-flops@BUDGET`` (the least recompute within it), or ``torch-budget[@X]``.

    ``torch-budget`` is :class:`TorchBudgetModule` at PyTorch's default
    ``activation_memory_budget`` (1.0); ``torch-budget@X`` takes X in [0, 1]
    as that fraction and anything else as a step peak in bytes
    (:func:`remat.parse_bytes`), for which :class:`TorchBudgetSearch` tunes the
    fraction (its "solve seconds" are the compile-and-measure trials).

    Raises:
        ValueError: the name is unknown, or its budget is not a size
            (:func:`remat.parse_bytes`) or a fraction in [0, 1].
    """
    prefix = next((p for p in _BUDGETED if name.startswith(p)), None)
    if prefix is not None:
        budget_bytes, objective = parse_bytes(name[len(prefix):]), _BUDGETED[prefix]

        def within_budget(model: nn.Module, inputs: tuple, loss_fn: LossFn | None) -> tuple[nn.Module, float]:
            module = optimize(model, inputs, loss_fn, budget=budget_bytes, objective=objective)
            return module, module.plan.solve_seconds

        return within_budget
    if name == _TORCH_BUDGET:
        return _torch_budget("1.0")
    if name.startswith(_TORCH_BUDGET + "@"):
        return _torch_budget(name[len(_TORCH_BUDGET) + 1:])
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: choose from {_CHOICES}")
    return STRATEGIES[name]


def _torch_budget(text: str) -> Callable[[nn.Module, tuple, LossFn | None], tuple[nn.Module, float]]:
    """The ``torch-budget@text`` strategy: a fraction in [0, 1] as given, or bytes to tune for."""
    try:
        fraction = float(text)
    except ValueError:
        fraction = None
    if fraction is not None and 0.0 <= fraction <= 1.0:
        return lambda model, inputs, loss_fn: (TorchBudgetModule(model, fraction), 0.0)
    try:
        peak_bytes = parse_bytes(text)
    except ValueError:
        raise ValueError(
            f"torch-budget@{text}: give an activation_memory_budget fraction in [0, 1] (e.g. torch-budget@0.5) "
            "or a step peak (e.g. torch-budget@1GiB)"
        ) from None

    def tuned(model: nn.Module, inputs: tuple, loss_fn: LossFn | None) -> tuple[nn.Module, float]:
        start = time.perf_counter()
        search = TorchBudgetSearch(model, inputs, loss_fn)
        found = search.least_recompute_within(peak_bytes)
        if found is None:
            least = min(m.peak_bytes for m in search.trials.values())
            raise ValueError(
                f"torch-budget@{text}: no activation_memory_budget tried gives torch.compile a step peak within "
                f"{format_bytes(peak_bytes)} ({peak_bytes} B); the least it reached is {format_bytes(least)} "
                f"({least} B): raise the budget"
            )
        return TorchBudgetModule(model, found), time.perf_counter() - start

    return tuned


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
        raise ValueError(f"no strategy given: choose from {_CHOICES}")
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
        predicted_time_ratio: for remat's plans, the step time over that of
            ``none`` the plan predicts (``Plan.predicted_slowdown``); None for
            the other strategies.
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
    predicted_time_ratio: float | None = None

    def as_json(self) -> dict[str, Any]:
        """The stable record ``remat bench --json`` writes (see the README)."""
        return {
            "strategy": self.strategy,
            "peak_bytes": self.peak_bytes,
            "activation_peak_bytes": self.activation_peak_bytes,
            "recompute_flops": self.recompute_flops,
            "step_time_ratio": self.step_time_ratio,
            "predicted_time_ratio": self.predicted_time_ratio,
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
    inputs = positional(model, example_inputs)
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
            predicted_time_ratio=getattr(getattr(modules[name][0], "plan", None), "predicted_slowdown", None),
        )
        for name in strategies
    ]


# -- PyTorch's own answer: torch.compile's min-cut partitioner under a memory budget --------


class TorchBudgetModule(nn.Module):
    """``model`` under ``torch.compile`` with PyTorch's min-cut partitioner at ``activation_memory_budget``.

    The backend is ``aot_autograd`` with eager (boxed) compilers: the forward
    and backward graphs the partitioner makes run operator by operator, so
    :func:`remat.measure_step` sees every operator, recomputation included,
    on real or fake tensors. The budget (a fraction of what the partitioner
    would save; 1.0 is PyTorch's default) is in force whenever the model is
    compiled: on its first call and on any recompile.

    Every call checks that compiled code ran: under a dispatch mode that does
    not opt out of compile internals, or past TorchDynamo's recompile limit,
    ``torch.compile`` silently runs the model eagerly, which would measure no
    recomputation at all.

    Example:
        >>> import torch, remat
        >>> from remat.tools.strategies import TorchBudgetModule
        >>> mlp = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
        >>> x = torch.randn(128, 64)
        >>> full, tight = (remat.measure_step(TorchBudgetModule(mlp, b), x, fake=True) for b in (1.0, 0.0))
        >>> tight.peak_bytes < full.peak_bytes, tight.backward_flops > full.backward_flops
        (True, True)
    """

    def __init__(self, model: nn.Module, activation_memory_budget: float = 1.0):
        if not 0.0 <= activation_memory_budget <= 1.0:
            raise ValueError(f"activation_memory_budget must be in [0, 1], got {activation_memory_budget}")
        from functorch.compile import min_cut_rematerialization_partition
        from torch._dynamo.backends.common import aot_autograd

        super().__init__()
        self.model = model
        self.activation_memory_budget = activation_memory_budget
        self.graphs = 0  # forward graphs compiled; more than one per input signature means graph breaks
        self._runs = 0  # compiled forward graphs run
        backend = aot_autograd(
            fw_compiler=self._forward_compiler,
            bw_compiler=_eager_compiler,
            partition_fn=min_cut_rematerialization_partition,
        )
        # In a list, not a submodule: the parameters are the model's, under one name each.
        self._compiled = [torch.compile(model, backend=backend)]

    def _forward_compiler(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
        self.graphs += 1
        run = _eager_compiler(gm, example_inputs)

        def counted(args: list) -> Any:
            self._runs += 1
            return run(args)

        counted._boxed_call = True
        return counted

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        runs = self._runs
        with torch._functorch.config.patch(activation_memory_budget=self.activation_memory_budget):
            output = self._compiled[0](*args, **kwargs)
        if self._runs == runs:
            raise RuntimeError(
                f"torch.compile ran {type(self.model).__name__} eagerly, so the min-cut partitioner planned "
                "nothing: a TorchDispatchMode without ignore_compile_internals() is active, or TorchDynamo hit "
                "its recompile limit (torch._dynamo.reset() clears its caches)"
            )
        return output


def _eager_compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
    """Run an AOTAutograd graph as it is, one operator at a time: the ``aot_eager`` backend's compiler.

    It takes its inputs boxed (in a list it clears), so each input (a saved
    activation, in backward) is freed after its last use, as compiled code
    and eager autograd free them, not when the whole graph returns.
    """
    from torch._dynamo.backends.debugging import boxed_nop

    return boxed_nop(gm, example_inputs)


class TorchBudgetSearch:
    """The ``activation_memory_budget`` with the least recompute within a step peak, found by measuring.

    Each trial compiles ``model`` at one fraction in a :class:`TorchBudgetModule`
    and measures one training step on fake tensors with
    :func:`remat.measure_step`. TorchDynamo's caches are reset before each
    trial, since every trial compiles the same code objects and would soon
    pass its recompile limit; other compiled functions recompile on their next
    call. Trials are kept in ``trials`` (fraction -> measurement, with the
    seconds each took in ``seconds``), so searches for several peaks share them.

    Example:
        >>> import torch
        >>> from remat.tools.strategies import TorchBudgetSearch
        >>> mlp = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
        >>> search = TorchBudgetSearch(mlp, torch.randn(128, 64))
        >>> search.least_recompute_within(search.measure(1.0).peak_bytes)
        1.0
    """

    #: Fractions tried, after 1.0, before bisecting: the step peak is not monotone in the fraction.
    GRID = (0.75, 0.5, 0.25, 0.0)

    def __init__(self, model: nn.Module, example_inputs: Any, loss_fn: LossFn | None = None):
        self.model = model
        self.inputs = positional(model, example_inputs)
        self.loss_fn = loss_fn
        self.trials: dict[float, StepMeasurement] = {}
        self.seconds: dict[float, float] = {}

    def measure(self, fraction: float) -> StepMeasurement:
        """One training step compiled at ``activation_memory_budget=fraction`` (cached)."""
        if fraction not in self.trials:
            torch._dynamo.reset()
            start = time.perf_counter()
            module = TorchBudgetModule(self.model, fraction)
            self.trials[fraction] = measure_step(module, self.inputs, self.loss_fn, fake=True)
            self.seconds[fraction] = time.perf_counter() - start
        return self.trials[fraction]

    def least_recompute_within(self, peak_bytes: int, steps: int = 5, refine: int = 3) -> float | None:
        """The fraction with the least FLOPs, among those tried, whose step peak is at most ``peak_bytes``.

        Tries 1.0, then (if it does not fit) the rest of :attr:`GRID`. If none
        fits, tries up to ``refine`` times the fractions halfway between the
        one with the lowest peak and its neighbours (the peak is not monotone
        in the fraction). Then bisects up to ``steps`` times between the
        largest fraction that fits and the next one tried above it, stopping
        once both ends cost the same FLOPs: the partitioner's knapsack (FLOPs
        as its runtime estimate) recomputes no more under a larger fraction,
        so nothing between them can cost less. None when no fraction tried fits.
        """

        def fits(fraction: float) -> bool:
            return self.measure(fraction).peak_bytes <= peak_bytes

        def flops(fraction: float) -> int:
            measured = self.measure(fraction)
            return measured.forward_flops + measured.backward_flops

        if fits(1.0):
            return 1.0
        for fraction in self.GRID:
            self.measure(fraction)
        for _ in range(refine):
            if any(map(fits, self.trials)):
                break
            tried = sorted(self.trials)
            lowest = tried.index(min(tried, key=lambda f: self.trials[f].peak_bytes))
            closer = [(tried[lowest] + f) / 2 for f in tried[max(lowest - 1, 0):lowest + 2] if f != tried[lowest]]
            for fraction in closer:
                self.measure(fraction)
        feasible = [f for f in self.trials if fits(f)]
        if not feasible:
            return None
        low = max(feasible)
        high = min(f for f in self.trials if f > low)  # 1.0 does not fit: there is one above
        for _ in range(steps):
            if flops(low) <= flops(high):
                break
            middle = (low + high) / 2
            if fits(middle):
                low = middle
            else:
                high = middle
        return min((f for f in self.trials if fits(f)), key=lambda f: (flops(f), self.trials[f].peak_bytes))
