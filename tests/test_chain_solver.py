"""Acceptance tests of the least-peak chain solvers (pure: no torch models).

The reference below re-derives the cost model of ``remat.chain`` and ``remat.solvers``
(its module docstring) phase by phase, independently of the solver's prefix
arrays, and enumerates every plan of random chains with it. ``peak_of`` is
checked against the reference on a sample of plans by default and on every
plan of every chain with ``-m heavy``.
"""

from __future__ import annotations

import dataclasses
import functools
import random

import numpy as np
import pytest

from chain_helpers import all_plans
from remat.chain.cost import peak_of, recompute_flops_of, single_tensor_boundaries
from remat.chain.model import Chain
from remat.solvers.baselines import sqrt_segments, store_all, uniform_segments
from remat.solvers.checkpoints import min_peak, min_recompute, pareto_front
from remat.chain.random import random_chain
from remat.chain.time import Speed

METHODS = ["dp", "linear"]
N_CHAINS = 600


def random_chains():
    """600 heterogeneous chains, n from 1 to 14 (seed = index)."""
    return [random_chain(1 + seed % 14, seed) for seed in range(N_CHAINS)]


class Reference:
    """The chain cost model, written out stage by stage from the docstring.

    ``segment(l, r, last)`` is the peak of one segment's forward, recompute
    and backward phases over the checkpoints kept before it (``K``); the
    peak of a plan is ``base + max over segments of K + segment(...)``.
    """

    def __init__(self, chain: Chain):
        self.c = chain
        n = self.n = chain.n
        # A caller-held a(m) is live from its forward to the end of the step: counted in every
        # moment after it is made (`made_before` in the first forward, `held` from then on).
        held = [int(v) for v in chain.held_bytes]
        a = [int(v) - h for v, h in zip(chain.act_bytes, held)]
        self.a = a
        self.a_in = [0, *a[1:]]  # a(0) is the caller's, counted in base_bytes
        self.made_before = [sum(held[:i]) for i in range(n + 1)]  # per stage i: held a(m), m < i
        self.pinned = chain.output_held and n >= 2
        # a(j) is retained for backward if stage j saves its output or stage j+1 its input.
        self.retained = [0] * (n + 1)
        # Multi-tensor boundaries: a(m) is live up to boundary d(m), maybe saved by a later stage.
        self.d = [int(v) for v in chain.live_until] if chain.live_until is not None else list(range(n + 1))
        self.saver = [int(v) for v in chain.later_saver] if chain.later_saver is not None else [0] * (n + 1)
        self.later = [s > 0 for s in self.saver]
        self.first = [int(v) for v in chain.first_reader] if chain.first_reader is not None else list(range(1, n + 2))
        # Retained only by a stage after the next: released once that stage's backward ran.
        self.released_at = [0] * (n + 1)
        for j in range(1, n):
            if chain.saves_output[j - 1] or chain.saves_input[j] or self.later[j]:
                self.retained[j] = a[j]
            if self.later[j] and not (chain.saves_output[j - 1] or chain.saves_input[j]):
                self.released_at[j] = self.saver[j]
        if self.pinned:
            self.retained[n - 1] = 0  # the caller's output: in `held`
        self.held = a[n] + int(chain.grad_bytes[n]) + (a[n - 1] if self.pinned else 0) + sum(held)

    def H(self, l: int, j: int, backward: bool = False) -> int:
        """What stages l+1..j retain for backward, a(l) and a(j) excluded (in the
        backward of stage j: without what a later stage's backward released)."""
        c = self.c
        return sum(int(c.saved_bytes[k - 1]) for k in range(l + 1, j + 1)) + sum(
            self.retained[k] for k in range(l + 1, j)
            if not (backward and self.released_at[k] > j)
        )

    def W_after(self, i: int) -> int:
        return int(self.c.param_grad_bytes[i:].sum())

    def g(self, i: int) -> int:
        """Gradients live when the backward reaches boundary i: a(i)'s and carried ones."""
        carried = 0 if self.c.carried_grad_bytes is None else int(self.c.carried_grad_bytes[i])
        return 0 if i == self.n else int(self.c.grad_bytes[i]) + carried  # g(n) is in `held`

    def valid(self, checkpoints) -> bool:
        """Whether every activation live at a checkpoint was made at a kept boundary or before."""
        bounds = [0, *checkpoints, self.n]
        return all(
            self.d[m] < r for l, r in zip(bounds[:-1], bounds[1:]) for m in range(l + 1, r)
        ) and all(self.first[l] <= r for l, r in zip(bounds[:-2], bounds[1:-1])) and not (
            self.c.stranded_bytes and self.n - 1 in checkpoints  # see Chain.stranded_bytes
        )

    def carried_in(self, l: int, k: int, unretained_only: bool) -> int:
        """Activations made in (l, k) still live at boundary k (read further on)."""
        return sum(
            self.a[m] for m in range(l + 1, k)
            if self.d[m] >= k and not (unretained_only and self.retained[m])
        )

    def backward(self, l: int, i: int, a_l_held: int, last: bool) -> int:
        c, a = self.c, self.a
        out = a[i] if (i < self.n and c.saves_output[i - 1]) else 0
        if last and self.pinned and i == self.n - 1:
            out = 0  # the caller's a(n-1), already in `held`
        return (a_l_held + self.held + self.W_after(i) + self.H(l, i, backward=True) + out + self.g(i)
                + int(c.bwd_peak[i - 1]) + self.stranded(i))

    def stranded(self, i: int) -> int:
        """Saved for ignored outputs by stage n-1: live once its backward (before stage i's) ran."""
        return self.c.stranded_bytes if i < self.n - 1 else 0

    def stop(self, l: int, r: int, whole: bool) -> int:
        """The stage where the recompute of (l, r] stops: with early stop the last one that
        saves anything (l: none), else r."""
        if whole or not self.c.early_stop:
            return r
        return max((i for i in range(l + 1, r + 1) if self.c.saves_any[i - 1]), default=l)

    @functools.cache
    def segment(self, l: int, r: int, last: bool, whole: bool = False) -> int:
        c, a = self.c, self.a
        prev = lambda i: a[i - 1] if i - 1 > l else 0  # noqa: E731  the input of stage i if not a(l)
        peaks = []
        if not last:
            # forward without saving, then the recompute with saving (up to the last saved
            # tensor with early stop), then backward.
            a_l = self.a_in[l]
            for i in range(l + 1, r + 1):
                peaks.append(a_l + prev(i) + self.carried_in(l, i - 1, False) + int(c.fwd_nosave_peak[i - 1])
                             + self.made_before[i])
            extra = self.held + self.W_after(r) + self.g(r) + self.stranded(r)
            peaks.append(a_l + extra)
            j = self.stop(l, r, whole)
            for i in range(l + 1, j + 1):
                stopped = c.early_stop and not whole and i == j
                forward = c.last_save_peak[i - 1] if stopped else c.fwd_save_peak[i - 1]
                peaks.append(a_l + extra + self.H(l, i - 1) + prev(i) + self.carried_in(l, i - 1, True)
                             + int(forward))
            for i in range(l + 1, r + 1):
                peaks.append(self.backward(l, i, a_l, last=False))
            return max(peaks)
        # The last segment: a(l) is held after its first stage only if that stage saves it.
        # A later stage may save it too; otherwise it is live while later stages read it.
        kept = self.a_in[l] if (c.saves_input[l] or self.later[l]) else 0
        if self.pinned and l == self.n - 1:
            kept = 0
        peaks.append(self.a_in[l] + int(c.fwd_save_peak[l]) + self.made_before[l + 1])
        for i in range(l + 2, r + 1):
            read_on = self.a_in[l] if not kept and self.d[l] >= i - 1 else 0
            peaks.append(kept + read_on + self.H(l, i - 1) + a[i - 1] + self.carried_in(l, i - 1, True)
                         + int(c.fwd_save_peak[i - 1]) + self.made_before[i])
        for i in range(l + 1, r + 1):
            peaks.append(self.backward(l, i, kept, last=True))
        return max(peaks)

    def peak(self, checkpoints, offload: bool = False) -> int:
        """With ``offload`` the kept checkpoints wait in host memory: no ``K``
        (a segment's own input, back for its recompute, is in ``segment``)."""
        bounds = [0, *checkpoints, self.n]
        peak = kept = 0
        for l, r in zip(bounds[:-1], bounds[1:]):
            peak = max(peak, kept + self.segment(l, r, r == self.n, offload))
            kept += 0 if offload else self.a_in[l]
        return self.c.base_bytes + peak

    def segment_flops(self, l: int, r: int, whole: bool = False) -> int:
        """A recompute runs stages l+1..j forward again, stage j up to its last saved tensor
        with early stop (offload plans recompute whole segments)."""
        j = self.stop(l, r, whole)
        flops = sum(int(self.c.fwd_flops[i - 1]) for i in range(l + 1, j))
        if j > l:
            stopped = self.c.early_stop and not whole
            flops += int(self.c.last_save_flops[j - 1] if stopped else self.c.fwd_flops[j - 1])
        return flops

    def recompute_flops(self, checkpoints, offload: bool = False) -> int:
        """Every stage before the last segment runs forward twice (early stop aside)."""
        bounds = [0, *checkpoints]
        return sum(self.segment_flops(l, r, offload) for l, r in zip(bounds[:-1], bounds[1:]))

    def best(self, offload: bool = False) -> tuple[int, int]:
        """(peak, recompute FLOPs), lexicographically least over every plan.

        A depth-first enumeration over the next checkpoint, carrying the
        bytes of the checkpoints kept so far (none on the device with
        ``offload``) and the peak so far.
        """
        n, best = self.n, [None]

        def visit(l: int, kept: int, peak: int, flops: int) -> None:
            last = (max(peak, kept + self.segment(l, n, True)), flops)
            if best[0] is None or last < best[0]:
                best[0] = last
            for r in range(l + 1, n):
                if any(self.d[m] >= r for m in range(l + 1, r)) or self.first[l] > r:
                    continue  # r would need an activation made inside (l, r), or (l, r] does not read a(l)
                if self.c.stranded_bytes and r == n - 1:
                    continue  # see Chain.stranded_bytes
                seg_flops = flops + self.segment_flops(l, r, offload)
                segment = kept + self.segment(l, r, False, offload)
                visit(r, kept + (0 if offload else self.a_in[l]), max(peak, segment), seg_flops)

        visit(0, 0, 0, 0)
        return self.c.base_bytes + best[0][0], best[0][1]


