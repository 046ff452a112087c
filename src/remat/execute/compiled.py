"""Plans run compiled: the captured graph through AOTAutograd, saving what the plan keeps.

:class:`CompiledModule` is the drop-in that ``remat.optimize(..., compile=...)``
returns. Its forward and backward are two graphs of ATen operators that
AOTAutograd makes from the traced model (no Python per piece, no dispatch
mode, no saved-tensor hook); the backend runs them as generated Python
(``"aot_eager"``) or fused kernels (``"inductor"``).

NOTE [what the plan keeps, as partition tags]
    AOTAutograd traces forward and backward as one joint graph and lets a
    partition function choose which forward values the backward gets. Each
    node of the traced model is tagged with what its piece does in the plan,
    the way ``torch.utils.checkpoint`` tags the nodes of a region, and every
    ATen node traced from it inherits the tag (``recompute``, ``ac_graph_id``):

    - a recomputed segment is one region, MUST_RECOMPUTE, except the values
      read after it (its checkpoint, carried values): those are kept;
    - a selective stage is one region too, and its operators that count FLOPs
      (matmuls, convolutions, attention) lose the tag: they are kept.

    torch's default partitioner then saves the untagged values the backward
    reads, directly or through recomputed ones (the input of a region
    included), recomputes the rest, and orders the backward so that each
    recomputed value is made just before its first use, as the autograd
    engine would reach it; random operators recomputed replay their RNG
    state. So a selective stage remakes each value when it is needed rather
    than all at once, and a recomputed segment stops at the last value its
    backward reads.

NOTE [BatchNorm statistics]
    A recomputed BatchNorm reads the running statistics, which the forward's
    epilogue updates in place afterwards. In training mode the normalised
    output does not depend on them, and the recomputed update is dropped
    (statistics move once per step), so the backward reads them without
    autograd's version check.
"""

from __future__ import annotations

import functools
import hashlib
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import CheckpointPolicy

from remat.execute.engine import in_pieces
from remat.execute.module import DropInModule, module_for_plan
from remat.execute.shapes import input_signature
from remat.measure.flops import flop_formula

__all__ = ["BACKENDS", "CompiledModule", "module_for", "unsupported"]

#: How a compiled plan's graphs run: ATen operators from generated Python, or Inductor's kernels.
BACKENDS = ("aot_eager", "inductor")


def unsupported(plan: Any) -> str | None:
    """What in ``plan`` a compiled module cannot run (None: it can run all of it)."""
    if plan.offload:
        return "offloaded checkpoints"
    if plan.inner:
        return "nested checkpoints"
    if plan.remake:
        return "remade values"
    return None


