"""Profile a list of stages, one by one, into a :class:`~remat.chain.Chain`.

Each stage is run on its own under the exact storage tracker (on fake tensors
when the caller set them up): once forward saving nothing for backward (as
inside a checkpointed segment), once forward saving (as normally), then
backward. The numbers recorded are exactly what the chain cost model needs.
Stage inputs and outputs may be tensors or nested tuples/lists/dicts of them.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from remat.measure.tracker import MemoryTracker, round_to_of, rounded_bytes, track_memory, unique_storage_bytes
from remat.chain.model import Chain

__all__ = ["BackwardSkipsStage", "StageCost", "profile_selectively", "profile_stages"]

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
    # Dense bytes of the gradients of its outputs (what adding two of them makes).
    output_grad_bytes: int = 0


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _storage_ids(tree: Any) -> set[int]:
    return {id(t.untyped_storage()) for t in _tensors(tree)}


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


def _profile_stage(
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
    (tied weights) are added into it in place and freed, so they count in the
    stage's backward peak but not as a gradient held afterwards. ``exact``:
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
    out_bytes = sum(r.nbytes for r in {id(r): r for r in map(nosave.record_of, _tensors(y)) if r}.values())
    fwd_nosave, fwd_flops = nosave.peak_bytes, nosave.flops
    # The next stage's input; the copy made below is let go before its backward.
    output = tree_map_only(torch.Tensor, lambda t: t.detach().requires_grad_(t.requires_grad), y)
    del y

    # Saved storages by id, held weakly: an id is reused once its storage dies.
    saved_storages: dict[int, weakref.ref] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved_storages[id(t.untyped_storage())] = weakref.ref(t.untyped_storage())
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
        outputs = [t for t in _tensors(y) if t.requires_grad]
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
            made = [weakref.ref(s) for s in {id(s): s for s in map(torch.Tensor.untyped_storage, _tensors(y))}.values()]
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
            for t in (_tensors(x) if strands else ())
            if id(t.untyped_storage()) not in callers
        }
        del x
        live_at_start = mem.current_bytes
        mem.mark()
        inputs = [t for t in [*_tensors(leaves), *params] if t.requires_grad]
        if seeds and inputs:
            torch.autograd.backward(seeds, grads, inputs=inputs)
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
        0 if root else grad_bytes,
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


def _leaf(tree: Any, requires_grad: bool) -> Any:
    """Fresh leaves; each requires grad if its tensor did (a stage output computed
    from the inputs alone does not, so no gradient is made for it)."""

    def make(t: torch.Tensor) -> torch.Tensor:
        grad = requires_grad and t.requires_grad and (t.is_floating_point() or t.is_complex())
        return t.detach().requires_grad_(grad)

    return tree_map_only(torch.Tensor, make, tree)


def profile_stages(
    stages: Sequence[tuple[str, Callable[[Any], Any], Sequence[torch.Tensor]]],
    first_input: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    *,
    base_bytes: int,
    device: torch.device | None = None,
    keys: Sequence[Hashable] | None = None,
    exact: bool = True,
    reads: Sequence[tuple[int, ...]] | None = None,
) -> tuple[Chain, list[list[int]]]:
    """Measure every stage (plus the loss, appended) as a chain.

    Args:
        stages: ``(name, run, trainable_tensors)`` per stage; ``run(x)`` maps
            the previous stage's output to this one's.
        first_input: what the first stage receives (the model input).
        loss_fn: model output -> scalar loss; the chain's last stage.
        base_bytes: bytes live through the whole step (parameters, inputs).
        keys: optional structural key per stage: stages with equal keys (and
            equal inputs) compute the same thing on other parameters, so they
            are measured once (a 1000-layer ResNet has a handful of kinds).
        exact: count bytes at the dispatcher (fake tensors, any device);
            ``False`` on real CUDA tensors takes the allocator's figures.
        reads: for stages that read more than the previous stage's output:
            ``reads[i]`` lists the earlier stages whose outputs stage ``i``
            receives, as a tuple (stage 0 always receives ``first_input``).

    Returns the chain and the grouping of stage indices into chain stages: a
    stage whose output only aliases its input (a view, an in-place op) is
    merged into the stage before it.
    """
    costs: list[StageCost] = []
    groups: list[list[int]] = []
    names: list[str] = []
    # Per group: its input, whether that requires grad, its runs, parameters and keys.
    members: list[tuple[Any, bool, list[Callable[[Any], Any]], list[torch.Tensor], list[Hashable]]] = []
    accumulated: list[tuple[bool, ...]] = []  # per group: see _profile_stage
    cache: dict[Hashable, tuple[StageCost, Any]] = {}
    outputs: list[Any] = []

    # A parameter's gradient is created by the last stage that uses it (the first in backward).
    last_use = {id(p): index for index, (_, _, params) in enumerate(stages) for p in params}
    last_reader = {q: i for i, read in enumerate(reads or ()) for q in read}

    def profile(
        key: Hashable | None, run, x, requires_grad: bool, params, upto: int, added: tuple[bool, ...],
        grads_held: bool = False,
    ) -> tuple[StageCost, Any]:
        """One stage's cost; stages of the same structure on the same input are measured once."""
        owned = tuple(last_use[id(p)] <= upto for p in params)
        if key is not None:
            key = (key, requires_grad, owned, added, grads_held, _signature(x))
            if key in cache:
                cost, template = cache[key]
                return cost, _materialize(template)
        cost, output = _profile_stage(
            run, _leaf(x, requires_grad), params, device, owned=owned, exact=exact, accumulated=added,
            output_grads_held=grads_held,
        )
        if key is not None:
            cache[key] = (cost, _template(output))
        return cost, output

    def input_of(index: int) -> Any:
        if index == 0:
            return first_input
        if reads is None:
            return outputs[-1]
        return tuple(outputs[q] for q in reads[index])

    def added_into(index: int) -> tuple[bool, ...]:
        """Per input tensor of stage ``index``: a later stage reads it too (and makes its gradient first)."""
        if index == 0 or reads is None:
            return ()
        return tuple(
            later for q in reads[index] for later in [last_reader[q] > index] * len(tree_flatten(outputs[q])[0])
        )

    def mergeable(index: int) -> bool:
        """A view or in-place stage on the previous output alone, which nothing else reads."""
        return reads is None or (tuple(reads[index]) == (index - 1,) and last_reader[index - 1] == index)

    keys = list(keys) if keys is not None else [None] * len(stages)
    first_requires_grad = any(t.requires_grad for t in _tensors(first_input))
    for index, ((name, run, params), key) in enumerate(zip(stages, keys)):
        requires_grad = first_requires_grad or index > 0
        current, added = input_of(index), added_into(index)
        cost, output = profile(key, run, current, requires_grad, params, index, added)
        if cost.out_aliases_input and costs and mergeable(index):
            # A view or an in-place op: merged into the stage before, and the
            # merged stage profiled again as one (its backward frees the
            # alias's saved output and gradient before the first part runs,
            # which per-part figures cannot tell).
            group_input, group_grad, runs, group_params, group_keys = members[-1]
            runs.append(run if reads is None else lambda y, run=run: run((y,)))
            group_params.extend(p for p in params if all(p is not q for q in group_params))
            group_keys.append(key)
            group_key = None if None in group_keys else tuple(group_keys)
            cost, output = profile(
                group_key, _chained(runs), group_input, group_grad, group_params, index, accumulated[-1]
            )
            groups[-1].append(index)
            costs[-1] = cost
        else:
            members.append((current, requires_grad, [run], list(params), [key]))
            accumulated.append(added)
            groups.append([index])
            costs.append(cost)
            names.append(name)
        outputs.append(output)
    loss_input = _leaf(outputs[-1], True)
    received: list[bool] = []
    loss_cost, _ = _profile_stage(loss_fn, loss_input, [], device, root=True, exact=exact, received=received)
    seeded = [got for t, got in zip(_tensors(loss_input), received) if t.requires_grad]
    held_cost = None
    if members:
        # The last model stage's backward is measured again as it runs in the step:
        # the loss may read only some outputs (only those get a gradient), and, run
        # normally, the caller holds its outputs throughout (a recompute makes copies
        # that nobody holds).
        group_input, group_grad, runs, group_params, _ = members[-1]
        owned = tuple(last_use[id(p)] <= len(stages) - 1 for p in group_params)

        def last_stage(**kwargs) -> StageCost:
            return _profile_stage(
                _chained(runs), _leaf(group_input, group_grad), group_params, device,
                owned=owned, exact=exact, seeded=None if all(seeded) else seeded,
                accumulated=accumulated[-1], **kwargs,
            )[0]

        if not all(seeded):
            costs[-1] = last_stage()
        held_cost = last_stage(outputs_held=True)
    dead = _last_boundary_without_gradient(costs, groups, outputs, reads)
    if dead:
        # No gradient flows back into stage `dead + 1`'s input (the loss ignores every
        # path from it): the stages before never run backward and their saved tensors
        # stay all step, which only a stage that contains them all can measure.
        upto = groups[dead][-1]
        merged, merged_keys, merged_reads = _merge_prefix(stages, keys, reads, upto)
        chain, merged_groups = profile_stages(
            merged, first_input, loss_fn, base_bytes=base_bytes, device=device,
            keys=merged_keys, exact=exact, reads=merged_reads,
        )
        piece = lambda j: list(range(upto + 1)) if j == 0 else [j + upto]  # noqa: E731
        return chain, [[q for j in group for q in piece(j)] for group in merged_groups]
    group_reads = _group_reads(groups, reads)
    for g in _outputs_sharing_gradients(costs, group_reads):
        if g < len(members) - 1:  # (the last one's gradient comes from the loss alone)
            group_input, group_grad, runs, group_params, group_keys = members[g]
            group_key = None if None in group_keys else tuple(group_keys)
            costs[g], _ = profile(
                group_key, _chained(runs), group_input, group_grad, group_params, groups[g][-1], accumulated[g],
                grads_held=True,
            )
    costs.append(loss_cost)
    names.append("loss")
    x_bytes = unique_storage_bytes(_tensors(first_input), round_to_of(device))
    if any(read != (i,) for i, read in enumerate(group_reads)):  # stage i + 1 reads more than a(i)
        ends = [outputs[pieces[-1]] for pieces in groups]
        _check_backward_reaches(costs, group_reads, ends, names)
    return _chain_of(costs, x_bytes, base_bytes, names, group_reads, held_cost), groups


