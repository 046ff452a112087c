"""Profile a list of stages, one by one (:mod:`remat.profile.stage`), into a :class:`~remat.chain.Chain`.

Stages of equal structure on equal inputs are measured once; stages whose
output is a view of their input merge into the one before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

from remat.measure.tracker import round_to_of, unique_storage_bytes
from remat.chain.model import Chain
from remat.chain.time import Work
from remat.profile.stage import PASSED_ON, StageCost, leaf, profile_stage, tensors_of

__all__ = ["BackwardSkipsStage", "LossReadsHeldOutputs", "profile_selectively", "profile_stages"]


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
    stage_pieces: list[list[int]] = []
    names: list[str] = []
    # Per stage: its input, whether that requires grad, its runs, parameters and keys.
    members: list[tuple[Any, bool, list[Callable[[Any], Any]], list[torch.Tensor], list[Hashable]]] = []
    accumulated: list[tuple[bool, ...]] = []  # per stage: see profile_stage
    cache: dict[Hashable, tuple[StageCost, Any]] = {}
    outputs: list[Any] = []
    returns: list[tuple[bool, ...]] = []  # per stage: its input tensors its output holds

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
        cost, output = profile_stage(
            run, leaf(x, requires_grad), params, device, owned=owned, exact=exact, accumulated=added,
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
    first_requires_grad = any(t.requires_grad for t in tensors_of(first_input))
    for index, ((name, run, params), key) in enumerate(zip(stages, keys)):
        requires_grad = first_requires_grad or index > 0
        current, added = input_of(index), added_into(index)
        cost, output = profile(key, run, current, requires_grad, params, index, added)
        returns.append(cost.inputs_returned)
        if cost.out_aliases_input and costs and mergeable(index):
            # A view or an in-place op: merged into the stage before, and the
            # merged stage profiled again as one (its backward frees the
            # alias's saved output and gradient before the first part runs,
            # which per-part figures cannot tell).
            stage_input, stage_grad, runs, stage_params, stage_keys = members[-1]
            runs.append(run if reads is None else lambda y, run=run: run((y,)))
            stage_params.extend(p for p in params if all(p is not q for q in stage_params))
            stage_keys.append(key)
            stage_key = None if None in stage_keys else tuple(stage_keys)
            cost, output = profile(
                stage_key, _chained(runs), stage_input, stage_grad, stage_params, index, accumulated[-1]
            )
            stage_pieces[-1].append(index)
            costs[-1] = cost
        else:
            members.append((current, requires_grad, [run], list(params), [key]))
            accumulated.append(added)
            stage_pieces.append([index])
            costs.append(cost)
            names.append(name)
        outputs.append(output)
    loss_input = leaf(outputs[-1], True)
    received: list[bool] = []
    loss_cost, _ = profile_stage(loss_fn, loss_input, [], device, root=True, exact=exact, received=received)
    seeded = [got for t, got in zip(tensors_of(loss_input), received) if t.requires_grad]
    held_cost = None
    if members:
        # The last model stage's backward is measured again as it runs in the step:
        # the loss may read only some outputs (only those get a gradient), and, run
        # normally, the caller holds its outputs throughout (a recompute makes copies
        # that nobody holds).
        stage_input, stage_grad, runs, stage_params, _ = members[-1]
        owned = tuple(last_use[id(p)] <= len(stages) - 1 for p in stage_params)

        def last_stage(**kwargs) -> StageCost:
            return profile_stage(
                _chained(runs), leaf(stage_input, stage_grad), stage_params, device,
                owned=owned, exact=exact, seeded=None if all(seeded) else seeded,
                accumulated=accumulated[-1], **kwargs,
            )[0]

        if not all(seeded):
            costs[-1] = last_stage()
        held_cost = last_stage(outputs_held=True)
    dead = _last_boundary_without_gradient(costs, stage_pieces, outputs, reads)
    if dead:
        # No gradient flows back into stage `dead + 1`'s input (the loss ignores every
        # path from it): the stages before never run backward and their saved tensors
        # stay all step, which only a stage that contains them all can measure.
        upto = stage_pieces[dead][-1]
        merged, merged_keys, merged_reads = _merge_prefix(stages, keys, reads, upto)
        chain, merged_stages = profile_stages(
            merged, first_input, loss_fn, base_bytes=base_bytes, device=device,
            keys=merged_keys, exact=exact, reads=merged_reads,
        )
        piece = lambda j: list(range(upto + 1)) if j == 0 else [j + upto]  # noqa: E731
        return chain, [[q for j in pieces for q in piece(j)] for pieces in merged_stages]
    stage_reads = _stage_reads(stage_pieces, reads)
    for g in _outputs_sharing_gradients(costs, stage_reads):
        if g < len(members) - 1:  # (the last one's gradient comes from the loss alone)
            stage_input, stage_grad, runs, stage_params, stage_keys = members[g]
            stage_key = None if None in stage_keys else tuple(stage_keys)
            costs[g], _ = profile(
                stage_key, _chained(runs), stage_input, stage_grad, stage_params, stage_pieces[g][-1], accumulated[g],
                grads_held=True,
            )
    costs.append(loss_cost)
    names.append("loss")
    x_bytes = unique_storage_bytes(tensors_of(first_input), round_to_of(device))
    if any(read != (i,) for i, read in enumerate(stage_reads)):  # stage i + 1 reads more than a(i)
        ends = [outputs[pieces[-1]] for pieces in stage_pieces]
        _check_backward_reaches(costs, stage_reads, ends, names)
    chain = _chain_of(costs, x_bytes, base_bytes, names, stage_reads, held_cost)
    held = _returned_pieces(returns, outputs, reads)
    held_boundaries = [k + 1 for k, pieces in enumerate(stage_pieces[:-1]) if pieces[-1] in held]
    if held_boundaries and sum(seeded) > 1:
        raise LossReadsHeldOutputs(
            f"the loss reads several outputs, and later stages read the output of {names[held_boundaries[0] - 1]}"
        )
    return chain.holding(held_boundaries), stage_pieces


def _returned_pieces(
    returns: list[tuple[bool, ...]], outputs: list[Any], reads: Sequence[tuple[int, ...]] | None
) -> set[int]:
    """The stages whose output storage the model's output holds: handed on by the last stage,
    or by a stage whose own output is held (a view of a view), as the stages' runs showed
    (``StageCost.inputs_returned``; capture only knows what may be a view)."""
    held: set[int] = set()
    todo = [len(outputs) - 1]
    while todo:
        index = todo.pop()
        if index == 0 or reads is None:
            continue
        positions = [q for q in reads[index] for _ in tensors_of(outputs[q])]  # the piece of each input tensor
        for q, returned in zip(positions, returns[index]):
            if returned and q not in held:
                held.add(q)
                todo.append(q)
    return held


def _last_boundary_without_gradient(
    costs: list[StageCost], stage_pieces: list[list[int]], outputs: list[Any], reads: Sequence[tuple[int, ...]] | None
) -> int:
    """The last boundary ``m`` (a stage output that requires grad) to which the next
    stage's backward makes no gradient, on a chain whose stages read only the previous
    output; 0 if none (multi-input stages are checked by :func:`_check_backward_reaches`)."""
    if reads is not None and any(tuple(read) != (i - 1,) for i, read in enumerate(reads) if i):
        return 0
    for m in range(len(stage_pieces) - 1, 0, -1):
        made = costs[m].input_grad_bytes > 0
        if not made and any(t.requires_grad for t in tensors_of(outputs[stage_pieces[m - 1][-1]])):
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


class LossReadsHeldOutputs(ValueError):
    """The loss reads several of the model's outputs, and later stages read one of them too.

    The gradient the loss sends straight into a caller-held boundary is not
    followed by the chain model: plan such a model without caller-held
    boundaries (cuts at values the model returns).
    """


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
        if m not in graded and any(t.requires_grad for t in tensors_of(output)):
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


def _stage_reads(stage_pieces: list[list[int]], reads: Sequence[tuple[int, ...]] | None) -> list[tuple[int, ...]]:
    """Per chain stage (the loss included): the chain boundaries it reads, in input order.

    Boundary ``m`` is the output of chain stage ``m`` (0: the model input).
    """
    n = len(stage_pieces) + 1
    if reads is None:
        return [(i,) for i in range(n)]
    stage_of = {piece: g for g, pieces in enumerate(stage_pieces) for piece in pieces}
    out = []
    for pieces in stage_pieces:
        first = pieces[0]
        out.append((0,) if first == 0 else tuple(stage_of[q] + 1 for q in reads[first]))
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
    # The loss's gradient is autograd's scalar 1, whether or not the loss is a tensor of its own
    # (a loss_fn that returns the model's own loss makes no bytes, but its gradient is made).
    grad = [
        costs[0].input_grad_bytes,
        *(gradient_at(m, m)[1] if m in grads_of else 0 for m in range(1, n)),
        costs[-1].output_grad_bytes,
    ]
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
        first_reader = list(range(1, n + 2))
        for i in reversed(range(1, n + 1)):  # the earliest reader last
            for m in reads[i - 1]:
                first_reader[m] = i
        extra = dict(
            live_until=live_until, later_saver=later_saver, carried_grad_bytes=carried, first_reader=first_reader
        )
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
        fwd_ops=[c.fwd_work.ops for c in costs],
        fwd_written_bytes=[c.fwd_work.written_bytes for c in costs],
        fwd_cheap_ops=[c.fwd_work.cheap_ops for c in costs],
        fwd_cheap_written_bytes=[c.fwd_work.cheap_written_bytes for c in costs],
        fwd_norm_bytes=[c.fwd_work.norm_bytes for c in costs],
        **_early_stop_arrays(costs),
        base_bytes=base_bytes,
        output_held=True,
        stranded_bytes=held_cost.stranded if held_cost else 0,
        held_output_bwd_peak=held_cost.bwd if held_cost else None,
        names=tuple(names),
        **extra,
    )


def _early_stop_arrays(costs: Sequence[StageCost]) -> dict[str, list]:
    """The chain's ``saves_any`` and ``last_save_*`` (see :class:`Chain`) from the stages' costs."""
    stops = [c.to_last_save or (0, Work()) for c in costs]
    return dict(
        saves_any=[c.to_last_save is not None for c in costs],
        last_save_peak=[peak for peak, _ in stops],
        last_save_flops=[work.flops for _, work in stops],
        last_save_ops=[work.ops for _, work in stops],
        last_save_written_bytes=[work.written_bytes for _, work in stops],
        last_save_norm_bytes=[work.norm_bytes for _, work in stops],
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
    Returns the chain, the pieces of each stage, and the chain stages (1-based, as the chain
    numbers them) run plainly.
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
            chain, stage_pieces = profile_stages(specs, first_input, loss_fn, keys=keys, **kwargs)
        except RuntimeError:
            failed = started[-1] if started else None
            if failed is None or failed in plainly:
                raise
            same = [k for k, key in enumerate(keys or ()) if key is not None and key == keys[failed]]
            plainly.update([failed, *same])
            continue
        return chain, stage_pieces, frozenset(k + 1 for k in plainly)
