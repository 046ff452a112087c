"""Least-peak checkpointing of a linear chain of stages.

A chain has stages ``1..n``; stage ``i`` maps activation ``a(i-1)`` to
``a(i)``; ``a(0)`` is the input and ``a(n)`` the output (for a training step,
the loss). A *plan* is a sorted set of checkpoints ``C`` in ``1..n-1``: the
boundaries whose activation ``a(c)`` is kept during the forward pass. They cut
the chain into segments ``(l, r]``. Every segment except the last runs its
forward without saving anything for backward and is recomputed once, from its
checkpoint, when the backward pass reaches it; the last segment runs normally
(recomputing it right after the forward would hold the same tensors again).

The exact peak of one step under a plan (``peak_of``) follows PyTorch's order
of allocation and freeing, per stage, in terms of the quantities a
:class:`Chain` records (all measured on the real operators by
:meth:`Chain.from_sequential`):

* ``K``: the checkpoints before the segment being run or back-propagated
  (those after it are freed once their segment's backward is done);
* forward without saving, stage ``i`` of ``(l, r]``:
  ``K + a(l) + a(i-1)[i-1>l] + fwd_nosave_peak[i]``;
* forward with saving (the last segment, or the recompute of another one,
  which also holds the output gradient ``g(r)``, the parameter gradients
  ``W(>r)`` produced so far and what is held through the whole backward: the
  loss ``a(n)``, its gradient ``g(n)`` and, with ``output_held``, ``a(n-1)``):
  ``K + a(l)[kept] + H(l, i-1) + a(i-1)[i-1>l] + fwd_save_peak[i]``,
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

Two exact solvers return the least peak, ties broken by the least recompute:

``dp`` (O(n^2) time, vectorised): ``f(l)``, the least peak of the suffix that
starts at checkpoint ``l`` (not counting the checkpoints before ``l``), obeys
``f(l) = min(S(l), min_r max(R(l, r), a(l) + f(r)))`` with ``R`` and ``S``
the local costs of a recomputed or last segment. ``f(0)`` is the least peak.

``linear`` (one sweep, O(n log n) in practice): the same recursion, but
``min_r max(R(l, r), a(l) + f(r))`` is kept in a heap instead of rescanned.
For a fixed end ``r`` the candidate's cost only grows as ``l`` moves left
(``R`` does not grow with ``l``: a longer segment holds and recomputes at least
as much), so stale heap keys are lower bounds; the top is re-evaluated until
its key is exact, and then it is the minimum. Each evaluation is O(1) with
sparse-table range maxima over per-stage prefix terms. Measured: about two
re-evaluations per stage on heterogeneous random chains.

Offload: kept activations may wait in host memory instead (pinned, copied
out and back asynchronously). Then no checkpoint before a segment is on the
device while it runs: the segment input ``a(l)`` is there for its forward,
comes back for its recompute and stays through its backward, as ``R`` counts
it. The prefix term goes: ``f(l) = min(S(l), min_r max(R(l, r), f(r)))``
(``peak_of``: the most of ``R`` and ``S`` over the segments), and the heap sweep's argument
(costs that only grow as ``l`` moves left) no longer holds, so both the least
peak and the feasibility pass are O(n^2) scans (``offload=True`` in
``peak_of``, ``min_peak``, ``min_recompute`` and ``pareto_front``).

Ties (least recompute at the least peak) are broken exactly by one more pass
over the chain at the optimal peak ``P``: ``v(r)``, the least bytes of
checkpoints before ``r`` over feasible prefixes that end at checkpoint ``r``,
obeys ``v(r) = min{v(l) + a(l) : v(l) + R(l, r) <= P}``; holding fewer
checkpoint bytes never hurts what follows, so the minimum is all that matters.
Every stage before the last segment is recomputed exactly once, so the plan
whose last segment starts earliest recomputes least. ``linear`` computes
``v`` in O(n) amortised with a monotone queue (an ``l`` beaten by a later
``l'`` with ``v(l') + a(l') <= v(l) + a(l)`` is never needed again), ``dp``
with an O(n^2) scan.

Example:
    >>> from remat.solvers.chain import Chain, min_peak, peak_of
    >>> chain = Chain.random(12, seed=0)
    >>> best = min_peak(chain)
    >>> best.peak_bytes == peak_of(chain, best.checkpoints) <= peak_of(chain, [])
    True
"""

from __future__ import annotations

import array
import dataclasses
import functools
import heapq
import math
from collections import deque
from collections.abc import Sequence
from typing import Literal

import numpy as np

_UNREACHABLE = np.iinfo(np.int64).max // 4

# Checkpoints nested in recomputed segments: ``(l, r, (c1, .., ck))`` per segment (l, r].
Inner = tuple[tuple[int, int, tuple[int, ...]], ...]

# Arrays with one entry per boundary (0..n) rather than per stage.
_BOUNDARY_FIELDS = ("act_bytes", "grad_bytes", "live_until", "later_saver", "carried_grad_bytes", "skips_next")
# Per-stage arrays measured again for stages run selectively (``Chain.selective_*``).
_SELECTIVE_FIELDS = ("fwd_save_peak", "saved_bytes", "saves_input", "saves_output", "bwd_peak")

__all__ = [
    "Chain",
    "ChainSolution",
    "peak_of",
    "recompute_flops_of",
    "segment_stages",
    "min_peak",
    "min_recompute",
    "pareto_front",
    "store_all",
    "largest_retained",
    "single_tensor_boundaries",
    "sqrt_segments",
    "uniform_segments",
]