def _last_boundary_without_gradient(
    costs: list[StageCost], groups: list[list[int]], outputs: list[Any], reads: Sequence[tuple[int, ...]] | None
) -> int:
    """The last boundary ``m`` (a stage output that requires grad) to which the next
    stage's backward makes no gradient, on a chain whose stages read only the previous
    output; 0 if none (multi-input stages are checked by :func:`_check_backward_reaches`)."""
    if reads is not None and any(tuple(read) != (i - 1,) for i, read in enumerate(reads) if i):
        return 0
    for m in range(len(groups) - 1, 0, -1):
        made = costs[m].input_grad_bytes > 0
        if not made and any(t.requires_grad for t in _tensors(outputs[groups[m - 1][-1]])):
            return m
    return 0


def _merge_prefix(
    stages: Sequence[tuple[str, Callable[[Any], Any], Sequence[torch.Tensor]]],
    keys: Sequence[Hashable | None],
    reads: Sequence[tuple[int, ...]] | None,
    upto: int,
) -> tuple[list, list, list | None]:
    """``stages`` with stages ``0..upto`` run as one (a chain whose stages read the previous output)."""
    runs = [stages[0][1]] + [run if reads is None else lambda y, run=run: run((y,)) for _, run, _ in stages[1 : upto + 1]]
    params: list[torch.Tensor] = []
    for _, _, stage_params in stages[: upto + 1]:
        params.extend(p for p in stage_params if all(p is not q for q in params))
    name = f"{stages[0][0]}..{stages[upto][0]}"
    merged = [(name, _chained(runs), params), *stages[upto + 1 :]]
    merged_reads = None if reads is None else [reads[0], *((i - 1,) for i in range(1, len(merged)))]
    return merged, [None, *keys[upto + 1 :]], merged_reads


