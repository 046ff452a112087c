"""Capture an arbitrary model as a torch.fx graph and split it into a chain.

The graph is cut wherever one new tensor, together with tensors that earlier
cuts already made, carries everything the rest of the model needs from what
came before (besides parameters and the model's own inputs, which stay alive
anyway). ResNet blocks, Inception modules, transformer layers and VGG/MobileNet
layers meet at single-tensor cuts; inside a residual or dense block the
block's input (or earlier features) stays live across the cut. Each piece
between two cuts becomes one stage of a :class:`~remat.chain.Chain`.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from remat.measure.flops import flop_formula

__all__ = [
    "TraceError",
    "Piece",
    "trace",
    "opaque_modules",
    "split_linear",
    "piece_module",
    "fetch_attr",
    "input_only_nodes",
    "structure_key",
]


class TraceError(RuntimeError):
    """The model could not be captured as a graph."""


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def trace(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """The model as a graph: ``torch.fx.symbolic_trace``, else ``torch.export``.

    Symbolic tracing keeps the model's own module calls (and works for any
    input size); models it cannot trace, such as Hugging Face transformers,
    are exported at the example inputs' shapes instead, as ATen operators.
    When neither works, the submodules that symbolic tracing cannot get
    through are kept whole, as opaque calls (a warning names each; see
    :func:`opaque_modules`), if the rest of the model then traces.
    """
    try:
        return fx.symbolic_trace(model)
    except Exception as fx_error:  # fx raises many kinds: fall back to export for all
        try:
            exported = torch.export.export(model, tuple(example_inputs), strict=False)
        except Exception as export_error:
            gm = _trace_around_untraceable(model)
            if gm is not None:
                return gm
            name = type(model).__name__
            if "Cache" in str(export_error):
                raise TraceError(
                    f"could not export {name}: it returns its key/value cache, which torch.export cannot "
                    "flatten; training needs no cache: pass use_cache=False with the inputs (in the batch, "
                    "e.g. {**batch, 'use_cache': False}) and call the optimized module the same way"
                ) from export_error
            raise TraceError(
                f"could not capture {name} as a graph (data-dependent control flow, such as "
                "`if x.sum() > 0:` in forward, cannot be captured): split it into a list of "
                "stages without such control flow and train remat.CheckpointedSequential(stages, "
                f"checkpoints) instead, or move the control flow into a submodule (remat then "
                f"runs that submodule as one opaque stage).\nDetails: torch.fx said "
                f"{type(fx_error).__name__}: {fx_error}\ntorch.export said "
                f"{type(export_error).__name__}: {export_error}"
            ) from export_error
        gm = exported.module()
        _drop_guards(gm)
        return gm


class _OpaqueTracer(fx.Tracer):
    """Symbolic tracing that keeps the given modules (by identity) as leaf calls."""

    def __init__(self, opaque: set[int]):
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self.opaque or super().is_leaf_module(m, module_qualified_name)


def _trace_error(module: nn.Module, opaque: set[int]) -> Exception | None:
    try:
        _OpaqueTracer(opaque).trace(module)
    except Exception as error:  # fx raises many kinds
        return error
    return None


def _untraceable(module: nn.Module, path: str, opaque: set[int]) -> dict[str, Exception]:
    """The smallest submodules of ``module`` (paths from the root) that symbolic
    tracing cannot get through, each added to ``opaque``, with why."""
    error = _trace_error(module, opaque)
    if error is None:
        return {}
    found: dict[str, Exception] = {}
    for name, child in module.named_children():
        found.update(_untraceable(child, f"{path}.{name}" if path else name, opaque))
    if found and _trace_error(module, opaque) is None:
        return found
    if not path:
        return {}  # the root's own forward: nothing sensible to trace
    opaque.add(id(module))  # its own forward is the problem: keep it whole
    return {path: error}


def _trace_around_untraceable(model: nn.Module) -> fx.GraphModule | None:
    """``model`` traced with its untraceable submodules as opaque calls, or ``None``."""
    opaque: set[int] = set()
    found = _untraceable(model, "", opaque)
    if not found or _trace_error(model, opaque) is not None:
        return None
    tracer = _OpaqueTracer(opaque)
    gm = fx.GraphModule(model, tracer.trace(model), type(model).__name__)
    for path, error in found.items():
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "control flow" in reason:
            reason = f"data-dependent control flow: {reason}"
        warnings.warn(
            f"remat: could not trace {type(model).__name__}.{path} ({reason}); it runs as one "
            "opaque stage (never cut or checkpointed inside)",
            stacklevel=4,
        )
    gm.meta["opaque_modules"] = tuple(found)
    return gm


def opaque_modules(gm: fx.GraphModule) -> tuple[str, ...]:
    """Paths of the submodules :func:`trace` kept whole because they could not be traced."""
    return gm.meta.get("opaque_modules", ())


def _drop_guards(gm: fx.GraphModule) -> None:
    """Remove export's input-shape guard module: RematModule checks shapes itself."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()