@pytest.fixture(scope="module")
def chains():
    return random_chains()


def test_reference_matches_peak_of_on_a_sample(chains):
    """The reference and ``peak_of`` agree (sampled plans of every chain), with and without offload."""
    rng = random.Random(0)
    for chain in chains:
        ref = Reference(chain)
        plans = list(all_plans(chain.n))
        for cps in rng.sample(plans, min(4, len(plans))):
            assert ref.peak(cps) == peak_of(chain, cps), (chain.n, cps)
            assert ref.recompute_flops(cps) == recompute_flops_of(chain, cps)
            assert ref.peak(cps, offload=True) == peak_of(chain, cps, offload=True), (chain.n, cps)
            # Offloading only takes bytes off the device.
            assert peak_of(chain, cps, offload=True) <= peak_of(chain, cps)


@pytest.mark.parametrize("method", METHODS)
def test_solvers_find_the_exhaustive_optimum(chains, method):
    """Both methods: least (peak, recompute) over every plan of 600 random chains."""
    for chain in chains:
        sol = min_peak(chain, method)
        assert (sol.peak_bytes, sol.recompute_flops) == Reference(chain).best(), (chain.n, sol)
        assert sol.peak_bytes == peak_of(chain, sol.checkpoints)
        assert sol.recompute_flops == recompute_flops_of(chain, sol.checkpoints)
        assert sol.method == method