class BackwardSkipsStage(ValueError):
    """A stage's output requires grad but gets none (the loss ignores where it leads).

    Its backward never runs and its saved tensors stay until the end of the
    step, which the chain model does not describe: plan such a model with
    single-tensor cuts, where that branch is part of a larger stage.
    """


def _check_backward_reaches(
    costs: list[StageCost], reads: list[tuple[int, ...]], ends: list[Any], names: list[str]
) -> None:
    """Raise :class:`BackwardSkipsStage` if some stage's output needs a gradient no later stage makes."""
    graded = set()
    for read, cost in zip(reads, costs):
        made = (cost.input_grad_bytes > 0,) if len(read) == 1 else [g is not None for g in cost.input_grads]
        graded.update(m for m, got in zip(read, made) if got)
    for m, output in enumerate(ends, start=1):
        if m not in graded and any(t.requires_grad for t in _tensors(output)):
            raise BackwardSkipsStage(f"no gradient reaches the output of stage {m} ({names[m - 1]})")


def _outputs_sharing_gradients(costs: Sequence[StageCost], reads: Sequence[tuple[int, ...]]) -> set[int]:
    """Chain stages (0-based) whose output gets its gradient as one tensor with an earlier
    stage's output (an add hands one gradient to both its inputs): it stays alive until the
    earlier output's gradient is used, through this stage's backward. Not where another
    reader adds into the earlier output's gradient before this stage's backward, nor where
    another reader adds into this stage's own (either makes a new tensor)."""
    readers: dict[int, list[int]] = {}
    for i, read in enumerate(reads):
        for m in read:
            readers.setdefault(m, []).append(i)
    sharing = set()
    for i, (read, cost) in enumerate(zip(reads, costs)):
        first_boundary: dict[int, int] = {}
        for m, made in sorted(zip(read, cost.input_grads), key=lambda pair: pair[0]):
            if made is None:
                continue
            p = first_boundary.setdefault(made[0], m)
            # Stage j (0-based) is chain stage j + 1: its backward comes after stage m's if j < m.
            if p != m and readers[m] == [i] and all(j < m or j == i for j in readers[p]):
                sharing.add(m - 1)
    return sharing