@dataclasses.dataclass(frozen=True)
class Chain:
    """Per-stage sizes (bytes) and costs (FLOPs) of a linear chain.

    Arrays ``act_bytes`` and ``grad_bytes`` have ``n + 1`` entries (index 0 is
    the chain input, index ``n`` its output); every other array has ``n``
    entries, entry ``i - 1`` describing stage ``i``.

    Attributes:
        act_bytes: bytes of each activation ``a(i)``.
        grad_bytes: bytes of the gradient of each ``a(i)`` (0 for an input
            that does not require grad).
        fwd_nosave_peak: peak of new bytes while the stage runs forward saving
            nothing for backward (its output included).
        fwd_save_peak: the same when it saves for backward.
        saved_bytes: bytes the stage keeps for backward that are neither its
            input nor its output.
        saves_input / saves_output: whether it keeps its input / output.
        bwd_peak: peak of new bytes during its backward, over what is live
            when its backward starts.
        param_grad_bytes: bytes of parameter gradients it produces.
        fwd_flops / bwd_flops: its cost.
        base_bytes: bytes live through the whole step (parameters, buffers,
            the chain input).
        output_held: the caller holds ``a(n-1)`` through the backward, as
            ``out = model(x); loss_fn(out).backward()`` does when the chain's
            last stage is the loss.
        names: a readable name per stage.
        live_until: for boundaries with several live tensors (cuts inside
            residual or dense blocks): the last boundary ``d(m)`` at which
            ``a(m)`` is still live (read by stage ``d(m) + 1``); ``None``,
            or ``d(m) = m``, for a plain chain. A plan may then keep ``r``
            after ``l`` only if every activation live at ``r`` was made at
            ``l`` or before (so it is kept already).
        later_saver: the first stage after ``m + 1`` that saves ``a(m)``
            for backward (a residual input saved by a projection), 0 if
            none; its backward releases ``a(m)``.
        skips_next: ``a(m)`` is read by later stages but not by stage
            ``m + 1``: no recomputed segment may start at ``m`` (its
            checkpoint would not hold ``a(m)``, which the cost model assumes).
        carried_grad_bytes: bytes of the gradients of the activations made
            before ``m`` that are live at boundary ``m``, alive when the
            backward reaches it (each counted once where they share storage).
        stranded_bytes: what stage ``n - 1`` saves for model outputs the
            loss ignores: their backward never runs, so these bytes stay
            from that stage's backward to the end of the step. A chain
            with some has no checkpoint at ``n - 1``: the recompute of stage
            ``n - 1`` would save them again, and its checkpoint would keep its
            input alive with them.
        held_output_bwd_peak: stage ``n - 1``'s ``bwd_peak`` when it runs
            in the last segment, where the caller holds its outputs through
            the backward (``None``: the same as recomputed).
        selective_*: the same quantities for each stage run *selectively*
            (:func:`remat.execute.run_selective`): its forward keeps its
            input and the outputs of the operators that have FLOPs, and
            its backward first recomputes the rest, at no FLOPs. Only
            stored and last segments run so (``ChainSolution.selective``);
            ``None`` where not measured (no such plans then). The last
            segment runs selectively only if stage ``n - 1`` strands as much
            either way (``selective_stranded_bytes``): the other segments'
            costs count what it strands.
    """

    act_bytes: np.ndarray
    grad_bytes: np.ndarray
    fwd_nosave_peak: np.ndarray
    fwd_save_peak: np.ndarray
    saved_bytes: np.ndarray
    saves_input: np.ndarray
    saves_output: np.ndarray
    bwd_peak: np.ndarray
    param_grad_bytes: np.ndarray
    fwd_flops: np.ndarray
    bwd_flops: np.ndarray
    base_bytes: int = 0
    output_held: bool = False
    names: tuple[str, ...] = ()
    live_until: np.ndarray | None = None
    later_saver: np.ndarray | None = None
    carried_grad_bytes: np.ndarray | None = None
    skips_next: np.ndarray | None = None
    stranded_bytes: int = 0
    held_output_bwd_peak: int | None = None
    selective_fwd_save_peak: np.ndarray | None = None
    selective_saved_bytes: np.ndarray | None = None
    selective_saves_input: np.ndarray | None = None
    selective_saves_output: np.ndarray | None = None
    selective_bwd_peak: np.ndarray | None = None
    selective_held_output_bwd_peak: int | None = None
    selective_stranded_bytes: int = 0

    def __post_init__(self) -> None:
        n = len(self.fwd_save_peak)
        if n < 1:
            raise ValueError("a chain needs at least one stage")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.ndarray):
                expected = n + 1 if field.name in _BOUNDARY_FIELDS else n
                if value.shape != (expected,):
                    raise ValueError(
                        f"Chain.{field.name} has shape {value.shape}, expected ({expected},) "
                        f"for a chain of {n} stages"
                    )
        if not self.names:
            object.__setattr__(self, "names", tuple(f"stage{i}" for i in range(1, n + 1)))
        selective = [getattr(self, f"selective_{name}") for name in _SELECTIVE_FIELDS]
        if any(x is None for x in selective) and any(x is not None for x in selective):
            raise ValueError(f"Chain.selective_* ({', '.join(_SELECTIVE_FIELDS)}) are given all together or not at all")
        if self.live_until is not None:
            bounds = np.arange(n + 1)
            if (self.live_until < bounds).any() or (self.live_until[:-1] > n - 1).any():
                raise ValueError("Chain.live_until[m] must lie in m..n-1 (the loss reads only a(n-1))")

    @property
    def carries(self) -> bool:
        """Whether some activation is read past the next stage (multi-tensor boundaries)."""
        return self.live_until is not None and bool((self.live_until > np.arange(self.n + 1)).any())

    @property
    def n(self) -> int:
        return len(self.fwd_save_peak)

    @property
    def has_selective(self) -> bool:
        """Whether the stages' selective costs were measured (plans may run segments selectively)."""
        return self.selective_bwd_peak is not None

    def with_selective(self, measured: Chain) -> Chain:
        """This chain with selective costs: those ``measured`` on the same stages run selectively."""
        if measured.n != self.n or not np.array_equal(measured.act_bytes, self.act_bytes):
            raise ValueError("the selective costs were measured on other stages than this chain's")
        return dataclasses.replace(
            self,
            **{f"selective_{name}": getattr(measured, name) for name in _SELECTIVE_FIELDS},
            selective_held_output_bwd_peak=measured.held_output_bwd_peak,
            selective_stranded_bytes=measured.stranded_bytes,
        )

    @property
    def selective_last(self) -> bool:
        """Whether the last segment may run selectively (see ``selective_*``)."""
        return self.has_selective and self.selective_stranded_bytes == self.stranded_bytes

    def selective_view(self) -> Chain:
        """The chain as if every stage ran selectively: the costs of its kept segments then."""
        if not self.has_selective:
            raise ValueError(
                "this chain has no selective costs (Chain.selective_*): profile the stages selectively "
                "too to plan selective segments"
            )
        return dataclasses.replace(
            self,
            **{name: getattr(self, f"selective_{name}") for name in _SELECTIVE_FIELDS},
            held_output_bwd_peak=self.selective_held_output_bwd_peak,
            **{f"selective_{name}": None for name in _SELECTIVE_FIELDS},
            selective_held_output_bwd_peak=None,
            selective_stranded_bytes=0,
        )

    @classmethod
    def from_arrays(cls, **arrays) -> Chain:
        """Build a chain from lists; booleans and integers are converted."""
        converted = {}
        for key, value in arrays.items():
            if key in (
                "base_bytes", "names", "output_held", "stranded_bytes", "held_output_bwd_peak",
                "selective_held_output_bwd_peak", "selective_stranded_bytes",
            ):
                converted[key] = value
            elif value is None:
                converted[key] = None
            elif key in ("saves_input", "saves_output", "skips_next", "selective_saves_input", "selective_saves_output"):
                converted[key] = np.asarray(value, dtype=bool)
            else:
                converted[key] = np.asarray(value, dtype=np.int64)
        return cls(**converted)

    @classmethod
    def random(cls, n: int, seed: int = 0, *, carried: bool = False, selective: bool = False) -> Chain:
        """A heterogeneous random chain for tests and benchmarks.

        Stages vary in output size by orders of magnitude; some save nothing,
        some only their input or output, some have a large internal temporary.
        With ``carried``, some activations stay live for a few more stages
        (like residual inputs) and some of those are saved by a later stage.
        With ``selective``, stages also have selective costs: run so, a
        stage keeps its input and part of what it saves, and its backward
        first makes the rest again.
        """
        rng = np.random.default_rng(seed)
        act = rng.choice([1, 2, 4, 8, 16, 64], size=n + 1) * 1024 * rng.integers(1, 5, size=n + 1)
        kind = rng.integers(0, 5, size=n)  # 0 nothing, 1 input, 2 output, 3 both, 4 internal
        saves_input = (kind == 1) | (kind == 3) | (kind == 4)
        saves_output = (kind == 2) | (kind == 3)
        saved = np.where(kind == 4, act[1:] * rng.integers(1, 4, size=n), 0)
        temp = np.where(rng.random(n) < 0.2, act[1:] * rng.integers(1, 6, size=n), 0)
        fwd_nosave = act[1:] + temp
        fwd_save = act[1:] + saved + temp
        grad = act.copy()
        grad[0] = 0
        params = rng.integers(0, 3, size=n) * 1024
        bwd = act[:-1] + params + rng.integers(0, 2, size=n) * act[1:]
        flops = act[1:] * rng.integers(1, 100, size=n)
        extra = {}
        if carried:
            bounds = np.arange(n + 1)
            live = np.minimum(bounds + rng.choice([0, 0, 1, 2, 4], size=n + 1), max(n - 1, 0))
            live = np.maximum(live, bounds)
            live[0] = 0
            # a(m) is read by stage live[m] + 1; that stage, or one between, may save it.
            saver = bounds + 2 + (rng.random(n + 1) * np.maximum(live - bounds, 0)).astype(np.int64)
            later = np.where((live >= bounds + 1) & (rng.random(n + 1) < 0.5), np.minimum(saver, live + 1), 0)
            later[later < bounds + 2] = 0
            carried_grad = np.zeros(n + 1, dtype=np.int64)
            for m in range(1, n + 1):
                carried_grad[m + 1 : live[m] + 1] += grad[m]
            skips = (live >= bounds + 2) & (rng.random(n + 1) < 0.2)
            extra = dict(live_until=live, later_saver=later, carried_grad_bytes=carried_grad, skips_next=skips)
        if selective:
            kept_output = saves_output & (rng.random(n) < 0.5)
            kept = saved // rng.integers(1, 5, size=n)
            remade = saved - kept + np.where(saves_output & ~kept_output, act[1:], 0)
            extra.update(
                selective_fwd_save_peak=act[1:] + kept + temp,
                selective_saved_bytes=kept,
                selective_saves_input=np.ones(n, dtype=bool),
                selective_saves_output=kept_output,
                selective_bwd_peak=bwd + remade,
            )
        return cls(**extra,
            act_bytes=act.astype(np.int64),
            grad_bytes=grad.astype(np.int64),
            fwd_nosave_peak=fwd_nosave.astype(np.int64),
            fwd_save_peak=fwd_save.astype(np.int64),
            saved_bytes=saved.astype(np.int64),
            saves_input=saves_input,
            saves_output=saves_output,
            bwd_peak=bwd.astype(np.int64),
            param_grad_bytes=params.astype(np.int64),
            fwd_flops=flops.astype(np.int64),
            bwd_flops=(2 * flops).astype(np.int64),
            base_bytes=int(act[0]),
        )

    @classmethod
    def from_sequential(cls, module, example_input, loss_fn=None, *, fake: bool = True) -> Chain:
        """Measure a chain from an ``nn.Sequential`` (or a list of modules).

        Every stage is profiled on fake tensors (no memory is used) with the
        exact storage tracker. The loss (default: mean of squares in float32)
        is appended as the last stage. Stages whose output aliases their input
        (views, in-place activations) are merged into the stage before.
        """
        from remat.capture.sequential import profile_sequential

        return profile_sequential(module, example_input, loss_fn, fake=fake).chain


