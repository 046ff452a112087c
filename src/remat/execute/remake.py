"""Remake cheap values in the backward instead of keeping them: a per-tensor form of selective checkpointing.

Autograd keeps every tensor a backward formula needs. Many of them are the
outputs of operators that count no FLOPs (normalisations, activations, adds,
concatenations, casts up, views) computed from values that are kept anyway,
such as the outputs of convolutions and matmuls. :func:`remake_cheap` records,
while the forward runs, how each such value was made; when autograd saves it,
only that recipe is kept, and the value is made again the moment the backward
unpacks it, then dropped with the backward node that used it.

It is what PyTorch's min-cut partitioner does inside ``torch.compile``, done
in eager mode, value by value: unlike selective checkpointing of a region
(:func:`remat.execute.engine.run_selective`), which remakes a whole region when its
backward starts, nothing is remade before it is needed, and the values a
region reads from outside need not be kept either.

Rules (each one keeps gradients, buffers and random draws those of a plain run):

* Outputs of operators that count FLOPs (:func:`remat.measure.flops.flop_formula`) are
  kept, unless named in ``costly`` (then remaking them recomputes their
  FLOPs), and so are the values recipes read that are not remade themselves.
* Random operators (dropout) are remade with the generator state they drew
  from in the forward, put back afterwards.
* A cheap value is remade only from values no larger than itself (an
  elementwise op, a concatenation, a cast up), so a recipe never keeps alive
  more bytes than the value it replaces; reductions, slices and casts down are
  kept. Parameters do not count (the model holds them anyway): an embedding
  lookup is remade from its indices. A remade costly call's output, or a view
  of it, counts only as what that call's recipe holds (a copy of a third of a
  remade matmul's output holds the matmul's input, not the output). The outputs of costly calls
  named in ``costly`` are remade whatever their size (attention reads more
  than it writes, but its backward keeps what it reads anyway): the planner
  measures whether that pays.
* A recipe is at most ``max_depth`` cheap operators deep, which bounds the
  repeated work when a chain of recipes is unpacked several times. A remade
  costly call starts the count again (it holds what it remade, see below),
  and no chain spans more than ``SPAN_PER_DEPTH * max_depth`` operators.
* In-place operators are recorded as their out-of-place forms; BatchNorm is
  remade with momentum 0, so its running statistics do not move twice.
  Before a tensor that recipes read changes in place, those recipes make
  their values and hold them from then on.

Example:
    >>> import torch
    >>> from remat.execute.remake import remake_cheap
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> x = torch.randn(4, 8)
    >>> with remake_cheap():
    ...     loss = net(x).sum()
    >>> loss.backward()  # the ReLU's output is remade from the first Linear's when needed
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import weakref
from collections.abc import Callable, Collection, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from remat.execute.recompute import RandomState
from remat.measure.flops import flop_formula

__all__ = ["remake_cheap", "costly_calls", "CostlyCall", "DEFAULT_MAX_DEPTH"]

#: Cheap operators a recipe may chain (a value remade from a value remade from ...). Deeper
#: chains keep fewer values but replay more operators: on a transformer, whose residual stream
#: is one long chain of adds, a deeper limit lowers the step peak a little and replays more
#: operators in the step.
DEFAULT_MAX_DEPTH = 64
#: Operators a recipe may chain through remade costly calls, per unit of ``max_depth``: bounds the
#: recursion of one remake (remaking a value may remake a costly call that reads remade values).
SPAN_PER_DEPTH = 8

# Names of the argument that sets how far BatchNorm moves its running statistics.
_MOMENTUM_ARGUMENTS = ("momentum", "exponential_average_factor")


class _Call:
    """One recorded cheap operator call: what to run again, and the outputs it made."""

    __slots__ = (
        "func", "args", "kwargs", "depth", "span", "keeps", "versions", "rng", "results", "pinned", "costly", "held",
        "views_costly", "__weakref__",
    )

    def __init__(
        self, func, args, kwargs, depth: int, span: int, keeps: int, versions: tuple, rng: RandomState | None,
        costly: bool, views_costly: bool,
    ):
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.depth = depth  # cheap operators since the last kept value or remade costly call
        self.span = span  # operators since the last kept value
        self.keeps = keeps  # bytes of the largest tensor its recipe holds (see _Recorder._record)
        self.versions = versions  # (tensor, version) of every kept tensor it reads
        self.rng = rng  # the generator's state before a random operator ran
        self.results: list[tuple[weakref.ref, int] | None] = []
        self.pinned: list[tuple[torch.Tensor, int] | None] | None = None  # outputs held (see pin)
        # A costly call holds what it remade while any recipe that reads it lives (it dies with the
        # last one): each value made from it is then remade from one recompute, not one each.
        self.costly = costly
        self.held: list | None = None
        self.views_costly = views_costly  # it remakes a costly call's output, or a view of one

    def output(self, index: int) -> torch.Tensor:
        """Output ``index``: held, or the living original or last remake if unchanged, else made again."""
        if self.pinned is not None:
            tensor, version = self.pinned[index]
            if tensor._version != version:
                raise RuntimeError(
                    f"remat.remake: the output of {self.func} was changed in place after a value made from it "
                    "was saved for backward, so it cannot be made again; use remake=False (or run the model "
                    "outside remat.remake_cheap)"
                )
            return tensor
        cached = self.results[index]
        if cached is not None:
            tensor = cached[0]()
            if tensor is not None and tensor._version == cached[1]:
                return tensor
        for tensor, version in self.versions:
            if tensor._version != version:
                raise RuntimeError(
                    f"remat.remake: {self.func} reads a tensor that was changed in place without remat seeing "
                    "it, so its output cannot be made again; use remake=False (or run the model outside "
                    "remat.remake_cheap)"
                )
        args, kwargs = _map_arguments(lambda r: r.make(), (_Recipe, _Like), self.args, self.kwargs)
        with self.rng.replayed() if self.rng is not None else contextlib.nullcontext():
            outputs = self.func(*args, **kwargs)
        flat = _flat(outputs)
        self.results = [(weakref.ref(t), t._version) if isinstance(t, torch.Tensor) else None for t in flat]
        if self.costly:
            self.held = flat
        return flat[index]

    def pin(self) -> None:
        """Hold the outputs from now on: a tensor this call reads is about to change in place."""
        if self.pinned is None:
            outputs = [self.output(i) if r is not None else None for i, r in enumerate(self.results)]
            self.pinned = [None if t is None else (t, t._version) for t in outputs]
            self.args = self.kwargs = self.versions = ()  # the inputs are no longer needed


class _Recipe:
    """How to make one tensor again: output ``index`` of a recorded call."""

    __slots__ = ("call", "index", "version")

    def __init__(self, call: _Call, index: int, version: int):
        self.call = call
        self.index = index
        self.version = version  # the tensor's version when it was made

    def make(self) -> torch.Tensor:
        return self.call.output(self.index)


def _flat(outputs: Any) -> list:
    """An operator's outputs as a list (one output, or its tuple)."""
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def _arguments(args: tuple, kwargs: dict) -> list:
    """An operator call's argument values, those inside list arguments too.

    ATen's arguments nest one level at most (``Tensor[]``, ``Tensor?[]``), so this
    does what ``tree_flatten`` does at a fraction of its cost, which every
    recorded call pays.
    """
    values = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)):
            values.extend(value)
        else:
            values.append(value)
    return values


