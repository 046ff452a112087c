"""The one-call API: ``remat.plan`` and ``remat.optimize``.

Pipeline: capture the model as a torch.fx graph, cut it into a chain of
pieces joined by single tensors, profile every piece on fake tensors, solve
the chain for the least peak, and run the plan with the user's own modules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from remat.capture.graph import Piece, piece_module, split_linear, structure_key, trace
from remat.capture.profile import profile_stages
from remat.execute import RematModule
from remat.measure import as_tuple, default_loss, measure_step, round_to_of, step_model, unique_storage_bytes
from remat.plan import Plan
from remat.solvers.chain import Chain, min_peak

__all__ = ["plan", "optimize"]


@dataclasses.dataclass
class Captured:
    """A model cut into pieces, ready to profile or run."""

    pieces: list[Piece]
    modules: list[fx.GraphModule]
    input_names: list[str]
    codegen: Any  # the traced graph's input flattening / output unflattening

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


def capture(model: nn.Module, example_inputs: tuple) -> Captured:
    """Trace ``model`` and cut it into pieces joined by single tensors."""
    gm = trace(model, example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    pieces = split_linear(gm)
    model_tensors = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    model_tensors |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    modules = [piece_module(gm, p, placeholders, model_tensors) for p in pieces]
    return Captured(pieces, modules, [p.target for p in placeholders], gm.graph._codegen)


def fingerprint(model: nn.Module, example_inputs: tuple) -> str:
    """Parameter names/shapes/dtypes and input shapes, hashed."""
    parts = [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in model.state_dict().items()]
    parts += [f"in:{tuple(t.shape)}:{t.dtype}" for t in example_inputs if isinstance(t, torch.Tensor)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _profile(model: nn.Module, captured: Captured, inputs: tuple, loss_fn) -> tuple[Chain, list[list[int]]]:
    """The chain of ``captured``'s pieces (plus the loss), measured on fake tensors."""
    host = RematModule(model, captured, ())  # the model's modules and root tensors, same names
    with step_model(host, inputs, fake=True) as (fake_host, fake_inputs):
        named = dict(fake_host.named_parameters())
        specs, keys = [], []
        last = len(captured.modules) - 1
        finish = captured.codegen.process_outputs  # the model's output structure
        for index, piece in enumerate(fake_host._captured.modules):

            def run(x, piece=piece, index=index):
                args = (None, fake_host, *x) if index == 0 else (x, fake_host, *fake_inputs)
                return finish(piece(*args)) if index == last else piece(*args)

            used = captured.tensor_names(index, fake_host)
            trainable = [named[k] for k in used if k in named and named[k].requires_grad]
            specs.append((captured.pieces[index].name, run, trainable))
            keys.append(structure_key(piece, fake_host) + ("<last>" if index == last else ""))
        device = next((t.device for t in fake_inputs if isinstance(t, torch.Tensor)), None)
        tensors = [*fake_host.parameters(), *fake_host.buffers(), *fake_inputs]
        base = unique_storage_bytes(tensors, round_to_of(device))
        return profile_stages(specs, fake_inputs, loss_fn, base_bytes=base, device=device, keys=keys)


def plan(
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    budget: int | str | None = None,
) -> Plan:
    """Find the checkpoints with the least training-step peak for ``model``.

    Planning runs on fake tensors: it needs no memory for activations, so a
    model that does not fit can be planned on any machine.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace.
        example_inputs: a tensor or tuple of positional inputs, at the size
            you will train with.
        loss_fn: model output -> scalar loss (default: mean of squares of the
            first output, in float32). Only its cost matters for planning.
        budget: not supported yet (least peak only); must be None.

    Example:
        >>> import torch, remat
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
        >>> p = remat.plan(net, torch.randn(256, 64))
        >>> p.predicted_peak_bytes < p.baseline_peak_bytes
        True
    """
    return _plan_and_capture(model, example_inputs, loss_fn, budget)[0]


def _plan_and_capture(model, example_inputs, loss_fn, budget):
    if budget is not None:
        raise NotImplementedError("budget= is not supported yet: pass budget=None for the least peak")
    inputs = as_tuple(example_inputs)
    loss_fn = loss_fn or default_loss
    start = time.perf_counter()
    captured = capture(model, inputs)
    chain, groups = _profile(model, captured, inputs, loss_fn)
    capture_seconds = time.perf_counter() - start
    start = time.perf_counter()
    solution = min_peak(chain)
    solve_seconds = time.perf_counter() - start
    baseline = measure_step(model, inputs, loss_fn, fake=True)
    result = Plan(
        stage_names=chain.names,
        checkpoints=solution.checkpoints,
        predicted_peak_bytes=solution.peak_bytes,
        baseline_peak_bytes=baseline.peak_bytes,
        forward_flops=int(chain.fwd_flops[:-1].sum()),
        recompute_flops=solution.recompute_flops,
        parameter_bytes=baseline.parameter_bytes,
        input_bytes=baseline.input_bytes,
        solve_seconds=solve_seconds,
        capture_seconds=capture_seconds,
        fingerprint=fingerprint(model, inputs),
    )
    return result, captured, groups


def optimize(
    model: nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    budget: int | str | None = None,
    *,
    plan: Plan | None = None,
) -> RematModule:
    """A drop-in module that trains ``model`` with the least-peak checkpoints.

    The returned module shares the model's parameters and buffers (nothing is
    copied; ``state_dict()`` keys and values are the model's), computes the
    same loss and gradients, and updates BatchNorm statistics once per step.
    Its ``.plan`` says what it keeps and what that costs.

    Args:
        plan: a plan made earlier (``Plan.load(path)``) for the same model and
            input size; skips the search.

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
        if plan.fingerprint != fingerprint(model, inputs):
            raise ValueError(
                "this plan was made for another model or input size (fingerprint mismatch); "
                "call remat.optimize without plan= to make a new one"
            )
        captured = capture(model, inputs)
        _, groups = _profile(model, captured, inputs, loss_fn or default_loss)
        chosen = plan
    else:
        chosen, captured, groups = _plan_and_capture(model, inputs, loss_fn, budget)
    return RematModule(model, captured, _piece_boundaries(groups, chosen.checkpoints), chosen)


def _piece_boundaries(groups: list[list[int]], checkpoints) -> tuple[int, ...]:
    """Chain checkpoints (stage outputs) as piece indices where segments start."""
    n_groups = len(groups)
    return tuple(groups[c - 1][-1] + 1 for c in checkpoints if c <= n_groups)
