"""Measure one stage on its own under the exact storage tracker: forward saving nothing (as inside
a recomputed segment), forward saving (as normally), then backward. The numbers recorded are
exactly what the chain cost model needs. Stage inputs and outputs may be tensors or nested
tuples/lists/dicts of them.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from remat.chain.time import Work
from remat.measure.tracker import MemoryTracker, has_storage, rounded_bytes, track_memory, unique_storage_bytes


__all__ = ["PASSED_ON", "StageCost", "leaf", "profile_stage", "tensors_of"]

PASSED_ON = -1  # storage number of a gradient that is the stage's output gradient (see StageCost)


@dataclasses.dataclass
class StageCost:
    """What running one stage costs (bytes, FLOPs); see :class:`Chain`."""

    out_bytes: int
    out_aliases_input: bool
    fwd_nosave: int
    fwd_save: int
    saved: int
    saves_input: bool
    saves_output: bool
    bwd: int
    param_grad_bytes: int
    input_grad_bytes: int
    fwd_flops: int
    bwd_flops: int
    # Per input tensor: whether the stage saves it for backward, and the
    # gradient its backward makes for it: (storage number within this stage,
    # bytes), or None. Equal storage numbers share memory (an add hands one
    # gradient tensor to both its inputs).
    inputs_saved: tuple[bool, ...] = ()
    # PASSED_ON: the stage's output gradient itself, handed on.
    input_grads: tuple[tuple[int, int] | None, ...] = ()
    # What stays from the stage's backward until the caller lets its outputs go,
    # after the step: what it made for outputs the loss ignores (their backward
    # never runs), and whatever the graphs of the outputs the caller holds keep.
    stranded: int = 0
    # Dense bytes of the gradients of its outputs (what adding two of them makes; for the
    # loss, the gradient autograd starts the backward with).
    output_grad_bytes: int = 0
    # What its forward runs saving nothing (as when recomputed): operators, bytes allocated.
    fwd_work: Work = Work()
    # Its forward with saving up to the last tensor it saves for backward, where a recompute
    # that ends with this stage stops (see NOTE [early stop] in remat.execute.engine): the
    # peak of new bytes and the work done by then; None if it saves nothing.
    to_last_save: tuple[int, Work] | None = None
    # Per input tensor, by position: whether an output shares its storage (a value handed on,
    # or a view of one): the model's output may hold an earlier stage's output so.
    inputs_returned: tuple[bool, ...] = ()


def tensors_of(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _drop_grad(parameter: torch.Tensor) -> None:
    parameter.grad = None


def _storage_ids(tree: Any) -> set[int]:
    return {id(t.untyped_storage()) for t in tensors_of(tree)}


class _StageInput(torch.autograd.Function):
    """A copy of a leaf that is not a leaf, as a stage input is in a real step.

    In-place stages (``ReLU(inplace=True)``) refuse to modify a leaf that
    requires grad. The copy is made before tracking starts. Its gradient is
    kept in ``received`` (as the previous stage's autograd node would hold
    it) rather than accumulated into the leaf, which could copy a gradient
    that is shared by two inputs.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, received: list, position: int, earlier: list) -> torch.Tensor:
        ctx.received, ctx.position, ctx.earlier = received, position, earlier
        return t.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Only the gradient a later stage made (see ``accumulated`` in _profile_stage),
        # nothing added: this stage made none.
        made = all(ref() is not grad.untyped_storage() for ref in ctx.earlier)
        ctx.received[ctx.position] = grad if made else None
        return None, None, None, None