@pytest.mark.heavy
def test_solvers_match_literal_enumeration_with_peak_of(chains):
    """Every plan of every chain through ``peak_of`` itself (minutes)."""
    for chain in chains:
        ref = Reference(chain)
        best = None
        for cps in all_plans(chain.n):
            peak = peak_of(chain, cps)
            assert peak == ref.peak(cps), (chain.n, cps)
            key = (peak, recompute_flops_of(chain, cps))
            best = key if best is None or key < best else best
        for method in METHODS:
            sol = min_peak(chain, method)
            assert (sol.peak_bytes, sol.recompute_flops) == best


# -- hand-made chains -----------------------------------------------------------

KiB = 1024


def make_chain(n, act, *, saves_input=None, saves_output=None, saved=None, temp=None, bwd=None,
               params=None, flops=None, base=0, output_held=False):
    """A chain from short lists; gradients are the size of their activation (g(0) = 0)."""
    saved = saved or [0] * n
    temp = temp or [0] * n
    grad = [0, *act[1:]]
    return Chain.from_arrays(
        act_bytes=act,
        grad_bytes=grad,
        fwd_nosave_peak=[act[i + 1] + temp[i] for i in range(n)],
        fwd_save_peak=[act[i + 1] + saved[i] + temp[i] for i in range(n)],
        saved_bytes=saved,
        saves_input=saves_input or [False] * n,
        saves_output=saves_output or [False] * n,
        bwd_peak=bwd or [act[i] for i in range(n)],
        param_grad_bytes=params or [0] * n,
        fwd_flops=flops or [1] * n,
        bwd_flops=[2] * n,
        base_bytes=base,
        output_held=output_held,
    )