@dataclasses.dataclass(frozen=True)
class Piece:
    """Nodes ``nodes`` of the graph, reading ``inputs`` and producing ``output``.

    ``inputs`` are outputs of earlier pieces (empty for the first piece,
    which reads the model's inputs): usually the piece just before, and, for
    a cut inside a residual or dense block, also the block's input or earlier
    features, which stay live across the cut.
    """

    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]
    output: fx.Node
    held: bool = False  # the model may return the output, or a view of it (the profile sees which)

    @property
    def name(self) -> str:
        """The module path that produces the piece's output (e.g. ``layer2.1``)."""
        modules = [path for path in map(_module_path, self.nodes) if path]
        if not modules:
            return self.output.name
        first, last = modules[0], modules[-1]
        prefix = _common_prefix(first, last)
        return prefix or (first if first == last else f"{first}..{last}")


def _module_path(node: fx.Node) -> str:
    """The module a node belongs to: its target for a module call, else export's stack."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path.replace("L['self'].", "").replace("L__self__.", "")
    return ""


def _common_prefix(a: str, b: str) -> str:
    parts = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        parts.append(x)
    return ".".join(parts)


def _mutates(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The node an in-place operation writes to, if ``node`` is one."""
    target = node.target
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):  # exported graphs: ATen
        for i, argument in enumerate(target._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                written = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
                if isinstance(written, fx.Node):
                    return written
        return None
    if node.op == "call_function" and (target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace")):
        return first
    if node.op == "call_method" and isinstance(target, str) and target.endswith("_") and not target.endswith("__"):
        return first
    if node.op == "call_module" and getattr(gm.get_submodule(target), "inplace", False):
        return first
    return None


_VIEW_METHODS = {
    "view", "reshape", "view_as", "reshape_as", "transpose", "permute", "flatten", "unflatten",
    "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "t", "T", "split", "chunk",
    "unbind", "select", "diagonal", "as_strided", "movedim", "swapaxes", "unfold", "detach",
    # Conversions that return their input itself when there is nothing to convert
    # (``x.float()`` of a float32 tensor): they may share its storage.
    "float", "double", "half", "bfloat16", "to", "type", "type_as", "contiguous",
}
_RANDOM_NAMES = ("dropout", "rand", "bernoulli", "normal", "multinomial", "poisson", "uniform", "exponential")


def _target_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is_view(node: fx.Node) -> bool:
    """Whether ``node``'s result may share storage with its first input."""
    if isinstance(node.target, torch._ops.OpOverload):
        # A view, or an operator that may return its input itself (``aten.to`` with nothing to do).
        returns = node.target._schema.returns
        aliasing = bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
        return node.target.is_view or aliasing
    return node.target is operator.getitem or _target_name(node).split(".")[-1] in _VIEW_METHODS


def _is_random(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers (recomputing it elsewhere would draw others)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in target.tags
    name = _target_name(node).lower()
    return any(word in name for word in _RANDOM_NAMES) or bool(node.kwargs.get("generator"))


def input_only_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Values computed from the inputs, buffers and constants alone (no parameters).

    Attention masks and position ids are such values: every layer reads them.
    Each piece that needs one recomputes it, so they never block a cut. Not
    such values: random ones (dropout of an input: a recompute would draw
    another mask), and values changed in place after another node read them,
    directly or through a view (``f = x * 0.5; f[:, :4].add_(h)``): a
    recompute would give their value before the change. A value that only its
    own updates read is one (T5's ``buckets += ...``): each piece makes it
    and updates it again.
    """
    return made_without_activations(gm)[0]


def made_without_activations(gm: fx.GraphModule) -> tuple[set[fx.Node], set[fx.Node]]:
    """The input-only values (:func:`input_only_nodes`), and the values made from those and
    parameters that cost no FLOPs (T5's position bias, an embedding of a parameter)."""
    parameters = {name for name, _ in gm.named_parameters()}
    changed: set[fx.Node] = set()
    for n in gm.graph.nodes:
        target = _mutates(n, gm)
        while target is not None and target not in changed:
            changed.add(target)
            base = target.args[0] if target.args and isinstance(target.args[0], fx.Node) else None
            target = base if _is_view(target) else None
    input_only: set[fx.Node] = set()
    derived: set[fx.Node] = set()
    for n in gm.graph.nodes:
        rewritten_only = all(_mutates(user, gm) is n for user in n.users)  # read only by its own updates
        if n.op != "call_function" or (n in changed and not rewritten_only) or _is_random(n):
            continue
        inputs = n.all_input_nodes
        if not all(a.op in ("placeholder", "get_attr") or a in input_only or a in derived for a in inputs):
            continue
        if any((a.op == "get_attr" and a.target in parameters) or a in derived for a in inputs):
            if _is_cheap(n):
                derived.add(n)
        else:
            input_only.add(n)
    # A value changed in place counts only with its updates: an update that reads an
    # activation (an in-place ReLU module on the sum of two inputs) makes an activation.
    dropped = True
    while dropped:
        known = input_only | derived
        dropped = False
        for made in (input_only, derived):
            for n in [n for n in made if n in changed and any(u not in known for u in n.users)]:
                made.discard(n)
                dropped = True
    return input_only, derived


def _is_cheap(node: fx.Node) -> bool:
    """Whether making ``node`` costs no FLOPs: an ATen operator that counts none, or a view."""
    if isinstance(node.target, torch._ops.OpOverload):
        return flop_formula(node.target) is None
    return _is_view(node)


def _output_storages(output: fx.Node) -> set[fx.Node]:
    """The model's outputs and every value they may be views of."""
    held: set[fx.Node] = set()
    todo = list(output.all_input_nodes)
    while todo:
        node = todo.pop()
        if node in held:
            continue
        held.add(node)
        if node.op in ("call_function", "call_method") and _is_view(node):
            todo.extend(a for a in node.args[:1] if isinstance(a, fx.Node))
    return held


def split_linear(
    gm: fx.GraphModule, *, carried: bool = True, held: bool = True, recomputed: set[fx.Node] = frozenset()
) -> list[Piece]:
    """Cut ``gm``'s graph into a chain of pieces.

    A cut after position ``k`` (in graph order) is valid when, of the
    computed values defined at or before ``k`` and used after it (besides
    values computed from the inputs alone, which pieces recompute), exactly
    one is new: every other is the output of an earlier cut (a residual
    block's input, earlier DenseNet features), so a plan that keeps the new
    value keeps what it needs with it. Nothing after ``k`` may write to a
    value live across the cut (a kept tensor must not change). The new value
    may be one of the model's outputs, or viewed by one (an encoder's output,
    which every decoder layer reads): its piece is then ``held``; not with
    ``held=False``. With ``carried=False``, only single-tensor cuts (nothing
    else live) that the caller does not hold. Values in ``recomputed`` are made again by each piece
    that reads them, as input-only values are.
    """
    nodes = list(gm.graph.nodes)
    input_only = input_only_nodes(gm) | recomputed
    held_by_caller = _output_storages(nodes[-1])
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {}
    for n in nodes:
        for user in n.users:
            last_use[n] = max(last_use.get(n, -1), index[user])
    mutated_after: dict[fx.Node, int] = {}
    for n in nodes:
        target = _mutates(n, gm)
        if target is not None:
            mutated_after[target] = max(mutated_after.get(target, -1), index[n])

    def computed(n: fx.Node) -> bool:
        # Parameters (get_attr) and the model's inputs live through the step anyway.
        return n.op not in ("placeholder", "get_attr", "output") and n not in input_only

    def piece_nodes(start: int, stop: int) -> tuple[fx.Node, ...]:
        return tuple(x for x in nodes[start:stop] if computed(x) or x.op in ("get_attr", "output"))

    def reads(members: tuple[fx.Node, ...]) -> tuple[fx.Node, ...]:
        """The earlier pieces' outputs that ``members`` use, in cut order."""
        used = {a for x in members for a in x.all_input_nodes}
        return tuple(sorted(used.intersection(cut_values), key=cut_values.__getitem__))

    pieces: list[Piece] = []
    cut_values: dict[fx.Node, int] = {}  # outputs of the pieces so far -> their order
    cut_storages: set[fx.Node] = set()  # the nodes that made their storages (see _storage_owner)
    last_cut: fx.Node | None = None
    start = 0
    live: set[fx.Node] = set()
    for k, n in enumerate(nodes):
        if computed(n):
            live.add(n)
        live = {v for v in live if last_use.get(v, -1) > k}
        if n.op == "output" or k + 1 >= len(nodes) or nodes[k + 1].op == "output":
            continue
        new = [v for v in live if v not in cut_values]
        if len(new) != 1 or (not carried and len(live) != 1):
            continue
        (value,) = new
        if any(mutated_after.get(v, -1) > k for v in live):
            continue
        returned = value in held_by_caller
        if returned and not (carried and held):
            # The caller holds it (or a view of it) to the end of the step: a single-tensor
            # chain's boundary is not modelled so (see Chain.caller_held).
            continue
        if not _is_tensor_valued(value):
            continue
        members = piece_nodes(start, k + 1)
        owner = _storage_owner(value, gm)
        if owner in cut_storages and not (
            _storage_owner(last_cut, gm) is owner and reads(members) == (last_cut,) and last_cut not in live
        ):
            # A view of an earlier piece's output (or an update to it in place)
            # is a boundary of no bytes of its own: only the piece just before
            # may own the storage or view it, and only if nothing else reads
            # that piece's output (the profile merges them).
            continue
        inputs = reads(members)
        if not inputs and last_cut in live:
            # It reads no earlier piece's output (T5's position bias, made from parameters and
            # inputs): it takes the last one, which later pieces read, unused, so that a
            # recomputed segment starting there holds it, as the chain model has it.
            inputs = (last_cut,)
        pieces.append(Piece(members, inputs, value, returned))
        cut_values[value] = len(cut_values)
        cut_storages.add(owner)
        last_cut = value
        start = k + 1
    members = piece_nodes(start, len(nodes))
    pieces.append(Piece(members, reads(members), nodes[-1]))
    return pieces


def _storage_owner(value: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """The node that made ``value``'s storage: through views and in-place updates."""
    node = value
    while node.op in ("call_function", "call_method", "call_module"):
        base = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if base is None or not (_mutates(node, gm) is base or (node.op != "call_module" and _is_view(node))):
            break
        node = base
    return node


def _is_tensor_valued(node: fx.Node) -> bool:
    """Best effort without shapes: calls that return several values are not."""
    if node.op == "call_function" and node.target in (operator.getitem,):
        return True
    meta = node.meta.get("tensor_meta") or node.meta.get("val")
    if meta is not None:
        return isinstance(meta, torch.Tensor) or hasattr(meta, "shape")
    return True


def fetch_attr(root: nn.Module, target: str):
    """``root.a.b.c`` for target ``"a.b.c"``, looked up when the graph runs."""
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def piece_module(
    gm: fx.GraphModule, piece: Piece, placeholders: Sequence[fx.Node], model_tensors: set[str]
) -> fx.GraphModule:
    """A GraphModule running ``piece``: ``f(boundary, root, *model_inputs)``.

    ``boundary`` is the tuple of the piece's inputs (outputs of earlier pieces).

    Submodules are the original model's (by reference). Parameters and
    buffers of the model (``model_tensors``) read directly (``get_attr``) are
    looked up on ``root`` at run time, so whoever swaps them on the model
    (``torch.func.functional_call``, a fake copy) is seen.
    """
    graph = fx.Graph()
    boundary = graph.placeholder("boundary")
    root = graph.placeholder("root")
    inputs = {p: graph.placeholder(p.name) for p in placeholders}
    env = {value: graph.call_function(operator.getitem, (boundary, i)) for i, value in enumerate(piece.inputs)}
    graph.output(_copy_piece(graph, piece, {**inputs, **env}, root, model_tensors))
    return fx.GraphModule(gm, graph)


def span_module(
    gm: fx.GraphModule,
    pieces: Sequence[Piece],
    outside: Sequence[fx.Node],
    returned: Sequence[int],
    placeholders: Sequence[fx.Node],
    model_tensors: set[str],
) -> fx.GraphModule:
    """Consecutive ``pieces`` as one GraphModule: ``f(boundary, root, *model_inputs)``, one
    Python call where :func:`piece_module`'s modules take one each.

    ``boundary`` is a list of the values ``outside`` (outputs of earlier pieces that these
    read); the module empties it, so that each is freed after the last piece that reads it.
    It returns the tuple of the outputs of ``pieces[i]`` for ``i`` in ``returned``. Memory
    is spent as when the pieces run one by one: a piece's inputs stay alive to its end, and
    each piece makes its own input-only values again.
    """
    graph = fx.Graph()
    boundary = graph.placeholder("boundary")
    root = graph.placeholder("root")
    inputs = {p: graph.placeholder(p.name) for p in placeholders}
    made = {value: graph.call_function(operator.getitem, (boundary, i)) for i, value in enumerate(outside)}
    graph.call_function(_release, (boundary,))
    outputs = []
    for piece in pieces:
        read = {value: made[value] for value in piece.inputs}
        outputs.append(_copy_piece(graph, piece, {**inputs, **read}, root, model_tensors))
        made[piece.output] = outputs[-1]
        graph.call_function(_held, tuple(read.values()))
    graph.output(tuple(outputs[i] for i in returned))
    return fx.GraphModule(gm, graph)


def _release(boundary: list) -> None:
    """Drop the caller's references to a span's inputs: the span's own go after their last use."""
    boundary.clear()


def _held(*values: Any) -> None:
    """Nothing: a use that keeps a piece's inputs alive to its end, as a piece's boundary does."""


def _copy_piece(graph: fx.Graph, piece: Piece, env: dict[fx.Node, Any], root: fx.Node, model_tensors: set[str]) -> Any:
    """``piece``'s nodes copied into ``graph`` (``env``: its inputs and the model's, in ``graph``);
    returns its output in ``graph`` (for the model's last piece, the output's structure)."""

    def value(node: fx.Node) -> fx.Node:
        """``node`` in the new graph: parameters fetched, input-only values recomputed."""
        if node not in env:
            if node.op == "get_attr" and node.target in model_tensors:
                env[node] = graph.call_function(fetch_attr, (root, node.target))
            elif node.op == "get_attr":  # a constant of the graph's own (export lifts some)
                env[node] = graph.node_copy(node)
            else:  # an input-only value made by an earlier piece
                env[node] = graph.node_copy(node, value)
        return env[node]

    for n in piece.nodes:
        if n.op == "output":
            return fx.map_arg(n.args[0], value)
        if n.op == "get_attr":
            value(n)
            continue
        env[n] = graph.node_copy(n, value)
    return value(piece.output)


def _describe_tensor(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        return ("tensor", tuple(t.shape), t.stride(), t.dtype, t.requires_grad)
    return repr(t)


def structure_key(piece: fx.GraphModule, root: nn.Module) -> str:
    """What a piece computes, without the names of the modules and tensors it uses.

    Two pieces with equal keys run the same operators on parameters of the
    same shapes (ResNet blocks of one stage, transformer layers), so their
    memory and FLOPs on equal inputs are equal.
    """
    index: dict[fx.Node, int] = {}
    parts = []
    for i, n in enumerate(piece.graph.nodes):
        index[n] = i
        args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: f"%{index[a]}")
        if n.op == "call_module":
            module = piece.get_submodule(n.target)
            tensors = [*module.parameters(), *module.buffers()]
            what = (type(module).__qualname__, module.extra_repr(), module.training, *map(_describe_tensor, tensors))
        elif n.op == "call_function" and n.target is fetch_attr:
            what, args = _describe_tensor(fetch_attr(root, n.args[1])), ()
        elif n.op == "get_attr":
            what = _describe_tensor(fetch_attr(piece, n.target))
        else:
            what = getattr(n.target, "__qualname__", None) or str(n.target)
        parts.append((n.op, what, args, kwargs))
    return repr(parts)
