"""Any traced model run with a plan: the drop-in module :func:`remat.optimize` returns."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch import nn

from remat.execute.engine import SegmentEngine, in_pieces
from remat.execute.offload import CheckpointOffload
from remat.execute.remake import remake_cheap
from remat.measure.step import bind_positional

__all__ = ["DropInModule", "RematModule", "StandIn", "module_for_plan"]


class StandIn(nn.Module):
    """A module in the model's place: it holds the model's own children, parameters and buffers
    under the same names (nothing copied; ``state_dict()`` is the model's, and an optimizer over
    either module's parameters trains both), and keeps the model itself off the module tree
    (``self._model[0]``)."""

    # NOTE [the model's forward signature]
    # Training libraries read a model's forward signature to decide what to pass it: Hugging Face's
    # Trainer keeps the batch columns the signature names, finds the labels in it (on the class),
    # and passes loss keyword arguments where it takes **kwargs. So a stand-in is made an instance
    # of a subclass (one per model class) whose forward has the model's signature.
    # Per-call loss keyword arguments (num_items_in_batch) are not model inputs a plan was made
    # for: this tells Trainer not to pass them; it scales the batch-mean loss itself.
    accepts_loss_kwargs = False

    def __new__(cls, model: nn.Module | None = None, *args, **kwargs):
        if model is None or "_model_class" in cls.__dict__:  # copy, pickle, or already signed
            return super().__new__(cls)
        return super().__new__(_signed(cls, type(model)))

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in model._non_persistent_buffers_set)
        self._model = [model]
        self.training = model.training  # not .train(): the children keep their own flags

    def train(self, mode: bool = True) -> StandIn:
        """Set train/eval mode here, on the model's children, and on the model itself."""
        super().train(mode)
        self._model[0].training = mode
        return self


@functools.cache
def _signed(cls: type, model_class: type) -> type:
    """``cls`` with its forward shown under ``model_class.forward``'s signature
    (NOTE [the model's forward signature])."""

    def forward(self, *args, **kwargs):
        return cls.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(model_class.forward)
    forward.__doc__ = cls.forward.__doc__
    name = f"{cls.__name__}[{model_class.__name__}]"
    return type(name, (cls,), {"forward": forward, "_model_class": model_class, "__module__": cls.__module__})


class DropInModule(StandIn):
    """What every module that runs one plan shares with the model it stands in for.

    Besides the model's tensors (:class:`StandIn`), it binds calls as the model's
    forward does, and in eval mode or without autograd (``torch.no_grad``) calls the
    model's own forward: nothing is saved for backward there, so there is nothing to plan.
    """

    def __init__(self, model: nn.Module, captured: Any, plan: Any = None):
        super().__init__(model)
        self._captured = captured
        self._captured_training = model.training  # the graph is specialised to this mode
        self.forward_signature = inspect.signature(model.forward)  # the model's: batches bind to it
        self.plan = plan

    @property
    def captured(self) -> Any:
        """The captured model this module runs (:class:`remat.capture.captured.Captured`)."""
        return self._captured

    def flat_inputs(self, args: tuple, kwargs: dict) -> tuple:
        """The graph's flat inputs for a call with ``args`` and ``kwargs`` (defaults filled in)."""
        codegen = self._captured.codegen
        if getattr(codegen, "pytree_info", None) is not None:  # an exported graph, of positional arguments
            args = bind_positional(self.forward_signature, args, kwargs, type(self._model[0]).__name__)
            expected = codegen.pytree_info.in_spec.child(0).num_children
            if len(args) != expected:
                raise ValueError(
                    f"this module was planned for calls with {expected} positional arguments (keyword ones "
                    f"in their places), and got {len(args)}: call it as in the example inputs it was planned "
                    "with (the same keys of the batch), or plan again"
                )
            return tuple(fx_pytree.tree_flatten_spec(([*args], {}), codegen.pytree_info.in_spec))
        names = self._captured.input_names
        if not kwargs and len(args) == len(names):
            return args
        bound = self.forward_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.arguments[name] for name in names)

    def runs_plan(self) -> bool:
        """Whether a call runs the plan (training, with autograd), not the model's own forward."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        if not self._captured_training:
            raise RuntimeError(
                "this module was planned with the model in eval mode, and the captured graph keeps "
                "eval-mode behaviour (dropout off, BatchNorm running statistics): call model.train() "
                "before remat.optimize to train with it"
            )
        return True

    def structured_output(self, out):
        """The graph's flat output in the model's output structure (``CodeGen.process_outputs``).

        Written out here because torch.compile (Dynamo) does not trace into torch.fx.
        """
        info = getattr(self._captured.codegen, "pytree_info", None)
        if info is None or info.out_spec is None:
            return out
        return pytree.tree_unflatten(out if isinstance(out, (list, tuple)) else [out], info.out_spec)


class RematModule(DropInModule):
    """Any traced model run with a checkpoint plan; a drop-in for the original.

    Made by :func:`remat.optimize`. It runs the traced graph piece by piece
    (:class:`DropInModule` says what it shares with the model), recomputing
    every segment before the last kept activation in backward. With
    ``offload``, the kept activations wait in host memory (:class:`CheckpointOffload`).
    """

    def __init__(
        self,
        model: nn.Module,
        captured: Any,
        boundaries: Sequence[int],
        plan: Any = None,
        offload: CheckpointOffload | None = None,
        nested: dict[tuple[int, int], tuple[int, ...]] | None = None,
        stored: frozenset[int] = frozenset(),
        selective: frozenset[int] = frozenset(),
        stage_starts: Sequence[int] = (),
        remake: bool = False,
        remade_costly: Sequence[int] = (),
    ):
        super().__init__(model, captured, plan)
        captured.check_boundaries(boundaries)
        self._engine = SegmentEngine(
            _Pieces(captured, self), len(captured.modules), boundaries, offload, nested, stored, selective, stage_starts
        )
        self.boundaries = self._engine.boundaries  # pieces where segments start
        self.nested = self._engine.nested  # recomputed segment (start, stop) -> its inner segment starts
        self.stored = stored  # starts of segments run normally (not recomputed)
        self.selective = selective  # pieces where the chain stages that run selectively start
        self.offload = offload
        self.remake = remake  # autograd keeps recipes of cheap values (remat.execute.remake.remake_cheap)
        self.remade_costly = tuple(remade_costly)  # and of these calls of operators with FLOPs

    def run_pieces(self, start: int, stop: int, values: dict[int, Any], inputs: tuple):
        """Pieces ``start..stop-1`` run as they are (no plan) on the flat ``inputs``;
        ``values`` maps earlier pieces to the outputs these read. For the profiler
        and the timer."""
        return self._engine.run_pieces(start, stop, values, inputs)

    def forward(self, *args, **kwargs):
        if not self.runs_plan():
            return self._model[0](*args, **kwargs)  # nothing to save for backward: the model's own forward
        inputs = self.flat_inputs(args, kwargs)
        # Compiled, the partitioner chooses what to save (and a dispatch mode would stop the compile).
        remaking = (
            remake_cheap(costly=self.remade_costly)
            if self.remake and not torch.compiler.is_compiling()
            else contextlib.nullcontext()
        )
        with remaking:
            return self.structured_output(self._engine.run(inputs))

    def extra_repr(self) -> str:
        kept = self.plan.kept if self.plan is not None else str(self.boundaries)
        nested = f" (and {sum(map(len, self.nested.values()))} nested in recomputes)" if self.nested else ""
        stored = f" ({len(self.stored)} segments stored, not recomputed)" if self.stored else ""
        stored += f" ({len(self.selective)} stages selective)" if self.selective else ""
        stored += " (cheap values remade in backward)" if self.remake else ""
        return f"keeps: {kept}{nested}{stored}" + (" (offloaded to host memory)" if self.offload is not None else "")


class _Pieces:
    """A captured model's pieces as the engine's :class:`~remat.execute.engine.Program`: each piece
    is a GraphModule called as ``piece(outputs it reads, root, *model inputs)``."""

    def __init__(self, captured: Any, root: nn.Module):
        self.captured = captured
        self.root = root
        self.reads = captured.reads
        self.last_reader = captured.last_reader

    def outside_reads(self, start: int, stop: int) -> tuple[int, ...]:
        return self.captured.outside_reads(start, stop)

    def submodules(self, start: int, stop: int) -> list[nn.Module]:
        return self.captured.submodules(start, stop, self.root)

    def reads_inputs(self, start: int) -> bool:
        return True  # any piece may read the model's inputs (masks, position ids)

    # Pieces are called through ``forward``: ``nn.Module.__call__`` adds hook checks, and
    # GraphModule's a traceback walk for every exception, a recompute's early stop included.
    def call(self, index: int, read: tuple, inputs: tuple):
        return self.captured.modules[index].forward(read, self.root, *inputs)

    def span(self, start: int, stop: int):
        module, returned = self.captured.span(start, stop)
        return (lambda boxed, inputs: module.forward(boxed, self.root, *inputs)), returned


def module_for_plan(model: nn.Module, captured: Any, plan: Any) -> RematModule:
    """``model`` run with ``plan`` (a :class:`remat.plan.Plan`) on ``captured``, whose pieces
    form the plan's stages as ``plan.stage_pieces`` says."""
    return RematModule(
        model,
        captured,
        plan=plan,
        offload=CheckpointOffload() if plan.offload else None,
        remake=plan.remake,
        remade_costly=plan.remade_costly,
        **in_pieces(plan.stage_pieces, plan.checkpoints, plan.inner, plan.stored, plan.selective),
    )