def test_three_identical_stages_that_save_their_input():
    # act = [x, 4, 4, 4] KiB, x = 4 KiB in base; each stage saves its input;
    # backward of stage i makes g(i-1) (4 KiB, bwd_peak = a(i-1)); no params.
    # Loss-free chain, so held = a(3) + g(3) = 8 KiB.
    # Store all: stage 1 saves a(0) (the caller's), stage 2 a(1), stage 3 a(2).
    #   backward of 3: held 8 + H(0,3) = a1 + a2 = 8 + g(3) counted in held, bwd 4 -> 20 KiB
    #   (+ base 4 = 24 KiB).
    # Checkpoint at 2: last segment (2,3]: a(2) kept (stage 3 saves it):
    #   kept a(2) 4 + held 8 + bwd 4 = 16; recompute segment (0,2] on top of K = 0:
    #   recompute of stage 2: a(0)=0 + held 8 + g(2) 4 + H(0,1) = a1 4 + fwd 4 = 20;
    #   backward of 2: held 8 + H(0,2) = a1 4 + g(2) 4 + bwd 4 = 20. Peak 20 (+4).
    # Checkpoint at 1: (1,3] last: kept a1 4 + H(1,2)... backward of 3: 4 + 8 + a2 4 + 4 = 20.
    chain = make_chain(3, [4 * KiB] * 4, saves_input=[True] * 3, base=4 * KiB)
    assert peak_of(chain, []) == 24 * KiB
    assert peak_of(chain, [2]) == 24 * KiB
    assert peak_of(chain, [1]) == 24 * KiB
    # With nothing better than storing all, the solvers keep no checkpoint (no recompute).
    for method in METHODS:
        assert min_peak(chain, method).checkpoints == ()
        assert min_peak(chain, method).recompute_flops == 0


def test_stage_that_saves_nothing():
    # Two stages that save nothing (a ReLU-free scale by a constant, say):
    # act = [0, 8, 2] KiB (input not counted), no params.
    # Store all: forward of 1: 8; forward of 2: a1 8 + fwd_save 2 = 10;
    #   backward of 2: held a2 + g2 = 4, + bwd a1 = 8 -> 12; backward of 1:
    #   held 4 + g(1) 8 + bwd a(0) 0 -> 12. Peak 12 KiB.
    chain = make_chain(2, [0, 8 * KiB, 2 * KiB])
    assert peak_of(chain, []) == 12 * KiB
    # Checkpoint at 1: the recompute of stage 1 happens in backward, next to held
    # a2 + g2 = 4 and g(1) = 8: 4 + 8 + the recomputed a(1) 8 = 20 KiB. Worse.
    assert peak_of(chain, [1]) == 20 * KiB
    assert min_peak(chain).checkpoints == ()