class CompiledModule(DropInModule):
    """A traced model compiled with a plan; a drop-in for the original.

    Made by ``remat.optimize(..., compile=...)``. Like
    :class:`~remat.execute.module.RematModule` it shares the model's children,
    parameters and buffers (:class:`DropInModule`); a training call runs one
    compiled forward, and the backward recomputes what the plan recomputes
    (NOTE [what the plan keeps, as partition tags]). The graphs are made for
    the example inputs' shapes: other shapes raise (plan and compile again).
    Inductor's kernels hold the tensors the model has when it compiles: move
    the model to its device before, not after.
    """

    def __init__(self, model: nn.Module, captured: Any, plan: Any, example_inputs: tuple, backend: str = "aot_eager"):
        super().__init__(model, captured, plan)
        if backend not in BACKENDS:
            raise ValueError(f"compile backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        missing = unsupported(plan)
        if missing is not None:
            raise ValueError(
                f"a compiled module cannot run this plan's {missing}: plan with compile= (remat.plan, "
                "remat.optimize), which keeps to the plans a compiled module runs"
            )
        if captured.opaque:
            raise ValueError(
                f"a compiled module needs the whole model as one graph, and {', '.join(captured.opaque)} could "
                "not be traced (they run as opaque stages): use compile=False, whose engine runs them as they "
                "are, or make them traceable"
            )
        self.backend = backend
        graph, selective = tagged_graph(captured, plan)
        flat = self.flat_inputs(tuple(example_inputs), {})
        self._signature = input_signature(flat)
        self._autocast = _autocast()
        self._output_spec = graph.meta["output_spec"]
        # A plain function, not a submodule: the model's modules are reached by one path only
        # (a second one would be swapped twice by whoever swaps tensors by name).
        self._compiled = _compile(graph, flat, selective, backend)

    def forward(self, *args, **kwargs):
        if not self.runs_plan():
            return self._model[0](*args, **kwargs)  # nothing to save for backward: the model's own forward
        inputs = self.flat_inputs(args, kwargs)
        if input_signature(inputs) != self._signature:
            raise ValueError(
                f"this module was compiled for inputs {_describe(self._signature)} and got "
                f"{_describe(input_signature(inputs))}: call remat.optimize(..., compile=...) for these inputs"
            )
        if _autocast() != self._autocast:
            raise RuntimeError(
                f"this module was compiled under {_describe_autocast(self._autocast)} and is called under "
                f"{_describe_autocast(_autocast())}: its graphs hold the casts they were traced with; call "
                "remat.optimize(..., compile=...) in the autocast block you train in"
            )
        out = self._compiled(self, inputs)
        return self.structured_output(tree_unflatten(list(out), self._output_spec))

    def extra_repr(self) -> str:
        return f"keeps: {self.plan.kept} (compiled, {self.backend})"


def module_for(model: nn.Module, captured: Any, plan: Any, example_inputs: tuple) -> DropInModule:
    """``model`` run with ``plan`` on ``captured``: compiled with the plan's backend for
    ``example_inputs``' shapes, or on the eager engine."""
    if plan.compiled:
        return CompiledModule(model, captured, plan, example_inputs, plan.compiled)
    return module_for_plan(model, captured, plan)


def tagged_graph(captured: Any, plan: Any) -> tuple[fx.GraphModule, frozenset[int]]:
    """The captured graph, returning a tuple, its nodes tagged with the plan (NOTE [what the plan
    keeps, as partition tags]); and the regions (``ac_graph_id``) that are selective stages."""
    graph = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(captured.graph.graph, copied, return_output_node=False)
    flat_out, spec = tree_flatten(out)  # AOTAutograd takes graphs returning a flat tuple
    graph.output(tuple(flat_out))
    for node in list(graph.nodes):  # torch.export's checks of its example inputs, which the partitioner refuses
        if node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)
    module = fx.GraphModule(captured.graph, graph)
    module.meta["output_spec"] = spec

    pieces = in_pieces(plan.stage_pieces, plan.checkpoints, plan.inner, plan.stored, plan.selective)
    n = len(captured.pieces)
    # Segment starts; the last segment runs normally (empty where the last checkpoint is the
    # model's output: the whole model is then recomputed, and only the loss runs normally).
    starts = sorted({0, *pieces["boundaries"]})
    stage_bounds = [*pieces["stage_starts"], n]
    regions: dict[int, tuple[int, int, int]] = {}  # piece -> (region, first piece, stop) of what it belongs to
    region = 0
    for start, stop in zip(starts[:-1], starts[1:]):
        if start not in pieces["stored"]:  # a recomputed segment
            region += 1
            regions.update({p: (region, start, stop) for p in range(start, stop)})
    selective = set()
    for start, stop in zip(stage_bounds[:-1], stage_bounds[1:]):
        if start in pieces["selective"]:
            region += 1
            selective.add(region)
            regions.update({p: (region, start, stop) for p in range(start, stop)})
    for index, piece in enumerate(captured.pieces):
        if index not in regions:
            continue
        tag, start, stop = regions[index]
        kept = piece.output if captured.last_reader[index] >= stop or index == n - 1 else None
        for node in piece.nodes:
            if node in copied and node is not kept and node.op not in ("placeholder", "get_attr", "output"):
                copied[node].meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
                copied[node].meta["ac_graph_id"] = tag
    return module, frozenset(selective)