def _map_arguments(fn: Callable, kinds, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """An operator call's arguments with ``fn`` applied to each value of ``kinds`` (one level of
    lists, as in :func:`_arguments`)."""

    def one(value):
        if isinstance(value, kinds):
            return fn(value)
        if isinstance(value, (list, tuple)) and any(isinstance(v, kinds) for v in value):
            return type(value)(fn(v) if isinstance(v, kinds) else v for v in value)
        return value

    return tuple(map(one, args)), {name: one(value) for name, value in kwargs.items()}


class _Operator(NamedTuple):
    """What the recorder needs to know of an operator, read from its schema once."""

    names: tuple[str, ...]  # its arguments' names
    writes: tuple[int, ...]  # positions of the arguments it changes in place
    momentum: int | None  # position of BatchNorm's momentum argument
    returns_alias: bool  # its first result aliases an argument
    costly: bool  # it counts FLOPs
    remakable: bool  # running it again gives the same outputs (not uninitialised memory)
    seeded: bool  # it draws random numbers
    fill: bool  # one of _FILLS
    pure: Any  # its out-of-place form, for an in-place operator


@functools.cache
def _operator(func) -> _Operator:
    schema = func._schema
    names = tuple(a.name for a in schema.arguments)
    name = func.overloadpacket.__name__
    return _Operator(
        names=names,
        writes=tuple(i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write),
        momentum=next((names.index(n) for n in _MOMENTUM_ARGUMENTS if n in names), None),
        returns_alias=bool(schema.returns) and schema.returns[0].alias_info is not None,
        costly=flop_formula(func) is not None,
        remakable=not name.startswith(("empty", "new_empty")),
        seeded=torch.Tag.nondeterministic_seeded in func.tags,
        fill=name in _FILLS,
        pure=_out_of_place(func),
    )


def _bound(func, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``func``'s arguments by name."""
    return dict(zip(_operator(func).names, args)) | kwargs


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def _is_parameter(tensor: torch.Tensor) -> bool:
    """A module's parameter or a view of one."""
    return isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter)


def _out_of_place(func):
    """The out-of-place form of an in-place operator (``aten.relu_`` -> ``aten.relu``), or None."""
    name = func.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    return None if packet is None else getattr(packet, func._overloadname, None)


# In-place operators that overwrite every element and read only their argument's shape: remade
# into a fresh tensor like it (dropout's mask on CPU is ``empty_like(x).bernoulli_(1 - p)``).
_FILLS = frozenset(
    {"bernoulli_", "uniform_", "normal_", "exponential_", "geometric_", "cauchy_", "log_normal_", "random_",
     "fill_", "zero_"}
)


class _Like:
    """A fresh tensor with the shape, strides, dtype and device of one a call overwrote."""

    __slots__ = ("size", "stride", "dtype", "device")

    def __init__(self, tensor: torch.Tensor):
        self.size, self.stride = tensor.shape, tensor.stride()
        self.dtype, self.device = tensor.dtype, tensor.device

    def make(self) -> torch.Tensor:
        return torch.empty_strided(self.size, self.stride, dtype=self.dtype, device=self.device)


class _Replay(NamedTuple):
    """How to run a call again without changing any tensor."""

    func: Any
    args: tuple
    kwargs: dict
    in_place: bool  # changes its first argument and returns it (autograd bumps its version after)
    reads_first: bool  # the first argument's values matter (not for fills)
    statistics: tuple  # BatchNorm's running statistics: changing them changes nothing it remakes


def _replay_form(func, args: tuple, kwargs: dict) -> _Replay | None:
    """How to remake ``func``'s outputs without changing any tensor, or None."""
    operator = _operator(func)
    names, writes, momentum = operator.names, operator.writes, operator.momentum
    if momentum is not None:
        # BatchNorm in training moves its running statistics (``native_batch_norm``'s schema does
        # not say it writes them); with momentum 0 they keep their value.
        if any(not names[i].startswith("running_") for i in writes):
            return None
        if momentum < len(args):
            args = (*args[:momentum], 0.0, *args[momentum + 1 :])
        else:
            kwargs = {**kwargs, names[momentum]: 0.0}
        bound = _bound(func, args, kwargs)
        statistics = tuple(t for name, t in bound.items() if name.startswith("running_") and t is not None)
        return _Replay(func, args, kwargs, False, True, statistics)
    if not writes:
        return _Replay(func, args, kwargs, False, True, ())
    if writes != (0,) or not operator.returns_alias or not args:
        return None
    if operator.fill:
        return _Replay(func, (_Like(args[0]), *args[1:]), kwargs, True, False, ())
    return None if operator.pure is None else _Replay(operator.pure, args, kwargs, True, True, ())


@dataclasses.dataclass(frozen=True)
class CostlyCall:
    """One call of an operator that counts FLOPs, as :func:`costly_calls` lists them."""

    index: int  # its place among the forward's operators that count FLOPs
    name: str
    flops: int
    output_bytes: int
    input_bytes: int  # of its tensor inputs, each storage once

    @property
    def kind(self) -> tuple[str, int, int, int]:
        """Calls of one kind (operator, FLOPs and sizes) are the same layer of repeated blocks."""
        return self.name, self.flops, self.input_bytes, self.output_bytes


class _Recorder(TorchDispatchMode):
    """Records a recipe for every cheap value the forward makes (see the module docstring),
    and for the outputs of the costly calls numbered in ``costly``."""

    def __init__(self, max_depth: int, costly: frozenset[int] = frozenset(), census: list | None = None):
        super().__init__()
        self.max_depth = max_depth
        self.costly = costly
        self.costly_seen = 0  # operators with FLOPs called so far
        self.census = census
        self.recipes = WeakTensorKeyDictionary()
        # Storage -> the calls that read it as a kept tensor, to pin before it changes in place.
        self.readers: dict[int, list[weakref.ref]] = {}

    def recipe_of(self, tensor: torch.Tensor) -> _Recipe | None:
        recipe = self.recipes.get(tensor)
        return recipe if recipe is not None and recipe.version == tensor._version else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operator = _operator(func)
        if operator.writes and self.readers:
            self._pin_readers_of_written(func, args, kwargs)
        costly = operator.costly
        if costly:
            index, self.costly_seen = self.costly_seen, self.costly_seen + 1
        remade = index in self.costly if costly else operator.remakable
        replay = _replay_form(func, args, kwargs) if remade else None
        rng = None
        if replay is not None and operator.seeded:
            device = next((t.device for t in _arguments(args, kwargs) if isinstance(t, torch.Tensor)), None)
            if device is None or device.type not in ("cpu", "cuda"):
                replay = None  # a generator it has no state of
            else:
                rng = RandomState(device)
        outputs = func(*args, **kwargs)
        if replay is not None:
            self._record(replay, rng, outputs)
        if costly and self.census is not None:
            self.census.append(_costly_call(index, func, args, kwargs, outputs))
        return outputs

    def _pin_readers_of_written(self, func, args: tuple, kwargs: dict) -> None:
        """Before ``func`` changes tensors in place, the calls that read them hold their outputs."""
        operator = _operator(func)
        names, bound = operator.names, _bound(func, args, kwargs)
        for i in operator.writes:
            written = bound.get(names[i])
            for tensor in written if isinstance(written, (list, tuple)) else [written]:
                if isinstance(tensor, torch.Tensor):
                    for reader in self.readers.pop(_storage_key(tensor), ()):
                        call = reader()
                        if call is not None:
                            call.pin()

    def _record(self, replay: _Replay, rng: RandomState | None, outputs) -> None:
        func, args, kwargs, in_place = replay.func, replay.args, replay.kwargs, replay.in_place
        flat = _flat(outputs)
        inputs = [t for t in _arguments(args, kwargs) if isinstance(t, torch.Tensor)]
        recipes = [self.recipe_of(t) for t in inputs]
        costly = _operator(func).costly
        # A remade costly call holds its outputs once remade: the cheap chain above it restarts.
        depth = 1 if costly else 1 + max((r.call.depth for r in recipes if r is not None), default=0)
        span = 1 + max((r.call.span for r in recipes if r is not None), default=0)
        strided = all(t.layout == torch.strided for t in [*inputs, *flat] if isinstance(t, torch.Tensor))
        lost = in_place and replay.reads_first and recipes[0] is None
        if depth > self.max_depth or span > SPAN_PER_DEPTH * self.max_depth or lost or not strided:
            # Too deep, the value it changed in place is lost, or sparse: keep the outputs as they are.
            for tensor in flat:
                if isinstance(tensor, torch.Tensor):
                    self.recipes.pop(tensor, None)
            return
        # What the recipe holds, input by input: a kept tensor, or a recipe input's bytes, or less
        # for a remade costly call's output or a view of it (which holds only what the call reads);
        # nothing for a parameter, which the model holds anyway.
        keeps = max(
            (
                0 if _is_parameter(t)
                else min(_storage_bytes(t), r.call.keeps) if r is not None and r.call.views_costly
                else _storage_bytes(t)
                for t, r in zip(inputs, recipes)
            ),
            default=0,
        )
        # Inputs with a recipe are held as recipes; the others (kept values) as tensors.
        held = {id(t): r for t, r in zip(inputs, recipes) if r is not None}
        args, kwargs = _map_arguments(lambda t: held.get(id(t), t), torch.Tensor, args, kwargs)
        unchecked = held.keys() | {id(t) for t in replay.statistics}
        kept = tuple((t, t._version) for t in inputs if id(t) not in unchecked)
        made = {_storage_key(t) for t in flat if isinstance(t, torch.Tensor)}
        views_costly = costly or any(
            r.call.views_costly and _storage_key(t) in made for t, r in zip(inputs, recipes) if r is not None
        )
        call = _Call(func, args, kwargs, depth, span, keeps, kept, rng, costly, views_costly)
        for tensor, _ in kept:
            self.readers.setdefault(_storage_key(tensor), []).append(weakref.ref(call))
        # Autograd bumps the version of a tensor changed in place once this call returns.
        versions = [t._version + in_place if isinstance(t, torch.Tensor) else 0 for t in flat]
        call.results = [(weakref.ref(t), v) if isinstance(t, torch.Tensor) else None for t, v in zip(flat, versions)]
        for index, (tensor, version) in enumerate(zip(flat, versions)):
            if not isinstance(tensor, torch.Tensor):
                continue
            if costly or _storage_bytes(tensor) >= keeps:
                self.recipes[tensor] = _Recipe(call, index, version)
            else:
                self.recipes.pop(tensor, None)


def _costly_call(index: int, func, args: tuple, kwargs: dict, outputs) -> CostlyCall:
    inputs = {_storage_key(t): t for t in _arguments(args, kwargs) if isinstance(t, torch.Tensor)}
    made = [t for t in _flat(outputs) if isinstance(t, torch.Tensor)]
    return CostlyCall(
        index,
        str(func),
        int(flop_formula(func)(*args, **kwargs, out_val=outputs)),
        sum(_storage_bytes(t) for t in made),
        sum(map(_storage_bytes, inputs.values())),
    )


def _unpack(saved: Any) -> torch.Tensor:
    if not isinstance(saved, _Recipe):
        return saved
    # Remaking a chain recurses once per operator, and a chain may be SPAN_PER_DEPTH * max_depth
    # long (512 by default): deeper than Python's default limit allows (GPT-2's residual
    # stream, through remade costly calls). (Inline, not a context manager: every unpack pays.)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + _FRAMES_PER_OPERATOR * saved.call.span)
    try:
        with torch.no_grad(), _autocast_off():
            return saved.make().detach()
    finally:
        sys.setrecursionlimit(limit)


#: Python frames that remaking one operator of a chain takes (make, output, its arguments).
_FRAMES_PER_OPERATOR = 8


def _autocast_off() -> contextlib.AbstractContextManager:
    """Replay operators as recorded: their dtypes were already chosen by autocast in the forward."""
    enabled = [device for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)]
    if not enabled:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for device in enabled:
        stack.enter_context(torch.autocast(device, enabled=False))
    return stack