def test_large_internal_temporary_is_only_transient():
    # Stage 2 allocates a 100 KiB temporary freed before it returns; nothing saved
    # (a fused kernel's workspace). act = [0, 1, 1, 1] KiB; stages save their input.
    # Forward of 2: a1 1 + a1 as retained ... = a(1) 1 + fwd 1 + 100 = 102 KiB peak,
    # whatever the plan (the temporary is there in forward and in any recompute).
    chain = make_chain(3, [0, KiB, KiB, KiB], saves_input=[True] * 3, temp=[0, 100 * KiB, 0])
    assert peak_of(chain, []) == 102 * KiB
    # Recomputing stage 2 runs the temporary again, on top of held a(3)+g(3) = 2 KiB
    # and g(2) = 1 KiB: 1 (a1, input) + 2 + 1 + 101 = 105 KiB, worse.
    assert peak_of(chain, [2]) == 105 * KiB
    assert min_peak(chain, "dp").checkpoints == min_peak(chain, "linear").checkpoints == ()


def test_large_saved_internal_is_what_checkpointing_removes():
    # Four stages, each saving a 16 KiB internal tensor, act = 1 KiB everywhere,
    # stages save their input. Storing all holds 4 x 16 KiB at the last backward.
    # backward of 4 (store all): held a4 + g4 = 2, H(0,4) = 64 + a1 + a2 + a3 = 67,
    #   g(4) in held, bwd a(3) = 1: 70 KiB.
    # Checkpoint at 2: last segment (2,4]: kept a2 1 + held 2 + H(2,4) = 32 + a3 1
    #   + bwd 1 = 37. Recompute (0,2]: backward of 2: held 2 + W 0 + H(0,2) 32 + a1 1
    #   + g(2) 1 + bwd 1 = 37. Both 37 KiB; K before (0,2] is 0.
    act = [0] + [KiB] * 4
    chain = make_chain(4, act, saves_input=[True] * 4, saved=[16 * KiB] * 4)
    assert peak_of(chain, []) == 70 * KiB
    assert peak_of(chain, [2]) == 37 * KiB
    for method in METHODS:
        sol = min_peak(chain, method)
        assert sol.peak_bytes <= 37 * KiB < store_all(chain).peak_bytes


# -- validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    "checkpoints", [[0], [5], [3, 2], [2, 2], [-1], [1, 6]],
)
def test_bad_checkpoints_are_rejected_clearly(checkpoints):
    chain = random_chain(5, seed=1)
    with pytest.raises(ValueError, match=r"distinct sorted stage indices in 1\.\.4"):
        peak_of(chain, checkpoints)
    with pytest.raises(ValueError, match="distinct sorted"):
        recompute_flops_of(chain, checkpoints)


def test_bad_shapes_are_rejected_clearly():
    good = random_chain(4, seed=0)
    arrays = {f: getattr(good, f) for f in good.__dataclass_fields__ if isinstance(getattr(good, f), np.ndarray)}
    with pytest.raises(ValueError, match=r"Chain\.act_bytes has shape \(4,\), expected \(5,\)"):
        Chain(**{**arrays, "act_bytes": good.act_bytes[:-1]})
    with pytest.raises(ValueError, match=r"Chain\.bwd_peak has shape \(5,\), expected \(4,\)"):
        Chain(**{**arrays, "bwd_peak": np.zeros(5, dtype=np.int64)})
    with pytest.raises(ValueError, match="at least one stage"):
        Chain(**{k: v[:1] if k in ("act_bytes", "grad_bytes") else v[:0] for k, v in arrays.items()})


def test_bad_method_and_k_are_rejected():
    chain = random_chain(4, seed=0)
    with pytest.raises(ValueError, match="unknown method 'greedy'"):
        min_peak(chain, "greedy")
    with pytest.raises(ValueError, match="k must be >= 1"):
        uniform_segments(chain, 0)


# -- baselines ------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 50, 200])
def test_baselines_are_valid_and_never_beat_the_solvers(n):
    for seed in range(5):
        chain = random_chain(n, seed)
        assert store_all(chain).peak_bytes == peak_of(chain, [])
        assert store_all(chain).checkpoints == ()
        baselines = [store_all(chain), sqrt_segments(chain)] + [uniform_segments(chain, k) for k in (1, 2, 3, 5, 8)]
        for base in baselines:
            # a valid plan (peak_of validates it) whose figures are consistent
            assert base.peak_bytes == peak_of(chain, base.checkpoints)
            assert base.recompute_flops == recompute_flops_of(chain, base.checkpoints)
        k = max(1, round(n**0.5))
        assert len(sqrt_segments(chain).checkpoints) == min(k, n) - 1
        for method in METHODS:
            best = min_peak(chain, method).peak_bytes
            assert all(best <= base.peak_bytes for base in baselines)