def _partition(joint: fx.GraphModule, joint_inputs: Any, *, selective: frozenset[int], **kwargs: Any):
    """The default partition of ``joint`` (forward nodes tagged by :func:`tagged_graph`), with the
    selective stages' operators that count FLOPs kept and BatchNorm's statistics read unchecked."""
    from torch._functorch.partitioners import default_partition, must_recompute

    batch_norm = torch.ops.aten._native_batch_norm_legit_functional.default
    for node in joint.graph.nodes:
        if not must_recompute(node):
            continue
        if node.meta.get("ac_graph_id") in selective and isinstance(node.target, torch._ops.OpOverload):
            if flop_formula(node.target) is not None:
                del node.meta["recompute"], node.meta["ac_graph_id"]
                continue
        if node.target is batch_norm:  # NOTE [BatchNorm statistics]
            for statistic in node.args[3:5]:
                statistic.meta["saved_tensor_with_no_vc_check"] = True
    return default_partition(joint, joint_inputs, **kwargs)


def _compile(graph: fx.GraphModule, example_inputs: Sequence[Any], selective: frozenset[int], backend: str):
    """``graph`` through AOTAutograd with :func:`_partition`: a callable of the module that holds
    the model's tensors and the flat inputs.

    ``aot_eager`` takes the model's tensors as arguments, looked up by name at each call, so one
    compile runs on fake tensors (the planner's simulated step) as on real ones; it is compiled
    here, on fake tensors. Inductor's kernels run real tensors only, the model's as they are now.
    """
    partition = functools.partial(_partition, selective=selective)
    if backend == "inductor":
        return _inductor(graph, example_inputs, partition)
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.utils.stateless import _reparametrize_module

    names = [name for name, _ in (*graph.named_parameters(remove_duplicate=False), *graph.named_buffers(remove_duplicate=False))]

    def run_graph(*flat: Any):
        # Interpreted with node meta kept, so every ATen node carries its fx node's tags.
        with _reparametrize_module(graph, dict(zip(names, flat[: len(names)]))), fx_traceback.preserve_node_meta():
            return fx.Interpreter(graph).run(*flat[len(names) :])

    compiled = aot_function(run_graph, fw_compiler=boxed_nop, partition_fn=partition)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # compiles on its first call
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in (*_tensors(graph, graph, names), *example_inputs)]
        compiled(*fake)

    def call(root: nn.Module, inputs: Sequence[Any]):
        return compiled(*_tensors(root, graph, names), *inputs)

    return call


def _tensors(root: nn.Module, graph: fx.GraphModule, names: Sequence[str]) -> list[torch.Tensor]:
    """The tensors ``names`` on ``root`` (the module holding the model's, swapped for fake ones in a
    simulated step), or the graph's own (constants torch.export lifted)."""
    tensors = []
    for name in names:
        try:
            tensors.append(operator.attrgetter(name)(root))
        except AttributeError:
            tensors.append(operator.attrgetter(name)(graph))
    return tensors


def _inductor(graph: fx.GraphModule, example_inputs: Sequence[Any], partition):
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.custom_graph_pass import CustomPartitionerFn

    class _Partitioner(CustomPartitionerFn):
        def __call__(self, gm, joint_inputs, **kwargs):
            kwargs.pop("compiler", None)  # the min-cut partitioner's; the default one takes none
            return partition(gm, joint_inputs, **kwargs)

        def uuid(self) -> str:  # compiled graphs are cached by the tags, which the joint graph's key leaves out
            tags = [(n.name, str(n.meta.get("recompute")), n.meta.get("ac_graph_id")) for n in graph.graph.nodes]
            return hashlib.sha256(repr((tags, partition.keywords)).encode()).hexdigest()

    with config.patch(custom_partitioner_fn=_Partitioner()):
        compiled = compile_fx(graph, list(example_inputs))
    return lambda root, inputs: compiled(*inputs)


def _autocast() -> tuple:
    """The autocast state the graphs were traced in (their casts are part of them)."""
    return tuple(
        (device, torch.get_autocast_dtype(device)) for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)
    )


def _describe_autocast(state: tuple) -> str:
    return " and ".join(f"autocast({d!r}, {str(t).removeprefix('torch.')})" for d, t in state) or "no autocast"


def _describe(signature: tuple) -> str:
    return ", ".join(
        f"{'x'.join(map(str, s[0])) or 'scalar'} {str(s[1]).removeprefix('torch.')}{' requiring grad' if s[3] else ''}"
        if isinstance(s, tuple)
        else s
        for s in signature
    )