@contextlib.contextmanager
def remake_cheap(max_depth: int = DEFAULT_MAX_DEPTH, costly: Collection[int] = ()) -> Iterator[None]:
    """Within this block, autograd keeps recipes instead of cheap values (see the module docstring).

    The backward may run outside the block. Gradients are exactly those of a
    plain run; the step's FLOPs are the same (the remade operators count none).

    Args:
        max_depth: the most operators a recipe chains.
        costly: calls of operators that count FLOPs (matmuls, convolutions,
            attention) whose outputs are remade too, by their place among
            such calls in the forward (0 the first; :func:`costly_calls`
            lists them). Each remake recomputes its FLOPs.
    """
    with _remaking(max_depth, frozenset(costly)):
        yield


def costly_calls(run: Callable[[], Any], max_depth: int = DEFAULT_MAX_DEPTH) -> list[CostlyCall]:
    """The calls of operators that count FLOPs while ``run()`` runs under :func:`remake_cheap`.

    Example:
        >>> import torch
        >>> from remat.execute.remake import costly_calls
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        >>> [(c.index, c.name) for c in costly_calls(lambda: net(torch.randn(4, 8)))]
        [(0, 'aten.addmm.default'), (1, 'aten.addmm.default')]
    """
    census: list[CostlyCall] = []
    with _remaking(max_depth, frozenset(), census):
        run()
    return census


@contextlib.contextmanager
def _remaking(max_depth: int, costly: frozenset[int], census: list | None = None) -> Iterator[None]:
    if max_depth < 1:
        raise ValueError(f"max_depth must be at least 1 (a recipe of one operator), got {max_depth}")
    recorder = _Recorder(max_depth, costly, census)

    def pack(tensor: torch.Tensor) -> Any:
        recipe = recorder.recipe_of(tensor)
        return tensor if recipe is None else recipe

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack), recorder:
        yield