@dataclasses.dataclass(frozen=True)
class ChainSolution:
    """A plan for a chain: the kept boundaries and what the step then costs.

    ``checkpoints`` cut the chain into segments; every segment but the last is
    recomputed in backward, except those whose start (``0`` or a checkpoint)
    is in ``stored``: they run normally, keeping what their backward needs
    (only plans from ``min_recompute(..., store=True)`` have any; a stored
    segment followed by another kept one, stored or the last, runs the other
    way, plainly or selectively). An executor wraps each recomputed segment
    in a checkpoint and runs the others as they are.

    ``selective`` names the starts of segments, stored ones or the last,
    whose stages run selectively (each its own selective checkpoint, see
    :func:`remat.execute.run_selective`): they keep only their inputs and
    what the operators with FLOPs made, and remake the rest, at no FLOPs,
    when their backward starts (plans of chains with selective costs).

    ``inner`` nests checkpoints inside recomputed segments (plans from
    :mod:`remat.solvers.nested`): an entry ``(l, r, (c1, ..., ck))`` says that
    the recompute of segment ``(l, r]`` keeps ``a(c1)..a(ck)``; it then runs
    ``(ck, r]`` normally and recomputes ``(l, c1], ..., (c(k-1), ck]`` again,
    each when the backward reaches it (they may have entries of their own).
    """

    checkpoints: tuple[int, ...]
    peak_bytes: int
    recompute_flops: int
    method: str = ""
    stored: tuple[int, ...] = ()
    inner: Inner = ()
    selective: tuple[int, ...] = ()


# -- the cost model ----------------------------------------------------------