# -- multi-tensor boundaries (activations read past the next stage) ---------------


def carried_chains():
    """300 random chains whose activations stay live for up to 4 more stages."""
    return [random_chain(1 + seed % 12, seed, carried=True) for seed in range(300)]


def assert_reference_matches_peak_of(chains, seed: int) -> int:
    """The reference and ``peak_of`` agree on up to 6 sampled valid plans of each chain;
    returns how many plans were checked."""
    rng = random.Random(seed)
    checked = 0
    for chain in chains:
        ref = Reference(chain)
        plans = [cps for cps in all_plans(chain.n) if ref.valid(cps)]
        for cps in rng.sample(plans, min(6, len(plans))):
            assert ref.peak(cps) == peak_of(chain, cps), (chain.n, cps)
            checked += 1
    return checked


def test_reference_matches_peak_of_with_carried_activations():
    assert assert_reference_matches_peak_of(carried_chains(), seed=1) > 1000


def test_plans_that_drop_a_carried_activation_are_refused():
    # a(1) is read up to stage 3 (live at boundaries 1 and 2): keeping 2 alone
    # would need a(1), made inside the segment (0, 2].
    chain = dataclasses.replace(
        random_chain(4, seed=0), live_until=np.array([0, 2, 2, 3, 4]), later_saver=None, carried_grad_bytes=None
    )
    with pytest.raises(ValueError, match=r"checkpoint 2 needs a\(1\).*keep 1 too"):
        peak_of(chain, [2])
    assert peak_of(chain, [1, 2]) > 0
    for method in METHODS:
        assert 2 not in min_peak(chain, method).checkpoints or 1 in min_peak(chain, method).checkpoints


def assert_budgets_exact(chains, budgets: int) -> None:
    """At each chain's ``budgets`` lowest plan peaks, ``min_recompute`` fits and recomputes
    the least of every plan that fits (the reference's enumeration)."""
    for chain in chains:
        ref = Reference(chain)
        plans = [(ref.peak(cps), ref.recompute_flops(cps)) for cps in all_plans(chain.n) if ref.valid(cps)]
        for budget in sorted({peak for peak, _ in plans})[:budgets]:
            sol = min_recompute(chain, budget)
            best = min(flops for peak, flops in plans if peak <= budget)
            assert sol is not None and sol.peak_bytes <= budget and sol.recompute_flops == best, (chain.n, budget)


def test_budget_solver_is_exact_with_carried_activations():
    assert_budgets_exact(carried_chains()[::3], 4)


# -- caller-held boundaries: model outputs that later stages read (an encoder's output) --


def held_chains():
    """200 plain and carried random chains of 3-12 stages, the caller holding 1 or 2 of their boundaries."""
    chains = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        chain = random_chain(3 + seed % 10, seed, carried=seed % 2 == 1, early_stop=seed % 3 == 0)
        held = rng.choice(np.arange(1, chain.n - 1), size=min(1 + seed % 2, chain.n - 2), replace=False)
        chains.append(chain.holding(sorted(int(m) for m in held)))
    return chains


def test_reference_matches_peak_of_with_caller_held_boundaries():
    assert assert_reference_matches_peak_of(held_chains(), seed=3) > 800


@pytest.mark.parametrize("method", METHODS)
def test_solvers_find_the_exhaustive_optimum_with_caller_held_boundaries(method):
    for chain in held_chains():
        sol = min_peak(chain, method)
        assert (sol.peak_bytes, sol.recompute_flops) == Reference(chain).best(), (chain.n, sol)


def test_budget_solver_is_exact_with_caller_held_boundaries():
    assert_budgets_exact(held_chains()[::4], 4)


def test_a_caller_held_boundary_is_never_made_again():
    # The caller holds a(2) of a 5-stage chain: a recomputed segment through it would make a
    # second copy, so a plan that keeps a later boundary keeps 2.
    chain = random_chain(5, seed=4).holding([2])
    with pytest.raises(ValueError, match=r"checkpoint 3 needs a\(2\).*keep 2 too"):
        peak_of(chain, [1, 3])
    assert peak_of(chain, [1, 2, 3]) > 0
    # It counts once however it is kept, from its forward to the end of the step.
    assert peak_of(chain, [2]) == Reference(chain).peak([2])
    with pytest.raises(ValueError, match="caller-held boundaries must lie in 1..3"):
        random_chain(5, seed=4).holding([4])