def _group_reads(groups: list[list[int]], reads: Sequence[tuple[int, ...]] | None) -> list[tuple[int, ...]]:
    """Per chain stage (the loss included): the chain boundaries it reads, in input order.

    Boundary ``m`` is the output of chain stage ``m`` (0: the model input).
    """
    n = len(groups) + 1
    if reads is None:
        return [(i,) for i in range(n)]
    group_of = {piece: g for g, pieces in enumerate(groups) for piece in pieces}
    out = []
    for pieces in groups:
        first = pieces[0]
        out.append((0,) if first == 0 else tuple(group_of[q] + 1 for q in reads[first]))
    out.append((n - 1,))  # the loss reads the model output
    return out


def _signature(tree: Any) -> Hashable:
    """Structure, shapes, strides, dtypes and requires_grad of a stage input."""
    leaves, spec = tree_flatten(tree)
    return str(spec), tuple(
        (tuple(t.shape), t.stride(), t.dtype, t.device.type, t.requires_grad)
        if isinstance(t, torch.Tensor)
        else repr(t)
        for t in leaves
    )


@dataclasses.dataclass(frozen=True)
class _Layout:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool


def _template(tree: Any) -> Any:
    return tree_map_only(
        torch.Tensor, lambda t: _Layout(tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad), tree
    )


def _materialize(template: Any) -> Any:
    """Tensors laid out as in ``template`` (their values do not matter: fake, or only profiled)."""
    return tree_map_only(
        _Layout,
        lambda x: torch.empty_strided(x.shape, x.stride, dtype=x.dtype, device=x.device).requires_grad_(
            x.requires_grad
        ),
        template,
    )


