"""A model captured as pieces: the traced graph cut where few tensors are live, and what each piece reads."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from remat.capture.graph import Piece, opaque_modules, piece_module, span_module, split_linear, trace
from remat.capture.hoist import hoist_shared_values

__all__ = ["Captured", "capture", "fingerprint", "input_shapes"]


@dataclasses.dataclass
class Captured:
    """A model cut into pieces, ready to profile or run."""

    pieces: list[Piece]
    modules: list[fx.GraphModule]  # one per piece (see piece_module)
    input_names: list[str]
    codegen: Any  # the traced graph's input flattening / output unflattening
    graph: fx.GraphModule  # the traced model the pieces are cut from
    model_tensors: frozenset[str]  # names of the model's parameters and buffers
    opaque: tuple[str, ...] = ()  # submodules that could not be traced, called whole
    reads: list[tuple[int, ...]] = dataclasses.field(default_factory=list)  # earlier pieces each piece reads
    _spans: dict = dataclasses.field(default_factory=dict, repr=False)  # (start, stop) -> span(start, stop)

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

    def span(self, start: int, stop: int) -> tuple[fx.GraphModule, tuple[int, ...]]:
        """Pieces ``start..stop-1`` as one GraphModule (:func:`span_module`, built once), and the
        pieces whose outputs it returns: those read from piece ``stop`` on, and the last."""
        if (start, stop) not in self._spans:
            returned = tuple(p for p in range(start, stop) if self.last_reader[p] >= stop or p == stop - 1)
            outside = [self.pieces[q].output for q in self.outside_reads(start, stop)]
            placeholders = [n for n in self.graph.graph.nodes if n.op == "placeholder"]
            module = span_module(
                self.graph, self.pieces[start:stop], outside, [p - start for p in returned], placeholders,
                self.model_tensors,
            )
            self._spans[start, stop] = module, returned
        return self._spans[start, stop]

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


def capture(model: nn.Module, example_inputs: tuple, *, carried: bool = True, held: bool = True) -> Captured:
    """Trace ``model`` and cut it into a chain of pieces (see :func:`split_linear`)."""
    gm = trace(model, example_inputs)
    hoist_shared_values(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    pieces = split_linear(gm, carried=carried, held=held)
    model_tensors = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    model_tensors |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    modules = [piece_module(gm, p, placeholders, model_tensors) for p in pieces]
    return Captured(
        pieces, modules, [p.target for p in placeholders], gm.graph._codegen, gm, frozenset(model_tensors),
        opaque=opaque_modules(gm),
    )


def fingerprint(model: nn.Module, example_inputs: tuple) -> str:
    """Parameter names/shapes/dtypes and input shapes, hashed."""
    parts = [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in model.state_dict().items()]
    parts += [f"in:{shape}" for shape in input_shapes(example_inputs)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def input_shapes(example_inputs: tuple) -> tuple[str, ...]:
    """Each tensor input's shape and dtype, as text: ``"(8, 128):torch.int64"``."""
    return tuple(f"{tuple(t.shape)}:{t.dtype}" for t in example_inputs if isinstance(t, torch.Tensor))