# -- stranded bytes: what the last model stage saves for outputs the loss ignores --


def stranded_chains():
    """100 plain and carried random chains whose stage n-1 leaves 1-4 of its outputs' sizes stranded."""
    chains = [*random_chains()[:50], *carried_chains()[:50]]
    return [
        dataclasses.replace(chain, stranded_bytes=int(chain.act_bytes[-2]) * (1 + seed % 4))
        for seed, chain in enumerate(chains)
    ]


def test_reference_matches_peak_of_with_stranded_bytes():
    rng = random.Random(2)
    for chain in stranded_chains():
        ref = Reference(chain)
        plans = [cps for cps in all_plans(chain.n) if ref.valid(cps)]
        plain = dataclasses.replace(chain, stranded_bytes=0)
        for cps in rng.sample(plans, min(6, len(plans))):
            assert ref.peak(cps) == peak_of(chain, cps) >= peak_of(plain, cps), (chain.n, cps)
            if not chain.carries:  # offload plans cut at single tensors
                assert ref.peak(cps, offload=True) == peak_of(chain, cps, offload=True), (chain.n, cps)


def test_a_stage_with_ignored_outputs_is_never_recomputed():
    """Its checkpoint would be kept alive to the end of the step by the ignored outputs' graph."""
    chain = next(c for c in stranded_chains() if c.n >= 4 and not c.carries)
    last = chain.n - 1
    assert last not in min_peak(chain).checkpoints and last not in single_tensor_boundaries(chain)
    with pytest.raises(ValueError, match="partly ignores"):
        peak_of(chain, [last])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["carried", "stranded"])
def test_solvers_find_the_exhaustive_optimum_with_carried_activations_or_stranded_bytes(family, method):
    for chain in {"carried": carried_chains, "stranded": stranded_chains}[family]():
        ref = Reference(chain)
        sol = min_peak(chain, method)
        assert (sol.peak_bytes, sol.recompute_flops) == ref.best(), (chain.n, sol)
        assert ref.valid(sol.checkpoints)
        if not chain.carries:  # offload plans cut at single tensors
            assert min_peak(chain, offload=True).peak_bytes == ref.best(offload=True)[0]


# -- early stop: a recompute ends at its segment's last saved tensor ----------------


def early_stop_chains():
    """300 plain and 150 carried random chains whose recomputes stop early."""
    return [
        *(random_chain(1 + seed % 14, seed, early_stop=True) for seed in range(300)),
        *(random_chain(1 + seed % 12, seed, carried=True, early_stop=True) for seed in range(150)),
    ]


def test_reference_matches_peak_of_with_early_stop():
    """And early stop only lowers a plan's peak and recompute; offload plans recompute whole."""
    rng = random.Random(3)
    for chain in early_stop_chains():
        ref, whole = Reference(chain), chain.without_early_stop()
        plans = [cps for cps in all_plans(chain.n) if ref.valid(cps)]
        for cps in rng.sample(plans, min(6, len(plans))):
            assert ref.peak(cps) == peak_of(chain, cps) <= peak_of(whole, cps), (chain.n, cps)
            assert ref.recompute_flops(cps) == recompute_flops_of(chain, cps) <= recompute_flops_of(whole, cps)
            if not chain.carries:
                assert peak_of(chain, cps, offload=True) == peak_of(whole, cps, offload=True) == ref.peak(cps, True)


@pytest.mark.parametrize("method", METHODS)
def test_solvers_find_the_exhaustive_optimum_with_early_stop(method):
    for chain in early_stop_chains():
        sol = min_peak(chain, method)
        assert (sol.peak_bytes, sol.recompute_flops) == Reference(chain).best(), (chain.n, sol)
        assert sol.peak_bytes == peak_of(chain, sol.checkpoints)


def test_budget_solver_is_exact_with_early_stop():
    """The least recompute within a budget, where it depends on where every segment ends."""
    assert_budgets_exact(early_stop_chains()[::4], 6)