class _Terms:
    """Prefix arrays that make every segment's local cost an O(1) range max.

    Index conventions: stage ``i`` is 1-based; arrays below are padded so that
    ``x[i]`` is stage ``i``'s value.
    """

    def __init__(self, chain: Chain):
        n = chain.n
        a = chain.act_bytes.astype(np.int64)
        g = chain.grad_bytes.astype(np.int64)
        pad = lambda v: np.concatenate([[0], np.asarray(v, dtype=np.int64)])  # noqa: E731
        self.n = n
        self.a = a
        self.a_in = a.copy()
        self.a_in[0] = 0  # the input belongs to the caller: counted in base_bytes
        self.f_ns = pad(chain.fwd_nosave_peak)
        self.f_s = pad(chain.fwd_save_peak)
        self.keeps_in = np.concatenate([[False], chain.saves_input, [False]])
        keeps_out = self.keeps_out = np.concatenate([[False], chain.saves_output])
        # a(j), 1 <= j < n, is retained for backward if stage j or j+1 saves it.
        saver = chain.later_saver if chain.later_saver is not None else np.zeros(n + 1, dtype=np.int64)
        later = saver > 0
        retained = np.where(keeps_out | self.keeps_in[1:] | later, a, 0)
        # Saved only by a stage after the next: released by that stage's backward.
        self.later_only = np.where(later & ~(keeps_out | self.keeps_in[1:]), saver, 0)
        self.later_only[0] = self.later_only[n] = 0
        retained[0] = retained[n] = 0
        # A caller-held output a(n-1) is live through the whole backward: it
        # is counted once, in `held`, instead of as retained by stage n.
        pinned = self.pinned = chain.output_held and n >= 2
        if pinned:
            retained[n - 1] = 0
        h = pad(chain.saved_bytes)
        # HH(i) = sum h[1..i] + sum retained[1..i-1];  H(l, i) = HH(i) - Q(l).
        self.HH = np.cumsum(h) + np.concatenate([[0], np.cumsum(retained)[:-1]])
        self.Q = self.HH + retained
        self.Q[0] = 0
        w = pad(chain.param_grad_bytes)
        w_after = np.concatenate([np.cumsum(w[::-1])[::-1][1:], [0]])  # W(>i)
        out_kept = np.where(keeps_out, a, 0)
        out_kept[n] = 0
        # Held through the whole backward: the loss a(n), its gradient g(n)
        # (autograd.backward keeps the root gradient until it returns) and a
        # caller-held output.
        self.held = int(a[n] + g[n]) + (int(a[n - 1]) if pinned else 0)
        if chain.carried_grad_bytes is not None:
            g = g + chain.carried_grad_bytes  # every gradient live at the boundary
        g_bw = g.copy()
        g_bw[n] = 0
        # Per-stage terms (index i = stage, entry 0 unused).
        self.T_ns = np.zeros(n + 1, dtype=np.int64)
        self.T_rc = np.zeros(n + 1, dtype=np.int64)
        self.T_ns[1:] = a[:-1] + self.f_ns[1:]
        self.T_rc[1:] = self.HH[:-1] + a[:-1] + self.f_s[1:]
        self.T_bw = w_after + self.HH + out_kept + g_bw + pad(chain.bwd_peak)
        self.T_bw[0] = 0
        # Extra held while a segment ending at r is recomputed.
        self.E = self.held + w_after + g
        # After stage n-1's backward (recomputed or not), what it saved for ignored outputs stays.
        self.T_bw[1 : n - 1] += chain.stranded_bytes
        self.E[: n - 1] += chain.stranded_bytes
        if chain.stranded_bytes and n >= 2:
            # Stage n-1 is never recomputed then: the ignored outputs' graph would keep the
            # checkpoint, and with it the segment input, alive to the end of the step.
            self.E[n - 1] = _UNREACHABLE
        # S(l), the local cost of the last segment (l, n], for every l at once.
        suffix_max = lambda t: np.maximum.accumulate(t[::-1])[::-1]  # noqa: E731
        rc_after = np.concatenate([suffix_max(self.T_rc[2:]), [0, 0]])[: n + 1]  # max T_rc[l+2..n]
        # In the last segment a(n-1) is the caller's (in `held`), not a recomputed copy.
        T_bw_last = self.T_bw.copy()
        kept = np.where(self.keeps_in[1 : n + 1], self.a_in[:n], 0)
        if pinned:
            T_bw_last[n - 1] -= out_kept[n - 1]
            kept[n - 1] = 0
        if chain.held_output_bwd_peak is not None and n >= 2:
            T_bw_last[n - 1] += chain.held_output_bwd_peak - chain.bwd_peak[n - 2]
        self.T_bw_last = T_bw_last
        bw_after = suffix_max(T_bw_last[1:])  # max T_bw[l+1..n], l = 0..n-1
        self.carries = chain.carries
        bounds = np.arange(n + 1)
        self.live_until = bounds if chain.live_until is None else chain.live_until.astype(np.int64)
        # Activations live past the next stage (see Chain.live_until).
        self.carrying = np.nonzero(self.live_until > bounds)[0]
        if not self.carries:
            tail = np.maximum(rc_after[:n] - self.Q[:n], self.held + bw_after - self.Q[:n])
            self.S = np.maximum(self.a_in[:n] + self.f_s[1 : n + 1], kept + tail)
            return
        # Made before the segment start l, they are kept; made inside, they
        # are live while read, and retained for backward only if saved.
        self.unretained = np.where(retained == 0, self.a_in, 0)
        if pinned:
            self.unretained[n - 1] = 0
        # lo(r): a segment (l, r] needs l >= lo(r), the newest maker of an activation live at r.
        self.lo = np.zeros(n + 1, dtype=np.int64)
        for m in self.carrying:
            self.lo[m + 1 : self.live_until[m] + 1] = m
        self.skips_next = np.zeros(n + 1, dtype=bool) if chain.skips_next is None else chain.skips_next
        # The last segment holds a(l) if a later stage saves it, else only while it is read.
        kept = np.where(later[:n], self.a_in[:n], kept)
        S = np.empty(n, dtype=np.int64)
        for l in range(n):
            live = self.in_segment(l, self.unretained)
            if not kept[l]:
                live[l + 1 : self.live_until[l] + 1] += self.a_in[l]
            rc = (self.T_rc[l + 2 : n + 1] + live[l + 1 : n]).max(initial=np.iinfo(np.int64).min // 4)
            bw = (T_bw_last[l + 1 : n + 1] - self.released_early(l)[l + 1 : n + 1]).max()
            tail = max(rc - self.Q[l], self.held + bw - self.Q[l])
            S[l] = max(self.a_in[l] + self.f_s[l + 1], kept[l] + tail)
        self.S = S

    def in_segment(self, l: int, weights: np.ndarray) -> np.ndarray:
        """Per boundary k: the ``weights`` of activations made in (l, k) and live at k.

        Zero for a plain chain (each activation is read only by the next stage).
        """
        makers = self.carrying[self.carrying > l]
        return self._interval_sums(makers, makers + 1, self.live_until[makers] + 1, weights[makers])

    def released_early(self, l: int) -> np.ndarray:
        """Per stage i: activations made in (l, i) that only a stage after i saves
        (beyond the next one): its backward, before i's, released them."""
        if not self.carries:
            return np.zeros(self.n + 1, dtype=np.int64)
        makers = np.nonzero(self.later_only)[0]
        makers = makers[makers > l]
        return self._interval_sums(makers, makers + 1, self.later_only[makers], self.a_in[makers])

    def _interval_sums(self, makers, starts, stops, weights) -> np.ndarray:
        """Per index 0..n: the sum of ``weights[j]`` over ``starts[j] <= index < stops[j]``."""
        n = self.n
        diff = np.zeros(n + 2, dtype=np.int64)
        np.add.at(diff, np.minimum(starts, n + 1), weights)
        np.add.at(diff, np.minimum(stops, n + 1), -weights)
        return np.cumsum(diff)[: n + 1]

    def allowed(self, l: int, r: int) -> bool:
        """Whether a segment (l, r] may be recomputed: all it carries over r is kept,
        and its first stage reads a(l)."""
        return not self.carries or (self.lo[r] <= l and not self.skips_next[l])

    # Local costs, each including the segment input a(l) where it is held.
    def recompute_segment(self, l: int, r: int) -> int:
        """Peak of segment (l, r] (forward without saving, recompute, backward)."""
        if not self.allowed(l, r):
            return _UNREACHABLE
        return max(int(self.a_in[l]) + self.forward_unsaved(l, r), self.recompute_phase(l, r))

    def forward_unsaved(self, l: int, r: int) -> int:
        """Peak of stages l+1..r run forward without saving, over what is held before (a(l) excluded)."""
        T_ns = self.T_ns[l + 2 : r + 1]
        if self.carries:  # the l-dependent term; O(n), so only where it can be nonzero
            T_ns = T_ns + self.in_segment(l, self.a_in)[l + 1 : r]
        return int(max(self.f_ns[l + 1], T_ns.max(initial=0)))

    def recompute_phase(self, l: int, r: int) -> int:
        """Peak of segment (l, r]'s recompute (saving) and backward, a(l) held throughout."""
        T_rc, T_bw = self.T_rc[l + 2 : r + 1], self.T_bw[l + 1 : r + 1]
        if self.carries:
            T_rc = T_rc + self.in_segment(l, self.unretained)[l + 1 : r]
            T_bw = T_bw - self.released_early(l)[l + 1 : r + 1]
        rc = max(self.f_s[l + 1], T_rc.max(initial=0) - self.Q[l])
        bw = T_bw.max() - self.Q[l]
        return int(self.a_in[l]) + int(max(self.E[r] + rc, self.held + bw))

    def run_inside(self, c: int, r: int) -> int:
        """Peak of stages c+1..r run normally (saving, then backward) inside the recompute
        of a segment that ends at r: the last part of a nested recompute. a(c) is held
        only while stage c+1 runs, or longer if it saves it (plain chains)."""
        kept = int(self.a_in[c]) if self.keeps_in[c + 1] else 0
        rc = int(self.T_rc[c + 2 : r + 1].max(initial=-_UNREACHABLE)) - int(self.Q[c])
        bw = self.held + int(self.T_bw[c + 1 : r + 1].max()) - int(self.Q[c])
        E = int(self.E[r])
        return max(E + int(self.a_in[c] + self.f_s[c + 1]), kept + max(E + rc, bw))

    def stored_segment(self, l: int, r: int) -> tuple[int, int]:
        """Peak of a stored middle segment (l, r] (run normally), and the bytes it keeps until its backward.

        The kept bytes leave out ``a(r)``: the recomputed segment that must
        follow holds it as its input.
        """
        kept = int(self.a_in[l]) if self.keeps_in[l + 1] else 0
        fwd = max(int(self.a_in[l] + self.f_s[l + 1]), kept + int(self.T_rc[l + 2 : r + 1].max(initial=0) - self.Q[l]))
        bw = kept + self.held + int(self.T_bw_last[l + 1 : r + 1].max() - self.Q[l])
        return max(fwd, bw), kept + int(self.HH[r] - self.Q[l])

    @functools.cached_property
    def lists(self) -> tuple[list[int], ...]:
        """Per-stage arrays as Python lists, for the scalar loop of the queue."""
        arrays = (self.a_in, self.f_ns, self.f_s, self.Q, self.E, self.T_ns, self.T_rc, self.T_bw)
        return tuple(_as_array(x) for x in arrays)

    @functools.cached_property
    def range_max(self) -> tuple[_SparseMax, _SparseMax, _SparseMax]:
        return _SparseMax(self.T_ns), _SparseMax(self.T_rc), _SparseMax(self.T_bw)

    def last_segment(self, l: int) -> int:
        """Peak of the last segment (l, n], run normally."""
        return int(self.S[l])

    def row(self, l: int) -> tuple[np.ndarray, int]:
        """``R(l, r)`` for all ``r`` in ``l+1..n-1`` (vectorised), and ``S(l)``."""
        n = self.n
        a_l = int(self.a_in[l])
        cm = np.maximum.accumulate
        T_ns, T_rc = self.T_ns[l + 2 : n + 1], self.T_rc[l + 2 : n + 1]
        if self.carries:
            T_ns = T_ns + self.in_segment(l, self.a_in)[l + 1 : n]
            T_rc = T_rc + self.in_segment(l, self.unretained)[l + 1 : n]
        fns = np.maximum(self.f_ns[l + 1], np.concatenate([[0], cm(T_ns)]))
        rc = np.maximum(
            self.f_s[l + 1],
            np.concatenate([[np.iinfo(np.int64).min // 4], cm(T_rc) - self.Q[l]]),
        )
        T_bw = self.T_bw[l + 1 : n + 1]
        if self.carries:
            T_bw = T_bw - self.released_early(l)[l + 1 : n + 1]
        bw = cm(T_bw) - self.Q[l]
        r = np.arange(l + 1, n + 1)
        recompute = a_l + np.maximum(np.maximum(fns, self.E[r] + rc), self.held + bw)
        if self.carries:
            recompute[(self.lo[r] > l) | self.skips_next[l]] = _UNREACHABLE
        return recompute[:-1], self.last_segment(l)


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
            if r < chain.n and chain.skips_next is not None and chain.skips_next[l]:
                raise ValueError(
                    f"checkpoint {l} starts a recomputed segment whose first stage does not read a({l}): "
                    f"keep {l + 1} instead, or make ({l}, {r}] the last segment"
                )
            inside = [m for m in range(l + 1, r) if chain.live_until[m] >= r]
            if inside:
                raise ValueError(
                    f"checkpoint {r} needs a({inside[-1]}), which is made inside the segment before it "
                    f"and still live at {r}: keep {inside[-1]} too (or drop {r})"
                )
    return cps


def _check_store(chain: Chain, offload: bool) -> None:
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
        _check_store(chain, offload)
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
    terms: _Terms, l: int, r: int, nested: dict[tuple[int, int], tuple[int, ...]], flops: np.ndarray
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
        return terms.recompute_phase(l, r), int(flops[r] - flops[l])
    inner = list(zip((l, *cs[:-1]), cs))
    peak = kept = 0
    for s, e in inner:
        peak = max(peak, kept + int(terms.a_in[s] + terms.E[r]) + terms.forward_unsaved(s, e))
        kept += int(terms.a_in[s])
    peak = max(peak, kept + terms.run_inside(cs[-1], r))
    recomputed = int(flops[r] - flops[l])
    for s, e in reversed(inner):
        kept -= int(terms.a_in[s])
        local, more = _nested_phase(terms, s, e, nested, flops)
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
        >>> chain = Chain.random(8, seed=0)
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
    terms: _Terms | None = None,
    selective: Sequence[int] = (),
    selective_terms: _Terms | None = None,
) -> tuple[int, int, tuple[int, ...], frozenset[int], frozenset[int]]:
    """Peak bytes and recomputed FLOPs of a plan, with its checked checkpoints, stored
    and selective starts."""
    _check_offload(chain, offload)
    cps = _validate(chain, checkpoints)
    kept = _validate_stored(chain, cps, stored, offload)
    nested = _validate_inner(chain, cps, inner)
    chosen = _validate_selective(chain, cps, kept, selective)
    _check_adjacent(cps, kept, chosen)
    if nested and (kept or offload or chosen):
        raise ValueError("nested checkpoints are planned without stored or selective segments and without offload")
    if chosen and offload:
        raise ValueError("selective segments are planned without offload")
    terms = terms or _Terms(chain)
    if chosen and selective_terms is None:
        selective_terms = _selective_terms(chain)
    of = lambda l: selective_terms if l in chosen else terms  # noqa: E731
    flops = np.concatenate([[0], np.cumsum(chain.fwd_flops)])
    segments = _segments(chain.n, cps)[:-1]
    recomputed = sum(int(flops[r] - flops[l]) for l, r in segments if l not in kept)
    if offload:
        return chain.base_bytes + _peak_offloaded(terms, cps), recomputed, cps, kept, chosen
    peak = held = 0
    previous = None  # the terms of the segment before, if it was stored
    for l, r in segments:
        if l in kept:
            held += _handed_over(previous, of(l), l)
            local, keeps = of(l).stored_segment(l, r)
            previous = of(l)
        else:
            local, more = _nested_phase(terms, l, r, nested, flops)
            local = max(local, int(terms.a_in[l]) + terms.forward_unsaved(l, r))
            recomputed += more - int(flops[r] - flops[l])
            keeps = int(terms.a_in[l])
            previous = None
        peak = max(peak, held + local)
        held += keeps
    last = segments[-1][1] if segments else 0
    held += _handed_over(previous, of(last), last)
    peak = max(peak, held + of(last).last_segment(last))
    return chain.base_bytes + peak, recomputed, cps, kept, chosen


def _handed_over(before: _Terms | None, after: _Terms, r: int) -> int:
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


def _solution(
    chain: Chain,
    checkpoints: Sequence[int],
    method: str,
    terms: _Terms | None = None,
    offload: bool = False,
    stored: Sequence[int] = (),
    inner: Inner = (),
    selective: Sequence[int] = (),
    selective_terms: _Terms | None = None,
) -> ChainSolution:
    peak, recomputed, cps, kept, chosen = _cost(
        chain, checkpoints, stored, offload, inner, terms, selective, selective_terms
    )
    return ChainSolution(cps, peak, recomputed, method, tuple(sorted(kept)), tuple(inner), tuple(sorted(chosen)))


# -- solvers -----------------------------------------------------------------


def min_peak(
    chain: Chain, method: Literal["dp", "linear"] = "linear", *, offload: bool = False, store: bool = False
) -> ChainSolution:
    """Checkpoints with the least peak; among those, the least recompute.

    Args:
        chain: the chain to plan.
        method: ``"dp"`` (exact O(n^2) dynamic program) or ``"linear"``
            (binary search on the peak with an O(n) test; much faster on
            long chains). Both return the optimum.
        offload: kept activations wait in host memory; always solved by the
            O(n^2) dynamic program (``method`` is not used).
        store: over the plans of ``min_recompute(..., store=True)`` (stored
            and selective segments): the least budget it meets, found by
            bisection from the plain least peak (both kinds may lower it: a
            stored segment holds its saved tensors, but has no recompute
            phase, which holds the gradients too).
    """
    if store:
        _check_store(chain, offload)
        terms, selective = _Terms(chain), _selective_terms(chain)
        best = _stored_plan(chain, min_peak(chain, method).peak_bytes, terms, selective)
        low = chain.base_bytes  # nothing fits below what lives all step
        while low < best.peak_bytes:
            middle = (low + best.peak_bytes) // 2
            found = _stored_plan(chain, middle, terms, selective)
            if found is None:
                low = middle + 1
            else:
                best = found
        return best
    terms = _Terms(chain)
    _check_offload(chain, offload)
    if offload:
        cps = _least_recompute_at(terms, _least_peak_offloaded(terms), _prefix_feasible_offloaded)
        return _solution(chain, cps, "offload_dp", terms, offload=True)
    if method == "dp" or (method == "linear" and terms.carries):
        # The sweep's range maxima assume each activation is read by the next stage only.
        cps = _least_recompute_at(terms, _least_peak_dp(terms), _prefix_feasible_quadratic)
    elif method == "linear":
        cps = _least_recompute_at(terms, _least_peak_sweep(terms), _prefix_feasible_linear)
    else:
        raise ValueError(f"unknown method {method!r}: use 'dp' or 'linear'")
    return _solution(chain, cps, method, terms)


def min_recompute(
    chain: Chain,
    budget_bytes: int,
    method: Literal["dp", "linear"] = "linear",
    *,
    offload: bool = False,
    store: bool = False,
) -> ChainSolution | None:
    """Checkpoints with the least recompute whose peak is at most ``budget_bytes``.

    ``None`` when no plan fits (``min_peak`` then gives the least peak there
    is). Exact over the plans of this module: every stage before the last
    segment is recomputed once, so the least recompute is the feasible plan
    whose last segment starts earliest, which the feasibility pass finds.
    With ``offload`` (kept activations in host memory), an O(n^2) pass.

    With ``store=True`` the plans may also run middle segments normally
    (``ChainSolution.stored``), keeping their saved tensors instead of
    recomputing them, which pays at generous budgets; on a chain with
    selective costs, stored and last segments may also run selectively
    (``ChainSolution.selective``). Then ``method`` is
    unused: a dynamic program over boundaries keeps, per boundary, the
    Pareto set of (bytes kept before it, FLOPs recomputed so far) of feasible
    prefixes, which is exact because what a prefix leaves to the rest of the
    plan is its kept bytes alone. O(n^2 p) for Pareto sets of size p: meant
    for chains of up to a few hundred stages.

    Example:
        >>> from remat.solvers.chain import Chain, min_peak, min_recompute, store_all
        >>> chain = Chain.random(20, seed=1)
        >>> budget = (min_peak(chain).peak_bytes + store_all(chain).peak_bytes) // 2
        >>> plan = min_recompute(chain, budget)
        >>> plan.peak_bytes <= budget and plan.recompute_flops <= min_peak(chain).recompute_flops
        True
    """
    terms = _Terms(chain)
    feasible = {"dp": _prefix_feasible_quadratic, "linear": _prefix_feasible_linear}.get(method)
    if feasible is None:
        raise ValueError(f"unknown method {method!r}: use 'dp' or 'linear'")
    _check_offload(chain, offload)
    if terms.carries:
        feasible = _prefix_feasible_quadratic
    if offload:
        feasible, method = _prefix_feasible_offloaded, "offload_dp"
    if store:
        _check_store(chain, offload)
        return _stored_plan(chain, budget_bytes, terms, _selective_terms(chain))
    cps = _plan_within(terms, budget_bytes - chain.base_bytes, feasible)
    return None if cps is None else _solution(chain, cps, method, terms, offload)


def _selective_terms(chain: Chain) -> _Terms | None:
    """The terms of the chain run selectively, if it has selective costs."""
    return _Terms(chain.selective_view()) if chain.has_selective else None


def _stored_plan(chain: Chain, budget_bytes: int, terms: _Terms, selective: _Terms | None) -> ChainSolution | None:
    """``min_recompute(..., store=True)`` on terms built once (the least-peak bisection asks many budgets)."""
    plan = _plan_with_stored(terms, chain.fwd_flops, budget_bytes - chain.base_bytes, selective, chain.selective_last)
    if plan is None:
        return None
    return _solution(chain, plan[0], "store", terms, stored=plan[1], selective=plan[2], selective_terms=selective)


def _plan_with_stored(
    terms: _Terms, fwd_flops: np.ndarray, limit: int, selective: _Terms | None = None, selective_last: bool = False
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """Least-recompute (checkpoints, stored starts, selective starts) within ``limit``, by Pareto
    sets per boundary.

    A label is ``(kept bytes, recomputed FLOPs, previous label, boundary,
    how the segment ending there runs: "recomputed", "stored" or "selective")``.
    ``free[r]`` holds prefixes whose segment ending at ``r`` was recomputed
    (or ``r = 0``); ``after[kind][r]`` those that end with a stored segment run
    that way, which the next kept segment (stored or last) must run the other
    way. With ``selective`` (the terms of the chain run selectively), stored
    segments may run so, and the last one with ``selective_last``.
    """
    n = terms.n
    flops = np.concatenate([[0], np.cumsum(fwd_flops)]).tolist()
    kinds = {"stored": terms, **({"selective": selective} if selective is not None else {})}
    free: list[list[tuple]] = [[] for _ in range(n)]
    after: dict[str, list[list[tuple]]] = {kind: [[] for _ in range(n)] for kind in kinds}
    free[0].append((0, 0, None, 0, "recomputed"))
    best = None  # (label, whether the last segment runs selectively)
    for l in range(n):
        for before, labels in [(None, free[l]), *((kind, after[kind][l]) for kind in kinds)]:
            front = _pareto(labels)
            if not front:
                continue
            for kind, kind_terms in kinds.items():
                if kind == before:
                    continue
                handed = _handed_over(kinds[before] if before else None, kind_terms, l)
                if kind != "selective" or selective_last:
                    last = handed + kind_terms.last_segment(l)
                    fits = [lab for lab in front if lab[0] + last <= limit]
                    if fits:
                        top = min(fits, key=lambda x: x[1])
                        if best is None or top[1] < best[0][1]:
                            best = (top, kind == "selective")
                for r in range(l + 1, n - 1):  # (a last segment of the loss alone would follow)
                    cost, keeps = kind_terms.stored_segment(l, r)
                    for label in front:  # kept bytes ascending: the feasible ones come first
                        if label[0] + handed + cost > limit:
                            break
                        after[kind][r].append((label[0] + handed + keeps, label[1], label, r, kind))
            recompute, _ = terms.row(l)
            a_l = int(terms.a_in[l])
            for r in range(l + 1, n):
                cost = int(recompute[r - l - 1])
                for label in front:
                    if label[0] + cost > limit:
                        break
                    free[r].append((label[0] + a_l, label[1] + flops[r] - flops[l], label, r, "recomputed"))
    if best is None:
        return None
    label, last_selective = best
    checkpoints, stored, chosen = [], [], [label[3]] if last_selective else []
    while label[2] is not None:
        checkpoints.append(label[3])
        if label[4] != "recomputed":
            stored.append(label[2][3])
            if label[4] == "selective":
                chosen.append(label[2][3])
        label = label[2]
    return tuple(reversed(checkpoints)), tuple(reversed(stored)), tuple(sorted(chosen))


def _pareto(labels: list[tuple]) -> list[tuple]:
    """Labels no other beats on both kept bytes and FLOPs, by kept bytes ascending."""
    front: list[tuple] = []
    for label in sorted(labels, key=lambda x: (x[0], x[1])):
        if not front or label[1] < front[-1][1]:
            front.append(label)
    return front


def pareto_front(chain: Chain, *, offload: bool = False, store: bool = False) -> list[ChainSolution]:
    """Every plan worth having: for each peak, the least recompute, from storing everything to the least peak.

    Peaks strictly decrease along the list and recompute strictly increases:
    no plan of this module has both a peak and a recompute at most those of a
    plan on the front, one of them lower. Found by :func:`min_recompute` at
    ever lower budgets, each just below the last plan's peak (with
    ``offload``, of the plans whose kept activations wait in host memory).

    Example:
        >>> from remat.solvers.chain import Chain, min_peak, pareto_front
        >>> front = pareto_front(Chain.random(12, seed=3))
        >>> front[0].recompute_flops, front[-1].peak_bytes == min_peak(Chain.random(12, seed=3)).peak_bytes
        (0, True)

    With ``store=True``, over the plans of ``min_recompute(..., store=True)``.
    """
    front: list[ChainSolution] = []
    solution = min_recompute(chain, peak_of(chain, []), offload=offload, store=store)
    while solution is not None:
        # Budgets only go down, so recompute never does: a plan with the same
        # recompute as the one before it and a lower peak replaces it.
        if front and front[-1].recompute_flops == solution.recompute_flops:
            front.pop()
        front.append(solution)
        solution = min_recompute(chain, solution.peak_bytes - 1, offload=offload, store=store)
    return front


def _check_offload(chain: Chain, offload: bool) -> None:
    if offload and chain.carries:
        raise ValueError(
            "offload plans move each segment's single input tensor to the host: profile the model "
            "with single-tensor cuts (remat.plan(..., offload=True) does) rather than cuts inside blocks"
        )


def _least_peak_dp(terms: _Terms) -> int:
    """f(0) of the right-to-left recursion in the module docstring."""
    n = terms.n
    f = np.zeros(n + 1, dtype=np.int64)
    for l in range(n - 1, -1, -1):
        recompute, last = terms.row(l)
        best = last
        if recompute.size:
            best = min(best, int(np.maximum(recompute, terms.a_in[l] + f[l + 1 : n]).min()))
        f[l] = best
    return int(f[0])


def _prefix_feasible_quadratic(terms: _Terms, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """v(r) and its argmin for every r, O(n^2): the reference for the linear test."""
    n = terms.n
    v = np.full(n, _UNREACHABLE, dtype=np.int64)
    parent = np.full(n, -1, dtype=np.int64)
    v[0] = 0
    for l in range(n - 1):
        if v[l] >= _UNREACHABLE:
            continue
        recompute, _ = terms.row(l)
        candidate = v[l] + terms.a_in[l]
        better = (v[l] + recompute <= limit) & (candidate < v[l + 1 : n])
        idx = np.nonzero(better)[0] + l + 1
        v[idx] = candidate
        parent[idx] = l
    return v, parent


def _prefix_feasible_linear(terms: _Terms, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Same result as the quadratic version, with a monotone queue.

    ``v(r)`` is the least bytes of checkpoints before ``r`` over feasible
    prefixes that end at checkpoint ``r``; ``u(l) = v(l) + a(l)`` is what a
    segment starting at ``l`` adds to it. The queue keeps ``l`` and ``u(l)``
    increasing; its front's range maxima are extended by one stage per step.
    """
    n, big = terms.n, _UNREACHABLE
    a_in, f_ns, f_s, Q, E, T_ns, T_rc, T_bw = terms.lists
    rmq_ns, rmq_rc, rmq_bw = terms.range_max
    held = terms.held
    v = [big] * n
    parent = [-1] * n
    v[0] = 0
    queue: deque[int] = deque([0])
    front = upto = -1
    mx_ns = mx_rc = mx_bw = 0
    for r in range(1, n):
        chosen = -1
        while queue:
            l = queue[0]
            if l == front and upto == r - 1:
                if r >= l + 2:
                    if T_ns[r] > mx_ns:
                        mx_ns = T_ns[r]
                    if T_rc[r] > mx_rc:
                        mx_rc = T_rc[r]
                if T_bw[r] > mx_bw:
                    mx_bw = T_bw[r]
            else:
                front = l
                mx_ns, mx_rc = rmq_ns.query(l + 2, r), rmq_rc.query(l + 2, r)
                mx_bw = rmq_bw.query(l + 1, r)
            upto = r
            u = v[l] + a_in[l]
            # The forward and backward parts only grow with r: past the limit
            # once, this l never fits again.
            cost = u + max(f_ns[l + 1], mx_ns, held + mx_bw - Q[l])
            if cost > limit:
                queue.popleft()
                continue
            cost = u + E[r] + max(f_s[l + 1], mx_rc - Q[l])
            if cost <= limit:
                chosen = l
                break
            # The recompute part also holds g(r): it may rule this l out for
            # this r only, so look further along without dropping it.
            for k in range(1, len(queue)):
                l = queue[k]
                u = v[l] + a_in[l]
                rc = E[r] + max(f_s[l + 1], rmq_rc.query(l + 2, r) - Q[l])
                mono = max(f_ns[l + 1], rmq_ns.query(l + 2, r), held + rmq_bw.query(l + 1, r) - Q[l])
                cost = u + max(rc, mono)
                if cost <= limit:
                    chosen = l
                    break
            break
        if chosen >= 0:
            v[r] = vr = v[chosen] + a_in[chosen]
            parent[r] = chosen
            key = vr + a_in[r]
            while queue and v[queue[-1]] + a_in[queue[-1]] >= key:
                queue.pop()
            queue.append(r)
    return np.array(v, dtype=np.int64), np.array(parent, dtype=np.int64)


def _as_array(values: np.ndarray) -> array.array:
    """A Python int64 array: fast scalar indexing, built by a memory copy."""
    out = array.array("q")
    out.frombytes(np.ascontiguousarray(values, dtype=np.int64).tobytes())
    return out


class _SparseMax:
    """O(1) range maximum over a fixed integer array (sparse table)."""

    def __init__(self, values: np.ndarray):
        table = [np.asarray(values, dtype=np.int64)]
        span = 1
        while 2 * span <= len(values):
            prev = table[-1]
            table.append(np.maximum(prev[:-span], prev[span:]))
            span *= 2
        self.levels = [_as_array(t) for t in table]

    def query(self, lo: int, hi: int) -> int:
        """max(values[lo..hi]) inclusive; -inf-like 0 floor for an empty range."""
        if lo > hi:
            return 0
        k = (hi - lo + 1).bit_length() - 1
        level = self.levels[k]
        return max(level[lo], level[hi - (1 << k) + 1])


def _plan_within(terms: _Terms, limit: int, feasible) -> tuple[int, ...] | None:
    """The plan with the earliest last segment whose peak is <= limit, if any."""
    v, parent = feasible(terms, limit)
    fits = np.nonzero(v + terms.S <= limit)[0]
    if not fits.size:
        return None
    m = int(fits[0])
    cps = []
    while m > 0:
        cps.append(m)
        m = int(parent[m])
    return tuple(reversed(cps))


def _least_recompute_at(terms: _Terms, limit: int, feasible) -> tuple[int, ...]:
    cps = _plan_within(terms, limit, feasible)
    if cps is None:
        raise AssertionError("internal error: the least peak has no plan")
    return cps


def _least_peak_sweep(terms: _Terms) -> int:
    """Least peak over ``base_bytes`` by the right-to-left recursion, in one sweep.

    ``f(l) = min(S(l), a(l) + min_r c_r(l))`` with
    ``c_r(l) = max(R0(l, r), f(r))``. Each ``c_r`` only grows as ``l`` moves
    left (``R0`` does not grow with ``l``), so a heap keyed by lower bounds of
    the ``c_r`` works: raise the top's key until it is exact, and it is the
    minimum. Each ``c_r`` is a max of O(1) range maxima (sparse tables).
    """
    n = terms.n
    a_in, f_ns, f_s, Q, E, _, _, _ = terms.lists
    ns_levels, rc_levels, bw_levels = (t.levels for t in terms.range_max)
    floor_log2 = [0] + [k.bit_length() - 1 for k in range(1, n + 2)]
    held = terms.held
    S = terms.S.tolist()
    f = [0] * (n + 1)

    def cost_above(l: int, r: int, key: int) -> int:
        """c_r(l) if it equals ``key``, else a lower bound of it above ``key``."""
        c = f[r]
        if c > key:
            return c
        # stages l+1..r: backward, and forward without saving
        k = floor_log2[r - l]
        level, hi = bw_levels[k], r - (1 << k) + 1
        x = held + max(level[l + 1], level[hi]) - Q[l]
        if x > c:
            c = x
            if c > key:
                return c
        x = f_ns[l + 1]
        rc = f_s[l + 1]
        if r >= l + 2:
            k = floor_log2[r - l - 1]
            hi = r - (1 << k) + 1
            level = ns_levels[k]
            x = max(x, level[l + 2], level[hi])
            level = rc_levels[k]
            rc = max(rc, max(level[l + 2], level[hi]) - Q[l])
        return max(c, x, E[r] + rc)

    heap: list[tuple[int, int]] = []
    for l in range(n - 1, -1, -1):
        if l + 1 < n:
            heapq.heappush(heap, (cost_above(l, l + 1, -1), l + 1))
        best = S[l]
        while heap:
            key, r = heap[0]
            current = cost_above(l, r, key)
            if current == key:
                best = min(best, a_in[l] + key)
                break
            heapq.heapreplace(heap, (current, r))
        f[l] = best
    return f[0]


# -- offload --------------------------------------------------------------------


def _peak_offloaded(terms: _Terms, checkpoints: Sequence[int]) -> int:
    """Peak over ``base_bytes`` of a plan whose kept activations wait in host memory."""
    segments = _segments(terms.n, checkpoints)
    recomputed = (terms.recompute_segment(l, r) for l, r in segments[:-1])
    return max(terms.last_segment(segments[-1][0]), max(recomputed, default=0))


def _least_peak_offloaded(terms: _Terms) -> int:
    """f(0) of ``f(l) = min(S(l), min_r max(R(l, r), f(r)))``: no checkpoint bytes carried."""
    n = terms.n
    f = np.zeros(n + 1, dtype=np.int64)
    for l in range(n - 1, -1, -1):
        best = terms.last_segment(l)
        if l + 1 < n:
            best = min(best, int(np.maximum(terms.row(l)[0], f[l + 1 : n]).min()))
        f[l] = best
    return int(f[0])


def _prefix_feasible_offloaded(terms: _Terms, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Which checkpoints ``r`` end a prefix whose segments all fit ``limit``, O(n^2).

    In the shape of :func:`_prefix_feasible_quadratic` for :func:`_plan_within`:
    ``v(r)`` is 0 where reachable (no checkpoint bytes stay on the device).
    """
    n = terms.n
    v = np.full(n, _UNREACHABLE, dtype=np.int64)
    parent = np.full(n, -1, dtype=np.int64)
    v[0] = 0
    for l in range(n - 1):
        if v[l]:
            continue
        reached = np.nonzero((terms.row(l)[0] <= limit) & (v[l + 1 : n] > 0))[0] + l + 1
        v[reached] = 0
        parent[reached] = l
    return v, parent


# -- baselines -----------------------------------------------------------------


def store_all(chain: Chain) -> ChainSolution:
    """No checkpointing: every stage saves what its backward needs."""
    return _solution(chain, (), "store_all")


def uniform_segments(chain: Chain, k: int) -> ChainSolution:
    """``k`` segments of (nearly) equal numbers of stages."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, chain.n)
    targets = [round(j * chain.n / k) for j in range(1, k)]
    free = np.array(single_tensor_boundaries(chain))
    if not free.size:
        return _solution(chain, (), f"uniform_{k}")
    # The nearest boundary where only one activation is live (always a valid plan).
    cps = sorted({int(free[np.abs(free - t).argmin()]) for t in targets} - {0, chain.n})
    return _solution(chain, cps, f"uniform_{k}")


def largest_retained(chain: Chain, bounds: Sequence[int]) -> int:
    """The most bytes that the stages between two consecutive ``bounds`` keep for their
    own backward (saved tensors and activations), all alive when the backward of the
    last of them starts: a lower bound on the peak over ``base_bytes`` of any plan of
    a chain whose stages are those stretches.

    Example:
        >>> chain = Chain.random(10, seed=0)
        >>> largest_retained(chain, [0, 10]) <= peak_of(chain, []) - chain.base_bytes
        True
    """
    terms = _Terms(chain)
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


def sqrt_segments(chain: Chain) -> ChainSolution:
    """Chen et al. (2016): about sqrt(n) segments of equal length."""
    return dataclasses.replace(uniform_segments(chain, max(1, round(math.sqrt(chain.n)))), method="sqrt")