def _chained(runs: Sequence[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """One run that applies ``runs`` in order."""

    def run(x: Any) -> Any:
        for part in runs:
            x = part(x)
        return x

    return run


def _chain_of(
    costs: list[StageCost],
    x_bytes: int,
    base_bytes: int,
    names: list[str],
    reads: list[tuple[int, ...]],
    held_cost: StageCost | None = None,
) -> Chain:
    col = lambda field: [getattr(c, field) for c in costs]  # noqa: E731
    n = len(costs)
    act = [x_bytes, *col("out_bytes")]
    # Stage i (1-based) reads boundaries reads[i-1]; boundary m is live up to
    # the boundary before its last reader.
    live_until = list(range(n + 1))
    saves_input = [False] * n
    later_saver = [0] * (n + 1)  # the first stage after m + 1 that saves a(m)
    # Gradients made for boundary m, by stage, in stage order: (stage, (storage number, bytes)).
    grads_of: dict[int, list[tuple[int, tuple[int, int]]]] = {}
    for i, (read, cost) in enumerate(zip(reads, costs), start=1):
        if len(read) == 1 and len(cost.input_grads) == 1:
            saved, grads = (cost.saves_input,), cost.input_grads
        elif len(read) == 1:  # one boundary, a structure of tensors
            saved, grads = (cost.saves_input,), ((0, cost.input_grad_bytes) if cost.input_grad_bytes else None,)
        else:
            saved, grads = cost.inputs_saved, cost.input_grads
        for m, was_saved, made in zip(read, saved, grads):
            live_until[m] = max(live_until[m], i - 1)
            if m == i - 1:
                saves_input[i - 1] = was_saved
            elif was_saved and not later_saver[m]:
                later_saver[m] = i
            if made is not None:
                grads_of.setdefault(m, []).append((i, made))
    live_until[0] = 0  # the model input is the caller's
    # The gradient of boundary m that its last reader (the first in backward) made: a key
    # naming its storage across stages, and its bytes. An add hands one tensor to both
    # inputs; a backward that hands on its output gradient hands on that one's storage.
    made: dict[int, tuple[Hashable, int]] = {}

    def gradient_at(m: int, k: int) -> tuple[Hashable, int]:
        """The storage key and bytes of a(m)'s gradient when the backward reaches stage k."""
        if sum(i > k for i, _ in grads_of[m]) > 1:  # a second reader's gradient was added: a new tensor
            return ("sum", m), costs[m - 1].output_grad_bytes
        return made[m]

    for m in sorted(grads_of, reverse=True):
        stage, (number, nbytes) = grads_of[m][-1]
        passed_on = number == PASSED_ON and stage in grads_of
        made[m] = gradient_at(stage, stage) if passed_on else ((stage, number), nbytes)
    grad = [costs[0].input_grad_bytes, *(gradient_at(m, m)[1] if m in grads_of else 0 for m in range(1, n)), act[-1]]
    extra = {}
    if any(live_until[m] > m for m in range(n + 1)):
        carried = [0] * (n + 1)
        for k in range(1, n):
            # The gradients live when the backward reaches boundary k: of every
            # activation live there, made by a later stage; one storage may be the
            # gradient of several: counted once.
            storages = dict(
                gradient_at(m, k)
                for m in range(1, k + 1)
                if live_until[m] >= k and m in grads_of and grads_of[m][-1][0] > k
            )
            carried[k] = sum(storages.values()) - grad[k]
        skips_next = [0 < m < n and m not in reads[m] for m in range(n + 1)]
        extra = dict(
            live_until=live_until, later_saver=later_saver, carried_grad_bytes=carried, skips_next=skips_next
        )
    # The gradient of a(i) is produced by stage i+1's backward; the loss's by autograd (a scalar 1).
    return Chain.from_arrays(
        act_bytes=act,
        grad_bytes=grad,
        fwd_nosave_peak=col("fwd_nosave"),
        fwd_save_peak=col("fwd_save"),
        saved_bytes=col("saved"),
        saves_input=saves_input,
        saves_output=col("saves_output"),
        bwd_peak=col("bwd"),
        param_grad_bytes=col("param_grad_bytes"),
        fwd_flops=col("fwd_flops"),
        bwd_flops=col("bwd_flops"),
        base_bytes=base_bytes,
        output_held=True,
        stranded_bytes=held_cost.stranded if held_cost else 0,
        held_output_bwd_peak=held_cost.bwd if held_cost else None,
        names=tuple(names),
        **extra,
    )


def profile_selectively(
    selective: Sequence[tuple[str, Callable[[Any], Any], Sequence[torch.Tensor]]],
    plain: Sequence[tuple[str, Callable[[Any], Any], Sequence[torch.Tensor]]],
    first_input: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    *,
    keys: Sequence[Hashable] | None = None,
    **kwargs,
) -> tuple[Chain, list[list[int]], frozenset[int]]:
    """:func:`profile_stages` on the stages run selectively (``selective``), each
    stage that cannot run so run plainly instead (its spec in ``plain``).

    Selective checkpointing refuses some stages, in their backward (an operator
    that changes in place the output of a matmul or convolution it keeps, as a
    convolution followed by an in-place ReLU does): such a stage, and every stage
    of the same structure (``keys``), is profiled plainly and the whole chain again.
    Returns the chain, the grouping of stages, and the stages run plainly.
    """
    plainly: set[int] = set()
    while True:
        started: list[int] = []

        def noting(run: Callable[[Any], Any], index: int) -> Callable[[Any], Any]:
            def noted(x):
                started.append(index)
                return run(x)

            return noted

        chosen = [plain[index] if index in plainly else spec for index, spec in enumerate(selective)]
        specs = [(name, noting(run, index), params) for index, (name, run, params) in enumerate(chosen)]
        try:
            chain, groups = profile_stages(specs, first_input, loss_fn, keys=keys, **kwargs)
        except RuntimeError:
            failed = started[-1] if started else None
            if failed is None or failed in plainly:
                raise
            same = [k for k, key in enumerate(keys or ()) if key is not None and key == keys[failed]]
            plainly.update([failed, *same])
            continue
        return chain, groups, frozenset(plainly)