def test_least_peak_with_the_fastest_recompute():
    """With the device's rates, ties at the least peak go to the plan whose recomputes (and
    one region each) are predicted fastest: fewer, longer segments where regions cost more
    than the FLOPs they save."""
    speed = Speed(flops_per_second=1e9, bytes_per_second=1e9, seconds_per_op=0.0, seconds_per_region=1e-3,
                  seconds_per_intercepted_op=0.0, seconds_per_recorded_op=0.0)
    differs = 0
    for chain in early_stop_chains()[:300:3]:
        ref = Reference(chain)
        plans = [cps for cps in all_plans(chain.n) if ref.valid(cps)]
        least = min(ref.peak(cps) for cps in plans)
        bounds = lambda cps: list(zip((0, *cps), cps))  # noqa: E731  the recomputed segments

        def seconds(cps):
            return sum(round(1e9 * (ref.segment_flops(l, r) / 1e9 + 1e-3)) for l, r in bounds(cps))

        fastest = min(seconds(cps) for cps in plans if ref.peak(cps) == least)
        for method in METHODS:
            sol = min_peak(chain, method, speed=speed)
            assert sol.peak_bytes == least and seconds(sol.checkpoints) == fastest, (chain.n, sol)
        differs += seconds(min_peak(chain).checkpoints) > fastest
    assert differs


# -- offload: kept activations in host memory ------------------------------------


def test_offload_solver_finds_the_exhaustive_optimum(chains):
    """The O(n^2) offload DP: least (peak, recompute) over every plan of 600 random chains."""
    fewer = 0
    for chain in chains:
        sol = min_peak(chain, offload=True)
        assert (sol.peak_bytes, sol.recompute_flops) == Reference(chain).best(offload=True), (chain.n, sol)
        assert sol.peak_bytes == peak_of(chain, sol.checkpoints, offload=True)
        assert sol.method == "offload_dp"
        plain = min_peak(chain).peak_bytes
        assert sol.peak_bytes <= plain
        fewer += sol.peak_bytes < plain
    assert fewer > len(chains) // 10  # offload matters on many chains, so the test has teeth


def test_offload_least_recompute_within_a_budget_and_front():
    """``min_recompute`` and ``pareto_front`` with offload against every plan (small chains)."""
    for seed in range(60):
        chain = random_chain(2 + seed % 9, seed)
        plans = [(peak_of(chain, c, offload=True), recompute_flops_of(chain, c)) for c in all_plans(chain.n)]
        front = pareto_front(chain, offload=True)
        for sol in front:
            best = min(f for p, f in plans if p <= sol.peak_bytes)
            assert sol.recompute_flops == best
            assert sol.peak_bytes == peak_of(chain, sol.checkpoints, offload=True)
        assert front[-1].peak_bytes == min(p for p, _ in plans)
        assert [s.peak_bytes for s in front] == sorted({s.peak_bytes for s in front}, reverse=True)
        assert min_recompute(chain, front[-1].peak_bytes - 1, offload=True) is None


def test_offload_takes_earlier_checkpoints_off_the_device():
    # The four-stage chain above (1 KiB activations, 16 KiB saved inside each
    # stage, each stage saves its input), every boundary kept: (1, 2, 3).
    # On the device, the last segment (3,4] runs over K = a1 + a2 = 2 KiB:
    #   backward of 4: kept a3 1 + held a4 + g4 2 + H(3,4) 16 + bwd 1 = 20, + K = 22 KiB.
    # Offloaded, K = 0 everywhere; the worst is segment (2,3]: its recompute
    #   (a2 1 back from the host + held 2 + g(3) 1 + fwd_save 17 = 21 KiB) and
    #   its backward (a2, saved by stage 3, 1 + held 2 + H(2,3) 16 + g(3) 1 + bwd 1 = 21 KiB).
    act = [0] + [KiB] * 4
    chain = make_chain(4, act, saves_input=[True] * 4, saved=[16 * KiB] * 4)
    assert peak_of(chain, [1, 2, 3]) == 22 * KiB
    assert peak_of(chain, [1, 2, 3], offload=True) == 21 * KiB
    assert min_peak(chain, offload=True).checkpoints == (1, 2, 3)
    assert min_peak(chain, offload=True).peak_bytes == 21 * KiB
