"""The chain cost model: the exact peak and recompute of a plan on a linear chain of stages.

A chain has stages ``1..n``; stage ``i`` maps activation ``a(i-1)`` to
``a(i)``; ``a(0)`` is the input and ``a(n)`` the output (for a training step,
the loss). A *plan* is a sorted set of checkpoints ``C`` in ``1..n-1``: the
boundaries whose activation ``a(c)`` is kept during the forward pass. They cut
the chain into segments ``(l, r]``. Every segment except the last runs its
forward without saving anything for backward and is recomputed once, from its
checkpoint, when the backward pass reaches it; the last segment runs normally
(recomputing it right after the forward would hold the same tensors again).
A recompute stops at the segment's last saved tensor (early stop): it runs
stages ``l+1..j-1`` and stage ``j`` up to its last saved tensor, ``j = J(r)``
the last stage up to ``r`` that saves anything (``Chain.last_save_*``); plans
with nested checkpoints or offload recompute whole segments.

The exact peak of one step under a plan (``peak_of``) follows PyTorch's order
of allocation and freeing, per stage, in terms of the quantities a
:class:`Chain` records (all measured on the real operators by
:func:`remat.profile.sequential.profile_sequential`):

* ``K``: the checkpoints before the segment being run or back-propagated
  (those after it are freed once their segment's backward is done);
* forward without saving, stage ``i`` of ``(l, r]``:
  ``K + a(l) + a(i-1)[i-1>l] + fwd_nosave_peak[i]``;
* forward with saving (the last segment, or the recompute of another one,
  which also holds the output gradient ``g(r)``, the parameter gradients
  ``W(>r)`` produced so far and what is held through the whole backward: the
  loss ``a(n)``, its gradient ``g(n)`` and, with ``output_held``, ``a(n-1)``):
  ``K + a(l)[kept] + H(l, i-1) + a(i-1)[i-1>l] + fwd_save_peak[i]``
  (``last_save_peak[j]`` for the stage ``j`` where a recompute stops),
  where ``H(l, j)`` is what stages ``l+1..j`` retain for backward (their
  internal saved tensors plus each activation a stage saves as input or
  output, counted once);
* backward of stage ``i``:
  ``K + a(l)[kept] + held + W(>i) + H(l, i) + a(i)[stage i saved it] + g(i)
  + bwd_peak[i]``.

The segment input ``a(l)`` is always held for a recomputed segment (its
recompute needs it) but, in the last segment, only if stage ``l+1`` saves it.
``a(0)`` belongs to the user and is counted in ``base_bytes``.

Cuts inside residual and dense blocks leave more than one activation live at a
boundary: ``a(m)`` may be read up to stage ``d(m) + 1`` (``Chain.live_until``),
like a block's input read again by its final add. Kept bytes stay additive
because a plan may keep ``r`` after ``l`` only if every activation live at
``r`` was made at ``l`` or before, hence is kept already (``l >= lo(r)``, the
newest maker of one). Inside a segment ``(l, r]``, activations made after
``l`` and still live add to the forward terms (all of them without saving,
those no stage saves when saving); a later stage that saves ``a(m)`` retains
it like stage ``m + 1`` would; the backward holds the gradients of every live
activation (``carried_grad_bytes``, shared storage counted once). These terms
depend on ``l``, so such chains are solved by the O(n^2) ``dp`` (``linear``
falls back to it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from remat.chain.model import Chain, ChainSolution, Inner
from remat.chain.terms import SegmentTerms, selective_terms_of

__all__ = [
    "check_offload",
    "check_store",
    "handed_over",
    "largest_retained",
    "make_solution",
    "peak_of",
    "recompute_flops_of",
    "segment_stages",
    "single_tensor_boundaries",
]


def _segments(n: int, checkpoints: Sequence[int]) -> list[tuple[int, int]]:
    bounds = [0, *checkpoints, n]
    return list(zip(bounds[:-1], bounds[1:]))


def _validate(chain: Chain, checkpoints: Sequence[int]) -> tuple[int, ...]:
    cps = tuple(int(c) for c in checkpoints)
    if list(cps) != sorted(set(cps)) or any(not 1 <= c <= chain.n - 1 for c in cps):
        raise ValueError(
            f"checkpoints must be distinct sorted stage indices in 1..{chain.n - 1}, got {list(cps)}"
        )
    if chain.stranded_bytes and chain.n - 1 in cps:
        raise ValueError(
            f"checkpoint {chain.n - 1} would recompute the last model stage, whose outputs the loss "
            "partly ignores (their graph would keep the recompute alive to the end of the step): drop it"
        )
    if chain.carries:
        for l, r in _segments(chain.n, cps):
            if r < chain.n and chain.first_reader is not None and chain.first_reader[l] > r:
                raise ValueError(
                    f"checkpoint {l} starts a recomputed segment ({l}, {r}] that does not read a({l}) "
                    f"(stage {chain.first_reader[l]} does first): keep {l + 1} instead, or a checkpoint "
                    f"after {chain.first_reader[l]} rather than {r}"
                )
            inside = [m for m in range(l + 1, r) if chain.live_until[m] >= r]
            if inside:
                raise ValueError(
                    f"checkpoint {r} needs a({inside[-1]}), which is made inside the segment before it "
                    f"and still live at {r}: keep {inside[-1]} too (or drop {r})"
                )
    return cps


def check_store(chain: Chain, offload: bool) -> None:
    if chain.carries or offload:
        raise ValueError(
            "stored middle segments are planned only for chains of single-tensor boundaries without "
            "offload (not yet with cuts inside blocks, nor with offload)"
        )


def _validate_stored(
    chain: Chain, checkpoints: tuple[int, ...], stored: Sequence[int], offload: bool = False
) -> frozenset[int]:
    """Stored segments are middle segments (see :func:`_check_adjacent` for their neighbours)."""
    if stored:
        check_store(chain, offload)
    starts = (0, *checkpoints)
    kept = frozenset(int(l) for l in stored)
    for l in sorted(kept):
        if l not in starts[:-1]:
            raise ValueError(
                f"stored segment start {l} must be 0 or a checkpoint before the last ({list(starts[:-1])}): "
                "the last segment always runs normally"
            )
        if starts[starts.index(l) + 1] == chain.n - 1:
            raise ValueError(
                f"the stored segment starting at {l} ends at stage {chain.n - 1}, leaving the loss alone in the "
                f"last segment: start the last segment at {l} instead"
            )
    return kept


def _check_adjacent(checkpoints: tuple[int, ...], stored: frozenset[int], selective: frozenset[int]) -> None:
    """A stored segment followed by another one or by the last runs the other way (plainly or
    selectively): two kept segments that run the same way are one."""
    starts = (0, *checkpoints)
    for l in sorted(stored):
        following = starts[starts.index(l) + 1]
        if (following in stored or following == starts[-1]) and (l in selective) == (following in selective):
            raise ValueError(
                f"stored segments starting at {l} and {following} are adjacent (or the second is the last "
                f"segment) and run the same way: drop checkpoint {following} to make them one"
            )


def segment_stages(n: int, checkpoints: Sequence[int], starts: Sequence[int]) -> tuple[int, ...]:
    """The model stages (1..n-1: the loss, stage n, aside) of the segments starting at ``starts``.

    Example:
        >>> segment_stages(6, [2, 4], [0, 4])
        (1, 2, 5)
    """
    bounds = [0, *checkpoints, n]
    chosen = set(starts)
    return tuple(i for l, r in zip(bounds[:-1], bounds[1:]) if l in chosen for i in range(l + 1, r + 1) if i < n)


def _validate_selective(
    chain: Chain, checkpoints: tuple[int, ...], stored: frozenset[int], selective: Sequence[int]
) -> frozenset[int]:
    """Selective segments are stored ones or the last, on a chain with selective costs."""
    chosen = frozenset(int(l) for l in selective)
    if not chosen:
        return chosen
    chain.selective_view()  # says what is missing
    last = checkpoints[-1] if checkpoints else 0
    if last in chosen and not chain.selective_last:
        raise ValueError(
            "the last segment cannot run selectively: the model's last stage, run so, would keep other "
            "tensors for the outputs the loss ignores than the costs of the other segments count"
        )
    wrong = sorted(chosen - stored - {last})
    if wrong:
        raise ValueError(
            f"selective segment starts {wrong} are neither stored segments ({sorted(stored)}) nor the last "
            f"segment (starting at {last}): recomputed segments run plainly"
        )
    return chosen


def _validate_inner(chain: Chain, checkpoints: tuple[int, ...], inner: Inner) -> dict[tuple[int, int], tuple[int, ...]]:
    """``inner`` as a map from recomputed segments to their nested checkpoints, checked."""
    nested: dict[tuple[int, int], tuple[int, ...]] = {}
    for l, r, cs in inner:
        cs = tuple(int(c) for c in cs)
        if not cs or list(cs) != sorted(set(cs)) or not l < cs[0] <= cs[-1] < r:
            raise ValueError(
                f"nested checkpoints of segment ({l}, {r}] must be sorted, distinct and inside it, got {list(cs)}"
            )
        if (l, r) in nested:
            raise ValueError(f"segment ({l}, {r}] has two entries of nested checkpoints")
        nested[int(l), int(r)] = cs
    if nested and chain.carries:
        raise ValueError("nested checkpoints are planned only for chains of single-tensor boundaries")
    pending = _segments(chain.n, checkpoints)[:-1]
    seen = set()
    while pending:
        l, r = pending.pop()
        if (l, r) in nested:
            seen.add((l, r))
            cs = nested[l, r]
            pending += zip((l, *cs[:-1]), cs)
    unknown = sorted(set(nested) - seen)
    if unknown:
        raise ValueError(
            f"nested checkpoints given for {unknown}, which are not recomputed segments of the plan: "
            "a segment is recomputed if it ends at a checkpoint, or before the last nested checkpoint of its parent"
        )
    return nested


def _nested_phase(
    terms: SegmentTerms, l: int, r: int, nested: dict[tuple[int, int], tuple[int, ...]]
) -> tuple[int, int]:
    """Peak (a(l) included) and recomputed FLOPs of segment (l, r]'s recompute and backward.

    With nested checkpoints ``c1..ck`` the recompute runs ``(l, ck]`` without
    saving, keeping ``a(l), a(c1), ..`` (as checkpoint's inputs of the inner
    segments), then ``(ck, r]`` normally, still in the context of ``g(r)``; the
    inner segments are recomputed again as the backward reaches them, each
    with the inputs of the inner segments before it kept.
    """
    cs = nested.get((l, r))
    if not cs:
        return terms.recompute_phase(l, r), terms.recompute_flops(l, r)
    inner = list(zip((l, *cs[:-1]), cs))
    peak = kept = 0
    for s, e in inner:
        peak = max(peak, kept + int(terms.a_in[s] + terms.E[r]) + terms.forward_unsaved(s, e))
        kept += int(terms.a_in[s])
    peak = max(peak, kept + terms.run_inside(cs[-1], r))
    recomputed = terms.recompute_flops(l, r)
    for s, e in reversed(inner):
        kept -= int(terms.a_in[s])
        local, more = _nested_phase(terms, s, e, nested)
        peak = max(peak, kept + local)
        recomputed += more
    return peak, recomputed


def peak_of(
    chain: Chain,
    checkpoints: Sequence[int],
    stored: Sequence[int] = (),
    *,
    offload: bool = False,
    inner: Inner = (),
    selective: Sequence[int] = (),
) -> int:
    """Exact peak bytes of one training step of ``chain`` under ``checkpoints``.

    ``checkpoints`` are the boundaries ``i`` (1..n-1) whose activation ``a(i)``
    (the output of stage ``i``) is kept; ``[]`` stores everything. ``stored``
    names the starts of middle segments that run normally instead of being
    recomputed, ``selective`` those of the stored or last segments that run
    selectively, ``inner`` the checkpoints nested in recomputed segments (see
    :class:`ChainSolution`). With ``offload``, kept activations wait in host
    memory (see "Offload" above).

    Example:
        >>> from remat.chain import random_chain
        >>> chain = random_chain(8, seed=0)
        >>> recompute_flops_of(chain, [2, 5, 6], stored=[2]) < recompute_flops_of(chain, [2, 5, 6])
        True
        >>> peak_of(chain, [2, 5, 6], stored=[2]) >= peak_of(chain, [2, 5, 6])
        True
    """
    return _cost(chain, checkpoints, stored, offload, inner, selective=selective)[0]


def _cost(
    chain: Chain,
    checkpoints: Sequence[int],
    stored: Sequence[int] = (),
    offload: bool = False,
    inner: Inner = (),
    terms: SegmentTerms | None = None,
    selective: Sequence[int] = (),
    selective_terms: SegmentTerms | None = None,
) -> tuple[int, int, tuple[int, ...], frozenset[int], frozenset[int]]:
    """Peak bytes and recomputed FLOPs of a plan, with its checked checkpoints, stored
    and selective starts."""
    check_offload(chain, offload)
    cps = _validate(chain, checkpoints)
    kept = _validate_stored(chain, cps, stored, offload)
    nested = _validate_inner(chain, cps, inner)
    chosen = _validate_selective(chain, cps, kept, selective)
    _check_adjacent(cps, kept, chosen)
    if nested and (kept or offload or chosen):
        raise ValueError("nested checkpoints are planned without stored or selective segments and without offload")
    if chosen and offload:
        raise ValueError("selective segments are planned without offload")
    run = chain.run_as(nested=bool(nested), offload=offload)
    if run is not chain:  # the terms given count early stop
        chain, terms = run, None
    terms = terms or SegmentTerms(chain)
    if chosen and selective_terms is None:
        selective_terms = selective_terms_of(chain)
    of = lambda l: selective_terms if l in chosen else terms  # noqa: E731
    segments = _segments(chain.n, cps)[:-1]
    if offload:
        recomputed = sum(terms.recompute_flops(l, r) for l, r in segments)
        return chain.base_bytes + peak_offloaded(terms, cps), recomputed, cps, kept, chosen
    peak = held = recomputed = 0
    previous = None  # the terms of the segment before, if it was stored
    for l, r in segments:
        if l in kept:
            held += handed_over(previous, of(l), l)
            local, keeps = of(l).stored_segment(l, r)
            previous = of(l)
        else:
            local, more = _nested_phase(terms, l, r, nested)
            local = max(local, int(terms.a_in[l]) + terms.forward_unsaved(l, r))
            recomputed += more
            keeps = int(terms.a_in[l])
            previous = None
        peak = max(peak, held + local)
        held += keeps
    last = segments[-1][1] if segments else 0
    held += handed_over(previous, of(last), last)
    peak = max(peak, held + of(last).last_segment(last))
    return chain.base_bytes + peak, recomputed, cps, kept, chosen


def handed_over(before: SegmentTerms | None, after: SegmentTerms, r: int) -> int:
    """Bytes of ``a(r)`` a stored segment ending at ``r`` (run as ``before`` says) keeps for
    its last stage's backward, which the kept segment after it (run as ``after`` says) does
    not count: a stored segment's kept bytes leave ``a(r)`` to the segment after it, which
    counts it only if its first stage saves it."""
    if before is None or not before.keeps_out[r] or after.keeps_in[r + 1]:
        return 0
    if before.pinned and r == before.n - 1:  # the caller's output, counted as held
        return 0
    return int(before.a_in[r])


def recompute_flops_of(
    chain: Chain, checkpoints: Sequence[int], stored: Sequence[int] = (), inner: Inner = (),
    selective: Sequence[int] = (),
) -> int:
    """FLOPs recomputed under a plan: every stage before the last segment but stored segments,
    and the nested recomputes of ``inner`` (selective segments remake only what has no FLOPs)."""
    return _cost(chain, checkpoints, stored, inner=inner, selective=selective)[1]


def make_solution(
    chain: Chain,
    checkpoints: Sequence[int],
    method: str,
    terms: SegmentTerms | None = None,
    offload: bool = False,
    stored: Sequence[int] = (),
    inner: Inner = (),
    selective: Sequence[int] = (),
    selective_terms: SegmentTerms | None = None,
) -> ChainSolution:
    peak, recomputed, cps, kept, chosen = _cost(
        chain, checkpoints, stored, offload, inner, terms, selective, selective_terms
    )
    return ChainSolution(cps, peak, recomputed, method, tuple(sorted(kept)), tuple(inner), tuple(sorted(chosen)))



def check_offload(chain: Chain, offload: bool) -> None:
    if offload and chain.carries:
        raise ValueError(
            "offload plans move each segment's single input tensor to the host: profile the model "
            "with single-tensor cuts (remat.plan(..., offload=True) does) rather than cuts inside blocks"
        )



def peak_offloaded(terms: SegmentTerms, checkpoints: Sequence[int]) -> int:
    """Peak over ``base_bytes`` of a plan whose kept activations wait in host memory."""
    segments = _segments(terms.n, checkpoints)
    recomputed = (terms.recompute_segment(l, r) for l, r in segments[:-1])
    return max(terms.last_segment(segments[-1][0]), max(recomputed, default=0))



def largest_retained(chain: Chain, bounds: Sequence[int]) -> int:
    """The most bytes that the stages between two consecutive ``bounds`` keep for their
    own backward (saved tensors and activations), all alive when the backward of the
    last of them starts: a lower bound on the peak over ``base_bytes`` of any plan of
    a chain whose stages are those stretches.

    Example:
        >>> from remat.chain import random_chain
        >>> chain = random_chain(10, seed=0)
        >>> largest_retained(chain, [0, 10]) <= peak_of(chain, []) - chain.base_bytes
        True
    """
    terms = SegmentTerms(chain)
    return max(int(terms.HH[r] - terms.Q[l]) for l, r in zip(bounds[:-1], bounds[1:]))


def single_tensor_boundaries(chain: Chain) -> list[int]:
    """Boundaries 1..n-1 across which no earlier activation stays live (not n-1 if a
    checkpoint may not be there, see ``Chain.stranded_bytes``)."""
    last = chain.n - 1 if chain.stranded_bytes else chain.n
    if not chain.carries:
        return list(range(1, last))
    live_across = np.zeros(chain.n + 1, dtype=bool)
    for m, d in enumerate(chain.live_until):
        live_across[m + 1 : d + 1] = True
    return [k for k in range(1, last) if not live_across[k]]