class _SeedGradient(torch.autograd.Function):
    """A scalar root whose backward creates the gradients of ``outputs``.

    In a real step the gradient of a stage's output is created by the next
    stage's backward and handed to autograd, which frees it as soon as the
    stage's first backward node has used it. Seeding the stage's backward
    with tensors we hold would keep it alive through the whole stage. The
    outputs themselves are not referenced either: like in a real step, they
    stay alive only if the stage saved them for backward. ``made`` gets a
    weak reference to each gradient's storage; ``held``, if a list, keeps the
    gradients to the end: the next stage's backward made one tensor for this
    output and an earlier stage's, which holds it until its own backward.
    """

    @staticmethod
    def forward(ctx, made: list, held: list | None, *outputs: torch.Tensor) -> torch.Tensor:
        ctx.layouts, ctx.made, ctx.held = [(t.shape, t.dtype, t.device) for t in outputs], made, held
        return outputs[0].new_zeros(())

    @staticmethod
    def backward(ctx, _: torch.Tensor):
        # Dense, one per output, as the next stage's backward makes them: outputs
        # that are views of one storage (chunks of a cat) get a gradient each.
        grads = tuple(torch.ones(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.layouts)
        ctx.made.extend(weakref.ref(g.untyped_storage()) for g in grads)
        if ctx.held is not None:
            ctx.held.extend(grads)
        return None, None, *grads


def _dense_bytes(tensors: Sequence[torch.Tensor], round_to: int) -> int:
    """Bytes of one dense gradient per tensor, as a backward makes them."""
    return sum(rounded_bytes(t.numel() * t.element_size(), round_to) for t in tensors)


def _stage_input(x: Any, received: list, earlier: list) -> Any:
    """``x`` with every tensor that requires grad behind a :class:`_StageInput`."""
    leaves, spec = tree_flatten(x)
    received[:] = [None] * len(leaves)
    wrapped = [
        _StageInput.apply(t, received, k, earlier) if isinstance(t, torch.Tensor) and t.requires_grad else t
        for k, t in enumerate(leaves)
    ]
    return tree_unflatten(wrapped, spec)


def _numbered_grads(
    grads: Sequence[torch.Tensor | None], round_to: int, passed: set[int]
) -> tuple[tuple[int, int] | None, ...]:
    """Each gradient as (storage number in order of first appearance, bytes); number
    ``PASSED_ON`` for the storage of the stage's output gradient (id in ``passed``)."""
    numbers: dict[int, int] = {storage: PASSED_ON for storage in passed}
    out = []
    for g in grads:
        if g is None:
            out.append(None)
            continue
        number = numbers.setdefault(id(g.untyped_storage()), len(numbers) - len(passed))
        out.append((number, unique_storage_bytes([g], round_to)))
    return tuple(out)


def profile_stage(
    run: Callable[[Any], Any],
    x: Any,
    params: Sequence[torch.Tensor],
    device,
    *,
    root: bool = False,
    owned: Sequence[bool] | None = None,
    exact: bool = True,
    seeded: Sequence[bool] | None = None,
    received: list[bool] | None = None,
    outputs_held: bool = False,
    accumulated: Sequence[bool] | None = None,
    output_grads_held: bool = False,
) -> tuple[StageCost, Any]:
    """Costs of one stage on input ``x`` (leaves) and its output (detached).

    ``root``: the stage is the loss, whose gradient autograd keeps until the
    end of the backward (the chain counts it as held). ``owned[k]``: the
    gradient of ``params[k]`` is created by this stage's backward (it is the
    last stage to use it); other stages' contributions to a shared parameter
    (tied weights) are added into it out of place (under a dispatch mode, as
    when remat measures), so the part and the sum count in the stage's backward
    peak, but no gradient held afterwards. ``exact``:
    count at the dispatcher; otherwise, on a CUDA device, the allocator's
    figures (which include workspaces allocated inside operators).
    ``seeded[k]``: whether output ``k`` (of those requiring grad) gets a
    gradient in backward (the loss may use only some outputs); all by
    default. ``received``, if given, is filled with whether each input
    tensor got a gradient. ``outputs_held``: the stage makes the model's
    output, which the caller holds through the backward (with the graphs of
    outputs the loss ignores). ``accumulated[k]``: input tensor ``k`` (in
    flattened order) is read by a later stage too, whose backward made its
    gradient first. ``output_grads_held``:
    the gradients of the stage's outputs stay alive through its backward
    (they share storage with an earlier stage's output gradient).
    """
    leaves = x
    input_grads: list[torch.Tensor | None] = []
    earlier: list[weakref.ref] = []
    seed_grads: list[weakref.ref] = []  # the output gradients' storages
    x = _stage_input(leaves, input_grads, earlier)
    x_storages = _storage_ids(x)
    with track_memory(device, exact=exact) as nosave:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda _: None):
            y = run(x)
    y_storages = _storage_ids(y)
    out_aliases_input = bool(y_storages) and y_storages <= x_storages
    returned = {t.untyped_storage()._cdata for t in tensors_of(y) if has_storage(t)}
    inputs_returned = tuple(has_storage(t) and t.untyped_storage()._cdata in returned for t in tensors_of(x))
    out_bytes = sum(r.nbytes for r in {id(r): r for r in map(nosave.record_of, tensors_of(y)) if r}.values())
    fwd_nosave, fwd_flops, fwd_work = nosave.peak_bytes, nosave.flops, nosave.work()
    # The next stage's input; the copy made below is let go before its backward.
    output = tree_map_only(torch.Tensor, lambda t: t.detach().requires_grad_(t.requires_grad), y)
    del y

    # Saved storages by id, held weakly: an id is reused once its storage dies.
    saved_storages: dict[int, weakref.ref] = {}
    to_last_save: list[tuple[int, Work]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved_storages[id(t.untyped_storage())] = weakref.ref(t.untyped_storage())
        # An operator saves its inputs before it runs and its outputs after: what the
        # tracker has seen by now is what a recompute stopped here would have run.
        to_last_save[:] = [(mem.peak_bytes, mem.work())]
        return t

    del x
    x = _stage_input(leaves, input_grads, earlier)  # a fresh copy: an in-place stage changed the first one
    x_tensors = [t for t in tree_flatten(x)[0]]
    x_storages = _storage_ids(x)
    with track_memory(device, exact=exact) as mem:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = run(x)
        fwd_save = mem.peak_bytes
        saved_ids = saved_storages.keys()
        saves_input = bool(saved_ids & x_storages)
        inputs_saved = tuple(
            isinstance(t, torch.Tensor) and id(t.untyped_storage()) in saved_ids for t in x_tensors
        )
        del x_tensors
        saves_output = bool(saved_ids & (_storage_ids(y) - x_storages))
        saved = mem.current_bytes - out_bytes
        flops_before = mem.flops
        outputs = [t for t in tensors_of(y) if t.requires_grad]
        held = list(outputs) if outputs_held else []
        ignored = []
        if seeded is not None:
            ignored = [t for t, seed in zip(outputs, seeded) if not seed]
            outputs = [t for t, seed in zip(outputs, seeded) if seed]
        # The output gradients, created in the backward: one dense tensor per output.
        grad_bytes = _dense_bytes(outputs, mem.round_to)
        if root:
            seeds = list(outputs)
        else:
            held_grads: list | None = [] if output_grads_held else None
            seeds = [_SeedGradient.apply(seed_grads, held_grads, *outputs)] if outputs else []
            made = [weakref.ref(s) for s in {id(s): s for s in map(torch.Tensor.untyped_storage, tensors_of(y))}.values()]
            del y, outputs  # the output stays alive only if the stage saved it
            if not (held or ignored):
                # Also where saved-tensor hooks do not see it: selective checkpointing's cache.
                saves_output |= any(ref() is not None and id(ref()) not in x_storages for ref in made)
            del made
        # Inputs a later stage reads too: that stage's backward made their gradient first,
        # and autograd adds this stage's into it, out of place while a dispatch mode is
        # active (as when remat measures; without one it may add in place): a transient
        # the size of the gradient. A second root, created last (the highest sequence
        # number), runs first and makes those gradients, which the chain counts at the
        # boundary (``carried_grad_bytes``); ``earlier`` lets _StageInput tell them apart.
        added_into = [
            t for t, later in zip(tree_flatten(x)[0], accumulated or ())
            if later and isinstance(t, torch.Tensor) and t.requires_grad
        ]
        earlier_bytes = _dense_bytes(added_into, mem.round_to)
        if seeds and added_into:  # (no gradient from this stage: nothing to add into)
            seeds.append(_SeedGradient.apply(earlier, None, *added_into))
        del added_into
        grads = [torch.ones_like(t) for t in seeds]  # made now, not counted in the backward
        # Only the graph holds the stage inputs from here on: those that only the
        # ignored outputs' graphs save stay alive after the backward, and so does
        # whatever the graphs of outputs the caller holds keep (the caller's own
        # inputs, which need no grad, stay anyway).
        callers = _storage_ids(leaves)
        strands = bool(ignored) or outputs_held
        inputs_left = {
            id(t.untyped_storage()): (weakref.ref(t.untyped_storage()), unique_storage_bytes([t], mem.round_to))
            for t in (tensors_of(x) if strands else ())
            if id(t.untyped_storage()) not in callers
        }
        del x
        # Parameters a later stage uses too (tied weights): in the step, their gradient so far
        # waits in autograd's buffer, which adds this stage's part into it out of place while a
        # dispatch mode is active: the sum is made while the part lives, then replaces the
        # earlier gradient (the chain counts that one). A clone stands for the sum.
        hooks = [
            hook
            for p, own in zip(params, owned or [True] * len(params))
            if not own and p.requires_grad
            for hook in (p.register_hook(torch.clone), p.register_post_accumulate_grad_hook(_drop_grad))
        ]
        live_at_start = mem.current_bytes
        mem.mark()
        inputs = [t for t in [*tensors_of(leaves), *params] if t.requires_grad]
        if seeds and inputs:
            torch.autograd.backward(seeds, grads, inputs=inputs)
        for hook in hooks:
            hook.remove()
        del grads, seeds
        if root:
            del y, outputs
        else:
            del held_grads
        after = mem.peak_bytes  # since the mark: the backward's peak
        stranded = 0
        if strands:
            kept = [*held, *(p.grad for p in params if p.grad is not None), *(g for g in input_grads if g is not None)]
            stranded = _stranded_bytes(mem, inputs_left, kept)
            del kept
        del ignored, held
        # Over what is live when the backward starts, output gradients and the
        # gradients later stages made for its inputs aside (the chain counts them).
        bwd = after - live_at_start - (0 if root else grad_bytes) - earlier_bytes
        bwd_flops = mem.flops - flops_before
    is_tensor = [isinstance(t, torch.Tensor) for t in tree_flatten(leaves)[0]]
    if received is not None:
        received[:] = [g is not None for g, tensor in zip(input_grads, is_tensor) if tensor]
    owned = [True] * len(params) if owned is None else owned
    param_grad_bytes = unique_storage_bytes(
        [p.grad for p, own in zip(params, owned) if own and p.grad is not None], mem.round_to
    )
    input_grad_bytes = unique_storage_bytes([g for g in input_grads if g is not None], mem.round_to)
    # A backward that hands its one output's gradient on unchanged (an add) hands on
    # whatever storage that gradient has in the step (a slice of a larger one, say).
    passed = {id(s) for s in (ref() for ref in seed_grads) if s is not None} if len(seed_grads) == 1 else set()
    numbered = _numbered_grads(input_grads, mem.round_to, passed)
    for t in params:
        t.grad = None
    cost = StageCost(
        out_bytes, out_aliases_input, fwd_nosave, fwd_save, saved, saves_input, saves_output,
        bwd, param_grad_bytes, input_grad_bytes, fwd_flops, bwd_flops,
        tuple(flag for flag, tensor in zip(inputs_saved, is_tensor) if tensor),
        tuple(g for g, tensor in zip(numbered, is_tensor) if tensor),
        stranded,
        grad_bytes,
        fwd_work,
        to_last_save[0] if to_last_save else None,
        inputs_returned,
    )
    return cost, output


def _stranded_bytes(
    mem: MemoryTracker, inputs: dict[int, tuple[weakref.ref, int]], kept: Sequence[torch.Tensor]
) -> int:
    """After a backward, what the graph still holds: whatever the stage made (saved
    tensors, and what a checkpoint's recompute saved for outputs whose backward never
    runs) and the stage inputs (with their bytes) still alive, but the outputs the
    caller holds and the gradients (``kept``)."""
    storages = {id(t.untyped_storage()): t.untyped_storage() for t in kept}
    return mem.live_bytes_besides(storages.values()) + sum(
        nbytes for ref, nbytes in inputs.values() if (s := ref()) is not None and id(s) not in storages
    )


def leaf(tree: Any, requires_grad: bool) -> Any:
    """Fresh leaves; each requires grad if its tensor did (a stage output computed
    from the inputs alone does not, so no gradient is made for it)."""

    def make(t: torch.Tensor) -> torch.Tensor:
        grad = requires_grad and t.requires_grad and (t.is_floating_point() or t.is_complex())
        return t.detach().requires_grad_(grad)

    return tree_map_only(torch.Tensor, make, tree)
