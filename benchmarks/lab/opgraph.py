"""Training steps of small operator graphs: schedules, their exact cost, and the chain they reduce to.

This is the ground on which :mod:`lab.ilp` (an exact integer
program) and :mod:`remat.solvers.checkpoints` (remat's fast solvers) are compared.

The model
---------
An :class:`OpGraph` has forward ops ``0..n-1`` in topological order; op
``n-1`` is the loss. Op ``v`` reads the outputs of ``inputs[v]`` (an op with
no inputs reads the graph input, which lives all step in ``base_bytes``),
writes one value ``x_v`` of ``out_bytes[v]`` bytes and costs ``flops[v]``.
Its backward op ``B_v`` needs the values ``saves_inputs[v]`` (a subset of its
inputs) and, if ``saves_output[v]``, ``x_v`` itself.

A :class:`Schedule` is a list of steps, each running one op (a forward op, as
often as the plan likes, or a backward op, each exactly once in the order
``B_{n-1}, ..., B_0``) and then releasing the forward values it names. Bytes
in memory at a step are

* ``base_bytes`` (parameters and the graph input);
* every forward value computed and not yet released (the loss is never
  released: the caller holds it through the backward);
* gradients in flight: the loss's gradient (the root, allocated when the
  backward starts and held to its end), one buffer per value ``x_u`` from the
  backward of its last consumer (later consumers' gradients are added into it
  in place) until ``B_u`` has run, and every parameter gradient made so far;
* what the step allocates: ``out_bytes[v]`` for a forward op; for ``B_v``, the
  gradient buffers it starts and ``param_grad_bytes[v]``.

The peak is the largest of these sums; recompute FLOPs are the FLOPs of all
forward steps beyond one run of each op. :func:`simulate` evaluates any
schedule this way and checks that it is valid: every input present when an op
runs, every saved value present when its backward runs.

Reduction to a chain
--------------------
:func:`linear_cuts` finds the ops after which exactly one computed value is
live (the same rule as :func:`remat.capture.graph.split_linear`);
:func:`to_chain` groups the ops between cuts into stages and derives the
:class:`~remat.chain.Chain` arrays from the ops, as profiling does on
real operators: inside a stage, values are freed after their last use unless
saved; the stage input is held until the stage returns. :func:`chain_schedule`
writes out the schedule remat's executor runs for a chain plan (PyTorch
semantics: a recomputed segment's input is held by the checkpoint until the
segment's backward is done, its first forward saves nothing, its recompute
runs just before the backward of its last op). ``peak_of`` on the chain equals
:func:`simulate` on that schedule, which the tests check.

Example:
    >>> from remat.chain.cost import peak_of
    >>> from remat.solvers.checkpoints import min_peak
    >>> from lab.opgraph import OpGraph, chain_schedule, simulate, to_chain
    >>> graph = OpGraph.random_dag(20, seed=0)
    >>> chain = to_chain(graph)
    >>> plan = min_peak(chain).checkpoints
    >>> simulate(graph, chain_schedule(graph, plan)).peak_bytes == peak_of(chain, plan)
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

import numpy as np

from remat.chain.model import Chain

__all__ = [
    "OpGraph", "Step", "Schedule", "Cost", "ValuePlan", "simulate", "gradient_profile", "schedule_of_steps",
    "release_after_last_use",
    "linear_cuts", "stages", "stage_forward_peak", "stage_backward_peak", "to_chain", "chain_schedule",
]

KiB = 1024


@dataclasses.dataclass(frozen=True)
class OpGraph:
    """Forward ops of a training step, in topological order; the last is the loss.

    Attributes (one entry per op):
        out_bytes: bytes of the op's output value.
        flops: cost of one forward run.
        inputs: earlier ops whose outputs it reads (none: the graph input).
        saves_inputs: the inputs its backward needs (kept for backward).
        saves_output: whether its backward needs its own output.
        grad_bytes: bytes of the gradient of its output.
        param_grad_bytes: bytes of the parameter gradients its backward makes.
        base_bytes: bytes live all step (parameters, the graph input).
    """

    out_bytes: tuple[int, ...]
    flops: tuple[int, ...]
    inputs: tuple[tuple[int, ...], ...]
    saves_inputs: tuple[tuple[int, ...], ...]
    saves_output: tuple[bool, ...]
    grad_bytes: tuple[int, ...]
    param_grad_bytes: tuple[int, ...]
    base_bytes: int = 0

    def __post_init__(self) -> None:
        n = len(self.out_bytes)
        if n < 1:
            raise ValueError("an op graph needs at least one op (the loss)")
        for field in ("flops", "inputs", "saves_inputs", "saves_output", "grad_bytes", "param_grad_bytes"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"OpGraph.{field} has {len(getattr(self, field))} entries, expected {n}")
        used = set()
        for v, ins in enumerate(self.inputs):
            if any(not 0 <= u < v for u in ins) or len(set(ins)) != len(ins):
                raise ValueError(f"op {v} reads {list(ins)}: inputs must be distinct earlier ops")
            if not set(self.saves_inputs[v]) <= set(ins):
                raise ValueError(f"op {v} saves {list(self.saves_inputs[v])}, which are not all its inputs")
            used.update(ins)
        unused = sorted(set(range(n - 1)) - used)
        if unused:
            raise ValueError(f"ops {unused} feed nothing: every op but the loss (the last) needs a consumer")

    @property
    def n(self) -> int:
        return len(self.out_bytes)

    @property
    def last_consumer(self) -> tuple[int, ...]:
        """For each op, the last op that reads it (the loss: itself)."""
        last = list(range(self.n))
        for v, ins in enumerate(self.inputs):
            for u in ins:
                last[u] = max(last[u], v)
        return tuple(last)

    def saved_by(self, v: int) -> tuple[int, ...]:
        """The forward values ``B_v`` needs."""
        return tuple(self.saves_inputs[v]) + ((v,) if self.saves_output[v] else ())

    @classmethod
    def random_chain(cls, n: int, seed: int = 0) -> OpGraph:
        """``n`` ops, each reading the one before; sizes and saved values vary per op.

        Example:
            >>> OpGraph.random_chain(5, seed=1).inputs
            ((), (0,), (1,), (2,), (3,))
        """
        inputs = [()] + [(v - 1,) for v in range(1, n)]
        return cls._random(inputs, np.random.default_rng(seed))

    @classmethod
    def random_dag(cls, n: int, seed: int = 0) -> OpGraph:
        """About ``n`` ops in blocks: plain ops, residual blocks and two-branch blocks.

        A residual block reads its input ``x`` and ends with an op reading ``x``
        and its body's output; a two-branch block runs two short paths from
        ``x`` and joins them. Only the values between blocks are cut points.

        Example:
            >>> graph = OpGraph.random_dag(16, seed=2)
            >>> graph.n <= 16 and len(linear_cuts(graph)) >= 1
            True
        """
        rng = np.random.default_rng(seed)
        inputs: list[tuple[int, ...]] = [()]
        while len(inputs) < n - 1:
            x, room = len(inputs) - 1, n - 1 - len(inputs)
            kind = rng.integers(0, 3)
            if kind == 1 and room >= 2:  # residual: x -> body -> join(x, body)
                body = int(rng.integers(1, min(4, room - 1) + 1))
                for k in range(body):
                    inputs.append((x if k == 0 else len(inputs) - 1,))
                inputs.append((len(inputs) - 1, x))
            elif kind == 2 and room >= 3:  # two branches from x, joined
                left = int(rng.integers(1, min(3, room - 2) + 1))
                right = int(rng.integers(1, min(3, room - 1 - left) + 1))
                ends = []
                for length in (left, right):
                    for k in range(length):
                        inputs.append((x if k == 0 else len(inputs) - 1,))
                    ends.append(len(inputs) - 1)
                inputs.append(tuple(ends))
            else:
                inputs.append((x,))
        inputs.append((len(inputs) - 1,))  # the loss
        return cls._random(inputs, rng)

    @classmethod
    def _random(cls, inputs: list[tuple[int, ...]], rng: np.random.Generator) -> OpGraph:
        n = len(inputs)
        out = rng.choice([1, 2, 4, 8, 16, 32], size=n) * KiB * rng.integers(1, 4, size=n)
        out[-1] = 4  # the loss is a scalar
        grad = out.copy()
        # kinds of backward: 0 nothing, 1 all inputs, 2 output, 3 inputs and output, 4 first input
        kind = rng.integers(0, 5, size=n)
        saves_inputs = tuple(
            tuple(ins) if k in (1, 3) else tuple(ins[:1]) if k == 4 else () for ins, k in zip(inputs, kind)
        )
        saves_output = tuple(bool(k in (2, 3)) for k in kind)
        params = rng.integers(0, 3, size=n) * KiB
        params[-1] = 0
        flops = out * rng.integers(1, 50, size=n)
        return cls(
            out_bytes=tuple(int(b) for b in out),
            flops=tuple(int(f) for f in flops),
            inputs=tuple(tuple(ins) for ins in inputs),
            saves_inputs=saves_inputs,
            saves_output=saves_output,
            grad_bytes=tuple(int(g) for g in grad),
            param_grad_bytes=tuple(int(p) for p in params),
            base_bytes=int(rng.integers(1, 9)) * KiB,
        )


@dataclasses.dataclass(frozen=True)
class Step:
    """Run ``op`` (its backward if ``backward``), then release the forward values in ``free``."""

    op: int
    backward: bool = False
    free: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Schedule:
    steps: tuple[Step, ...]


@dataclasses.dataclass(frozen=True)
class Cost:
    """What a schedule costs: its peak (``base_bytes`` included) and its recomputed FLOPs."""

    peak_bytes: int
    recompute_flops: int


@dataclasses.dataclass(frozen=True)
class ValuePlan:
    """A schedule of an op graph and what it costs under :func:`simulate`."""

    peak_bytes: int
    recompute_flops: int
    schedule: Schedule


def simulate(graph: OpGraph, schedule: Schedule) -> Cost:
    """Run ``schedule`` step by step under the memory model of the module docstring.

    Raises ``ValueError`` naming the first step that reads a missing value,
    runs backward ops out of order, or releases a value it may not.

    Example:
        >>> graph = OpGraph.random_chain(3, seed=0)
        >>> store_all = chain_schedule(graph, ())
        >>> simulate(graph, store_all).recompute_flops
        0
    """
    loss = graph.n - 1
    present: set[int] = set()
    buffers: dict[int, int] = {}  # op -> bytes of the gradient buffer of its output
    held = graph.base_bytes  # base + root gradient + parameter gradients
    peak = flops = 0
    next_backward = loss
    for index, step in enumerate(schedule.steps):
        v = step.op
        where = f"step {index} ({'B' if step.backward else 'F'}{v})"
        if not 0 <= v < graph.n:
            raise ValueError(f"{where}: no op {v} in a graph of {graph.n} ops")
        if not step.backward:
            missing = [u for u in graph.inputs[v] if u not in present]
            if missing:
                raise ValueError(f"{where}: inputs {missing} are not in memory")
            if v in present:
                raise ValueError(f"{where}: op {v}'s output is already in memory")
            allocated = graph.out_bytes[v]
            flops += graph.flops[v]
        else:
            if v != next_backward:
                raise ValueError(f"{where}: backward ops run once each from B{loss} down; expected B{next_backward}")
            missing = [u for u in graph.saved_by(v) if u not in present]
            if missing:
                raise ValueError(f"{where}: saved values {missing} are not in memory")
            if v == loss:
                if loss not in present:
                    raise ValueError(f"{where}: the backward starts before the loss is computed")
                held += graph.grad_bytes[loss]  # the root gradient, made when the backward starts
            started = [u for u in graph.inputs[v] if u not in buffers]
            allocated = graph.param_grad_bytes[v] + sum(graph.grad_bytes[u] for u in started)
        live = held + sum(graph.out_bytes[u] for u in present) + sum(buffers.values())
        peak = max(peak, live + allocated)
        if step.backward:
            held += graph.param_grad_bytes[v]
            buffers.update((u, graph.grad_bytes[u]) for u in started)
            buffers.pop(v, None)
            next_backward -= 1
        else:
            present.add(v)
        for u in step.free:
            if u not in present:
                raise ValueError(f"{where}: releases {u}, which is not in memory")
            if u == loss:
                raise ValueError(f"{where}: releases the loss, which the caller holds to the end")
            present.remove(u)
    if next_backward != -1:
        raise ValueError(f"the schedule stops before B{next_backward}: every backward op must run")
    return Cost(peak, flops - sum(graph.flops))


def gradient_profile(graph: OpGraph) -> tuple[list[int], list[int]]:
    """Gradient bytes live before each backward op, and what that op allocates.

    Indexed like the stages of :mod:`lab.ilp`: entry ``n + k`` is for
    ``B_{n-1-k}`` (the loss's gradient included), entries below ``n`` are 0.
    """
    n = graph.n
    last = graph.last_consumer
    before, step = [0] * (2 * n), [0] * (2 * n)
    params_done = 0
    for k in range(n):
        b = n - 1 - k
        buffers = sum(graph.grad_bytes[u] for u in range(b + 1) if u != n - 1 and last[u] > b)
        before[n + k] = graph.grad_bytes[n - 1] + params_done + buffers
        step[n + k] = graph.param_grad_bytes[b] + sum(graph.grad_bytes[u] for u in graph.inputs[b] if last[u] == b)
        params_done += graph.param_grad_bytes[b]
    return before, step


# -- reduction to a chain -------------------------------------------------------


def linear_cuts(graph: OpGraph) -> list[int]:
    """Ops ``c < n-1`` after which ``x_c`` is the only computed value still to be read."""
    last = graph.last_consumer
    cuts, live = [], set()
    for c in range(graph.n - 1):
        live = {u for u in live | {c} if last[u] > c}
        if live == {c}:
            cuts.append(c)
    return cuts


def stages(graph: OpGraph) -> list[range]:
    """The ops between two :func:`linear_cuts` (one value crosses each cut), in order."""
    bounds = [-1, *linear_cuts(graph), graph.n - 1]
    return [range(lo + 1, hi + 1) for lo, hi in zip(bounds[:-1], bounds[1:])]


def stage_forward_peak(graph: OpGraph, ops: range, kept: Collection[int]) -> int:
    """The most bytes the forward of ``ops`` holds beyond their input: the values still to
    be read or in ``kept``, and the one being made."""
    out, last = graph.out_bytes, graph.last_consumer
    return max(sum(out[u] for u in ops if u < v and (last[u] >= v or u in kept)) + out[v] for v in ops)


def stage_backward_peak(graph: OpGraph, ops: range, freed: Collection[int]) -> int:
    """The most the backward of ``ops`` allocates beyond what is live when it starts: the
    gradients it makes, less the gradients it is done with and the saved values in ``freed``
    after their last reader."""
    last, grad = graph.last_consumer, graph.grad_bytes
    extra = peak = 0
    for v in reversed(ops):
        allocated = graph.param_grad_bytes[v] + sum(grad[u] for u in graph.inputs[v] if last[u] == v)
        peak = max(peak, extra + allocated)
        extra += allocated
        if v != graph.n - 1:  # the root gradient is held to the end
            extra -= grad[v]
        extra -= sum(graph.out_bytes[u] for u in graph.saved_by(v) if u in freed
                     and min(w for w in ops if u in graph.saved_by(w)) == v)
    return peak


def to_chain(graph: OpGraph) -> Chain:
    """The chain of ``graph``'s stages between :func:`linear_cuts`, for remat's solvers.

    Stage ``i`` runs the ops after cut ``i-1`` up to cut ``i``; ``a(i)`` is the
    output of its last op. Per-stage quantities follow the module docstring:
    inside a stage, a value is freed after its last use unless an op saves it.

    Example:
        >>> graph = OpGraph.random_chain(6, seed=0)
        >>> to_chain(graph).n
        6
    """
    out, grad = graph.out_bytes, graph.grad_bytes
    stage_ops = stages(graph)
    rows = []
    for ops in stage_ops:
        source = ops.start - 1  # the op that makes the stage input; -1: the graph input
        saved = {u for v in ops for u in graph.saved_by(v)}
        inner = [u for u in ops if u != ops[-1]]
        # The backward peak is in bytes over what is live when it starts (the stage input
        # is held by whoever made it, the loss by the caller; the output's gradient is there).
        rows.append(dict(
            fwd_nosave_peak=stage_forward_peak(graph, ops, ()),
            fwd_save_peak=stage_forward_peak(graph, ops, saved),
            saved_bytes=sum(out[u] for u in saved if u in inner),
            saves_input=source >= 0 and source in saved,
            saves_output=bool(graph.saves_output[ops[-1]]),
            bwd_peak=stage_backward_peak(graph, ops, set(ops) - {graph.n - 1}),
            param_grad_bytes=sum(graph.param_grad_bytes[v] for v in ops),
            fwd_flops=sum(graph.flops[v] for v in ops),
        ))
    ends = [ops[-1] for ops in stage_ops]
    arrays = {key: [row[key] for row in rows] for key in rows[0]}
    return Chain.from_arrays(
        act_bytes=[0] + [out[c] for c in ends],
        grad_bytes=[0] + [grad[c] for c in ends],
        bwd_flops=[0] * len(stage_ops),
        base_bytes=graph.base_bytes,
        **arrays,
    )


def chain_schedule(
    graph: OpGraph, checkpoints: Sequence[int], stored: Sequence[int] = (), inner: Sequence = ()
) -> Schedule:
    """The schedule remat's executor runs for chain plan ``checkpoints`` on ``graph``.

    ``checkpoints`` index the stages of :func:`to_chain` (1..n-1, as in
    :func:`remat.chain.peak_of`); segments starting at ``stored`` run
    normally, like the last one (``ChainSolution.stored``); ``inner`` nests
    checkpoints in recomputes (``ChainSolution.inner``). Every value is
    released after the last step that refers to it: its readers, the end of
    the stage it is the input of, the backward of an op that saved it, and,
    for a recomputed segment's input, the end of that segment's backward.
    """
    nested = {(l, r): tuple(cs) for l, r, cs in inner}
    stage_ops = stages(graph)
    bounds = [0, *checkpoints, len(stage_ops)]
    if list(bounds) != sorted(set(bounds)):
        raise ValueError(f"checkpoints must be distinct sorted stage indices in 1..{len(stage_ops) - 1}")
    steps: list[tuple[int, bool]] = []
    refs: list[list[int]] = []  # per step, the value instances it refers to
    current: dict[int, int] = {}  # op -> its latest instance
    op_of: list[int] = []  # instance -> op
    saved: dict[int, list[int]] = {}  # op -> instances its backward needs
    hold: dict[int, list[int]] = {}  # op -> instances held until its backward

    def run_forward(first: int, last_stage: int, save: bool) -> None:
        for ops in stage_ops[first:last_stage]:
            for v in ops:
                refs.append([current[u] for u in graph.inputs[v]])
                steps.append((v, False))
                current[v] = len(op_of)
                op_of.append(v)
                refs[-1].append(current[v])
                if save:
                    saved[v] = [current[u] for u in graph.saved_by(v)]
            if ops.start > 0:  # the caller holds the stage input until the stage returns
                refs[-1].append(current[ops.start - 1])

    recompute_at = {}  # last op of a recomputed segment -> (first stage, end stage)

    def run_segments(bounds: Sequence[int]) -> None:
        """Segments between ``bounds``: each but the last without saving, to be recomputed."""
        for l, r in zip(bounds[:-1], bounds[1:]):
            normal = r == bounds[-1] or l in stored
            run_forward(l, r, save=normal)
            if not normal:
                recompute_at[stage_ops[r - 1][-1]] = (l, r)
                if l > 0:  # the checkpoint holds its input until the segment's backward is done
                    hold.setdefault(stage_ops[l].start, []).append(current[stage_ops[l].start - 1])

    run_segments(bounds)
    for v in range(graph.n - 1, -1, -1):
        if v in recompute_at:
            l, r = recompute_at.pop(v)
            run_segments([l, *nested.get((l, r), ()), r])
        refs.append(saved.get(v, []) + hold.get(v, []))
        steps.append((v, True))
    return release_after_last_use(graph, steps, refs, op_of)


def schedule_of_steps(graph: OpGraph, steps: Sequence[tuple[int, bool]]) -> Schedule:
    """The schedule of ``steps`` (op, backward) in which every step reads the latest copy of
    each value it needs and every copy is released after its last reader."""
    latest: dict[int, int] = {}  # op -> its latest copy
    op_of: list[int] = []
    uses: list[list[int]] = []
    for v, backward in steps:
        if backward:
            uses.append([latest[u] for u in graph.saved_by(v)])
        else:
            reads = [latest[u] for u in graph.inputs[v]]
            latest[v] = len(op_of)
            op_of.append(v)
            uses.append(reads + [latest[v]])
    return release_after_last_use(graph, steps, uses, op_of)


def release_after_last_use(
    graph: OpGraph, steps: Sequence[tuple[int, bool]], uses: Sequence[Sequence[int]], op_of: Sequence[int]
) -> Schedule:
    """The schedule of ``steps`` (op, backward) that releases each value instance after its last use.

    ``uses[i]`` are the instances step ``i`` reads, makes or holds on to;
    instance ``k`` is a value of op ``op_of[k]``. The loss is never released.
    """
    last_use = [0] * len(op_of)
    for index, instances in enumerate(uses):
        for k in instances:
            last_use[k] = index
    free: list[list[int]] = [[] for _ in steps]
    for k, index in enumerate(last_use):
        if op_of[k] != graph.n - 1:
            free[index].append(op_of[k])
    return Schedule(tuple(Step(v, backward, tuple(f)) for (v, backward), f in zip(steps, free)))
