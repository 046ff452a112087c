"""Prefix arrays over a chain that make every segment's local cost an O(1) range max."""

from __future__ import annotations

import array
import functools

import numpy as np

from remat.chain.model import Chain
from remat.chain.time import Speed, Work

UNREACHABLE = np.iinfo(np.int64).max // 4
#: Chains of at most this many stages cache the rows their solvers ask for (each row
#: O(n) int64, n of them per kind: 4 MiB at 1000 stages). A row does not depend on the
#: limit, and a walk down the Pareto front solves the same terms at every budget.
CACHED_ROWS_STAGES = 1000

__all__ = ["SegmentTerms", "UNREACHABLE", "selective_terms_of"]


def _cached_row(row):
    """A row method of :class:`SegmentTerms`, its results cached (read-only) on chains of at most
    :data:`CACHED_ROWS_STAGES` stages."""

    @functools.wraps(row)
    def cached(self: SegmentTerms, *args):
        if self.n > CACHED_ROWS_STAGES:
            return row(self, *args)
        key = (row.__name__, *args)
        if key not in self._rows:
            value = row(self, *args)
            for part in value if isinstance(value, tuple) else (value,):
                if isinstance(part, np.ndarray):
                    part.flags.writeable = False
            self._rows[key] = value
        return self._rows[key]

    return cached


class SegmentTerms:
    """Prefix arrays that make every segment's local cost an O(1) range max.

    Index conventions: stage ``i`` is 1-based; arrays below are padded so that
    ``x[i]`` is stage ``i``'s value.
    """

    def __init__(self, chain: Chain):
        n = chain.n
        self._rows: dict[tuple, object] = {}  # see _cached_row
        # A caller-held a(m) (Chain.caller_held) is live from its forward to the end of the step
        # whatever the plan: never counted as kept, retained or live, but in every moment after
        # it is made, `made_before` in the first forward, `held` from then on.
        held_bytes = chain.held_bytes
        a = chain.act_bytes.astype(np.int64) - held_bytes
        g = chain.grad_bytes.astype(np.int64)
        pad = lambda v: np.concatenate([[0], np.asarray(v, dtype=np.int64)])  # noqa: E731
        made_before = np.concatenate([[0], np.cumsum(held_bytes)[:n]])  # per stage i: held a(m), m < i
        self.n = n
        self.a = a
        self.a_in = a.copy()
        self.a_in[0] = 0  # the input belongs to the caller: counted in base_bytes
        self.f_ns = pad(chain.fwd_nosave_peak) + made_before  # run only in the first forward
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
        self.held = int(a[n] + g[n]) + (int(a[n - 1]) if pinned else 0) + int(held_bytes.sum())
        if chain.carried_grad_bytes is not None:
            g = g + chain.carried_grad_bytes  # every gradient live at the boundary
        g_bw = g.copy()
        g_bw[n] = 0
        # Per-stage terms (index i = stage, entry 0 unused).
        self.T_ns = np.zeros(n + 1, dtype=np.int64)
        self.T_rc = np.zeros(n + 1, dtype=np.int64)
        self.T_ns[1:] = a[:-1] + self.f_ns[1:]
        self.T_rc[1:] = self.HH[:-1] + a[:-1] + self.f_s[1:]
        # The same stages run saving in the first forward (the last segment, stored segments).
        self.f_first = self.f_s + made_before
        self.T_first = self.T_rc + made_before
        self.T_bw = w_after + self.HH + out_kept + g_bw + pad(chain.bwd_peak)
        self.T_bw[0] = 0
        # Early stop: the recompute of a segment ending at r stops in stage J[r], the last
        # stage up to r that saves anything (0: none), at its last saved tensor, having run
        # work_stop[.][J[r]] of its work and peaked at f_stop[J[r]]. Without it, J[r] = r and
        # a stage runs whole.
        self.early_stop = chain.early_stop
        self.J = chain.last_savers()
        # What a recompute runs, per kind of work (see remat.chain.time.Work): prefix sums over
        # the stages, and each stage's part up to its last saved tensor.
        zeros = np.zeros(n, dtype=np.int64)
        whole = [chain.fwd_flops] + [
            zeros if w is None else w for w in (chain.fwd_ops, chain.fwd_written_bytes, chain.fwd_norm_bytes)
        ]
        stopped = [chain.last_save_flops, chain.last_save_ops, chain.last_save_written_bytes, chain.last_save_norm_bytes]
        self.work_prefix = [np.concatenate([[0], np.cumsum(w)]).astype(np.int64) for w in whole]
        self.work_stop = [pad(w) for w in (stopped if chain.early_stop else whole)]
        self.f_stop = pad(chain.last_save_peak) if chain.early_stop else self.f_s
        self.T_stop = np.zeros(n + 1, dtype=np.int64)
        self.T_stop[1:] = self.HH[:-1] + a[:-1] + self.f_stop[1:]
        # Extra held while a segment ending at r is recomputed.
        self.E = self.held + w_after + g
        # After stage n-1's backward (recomputed or not), what it saved for ignored outputs stays.
        self.T_bw[1 : n - 1] += chain.stranded_bytes
        self.E[: n - 1] += chain.stranded_bytes
        if chain.stranded_bytes and n >= 2:
            # Stage n-1 is never recomputed then: the ignored outputs' graph would keep the
            # checkpoint, and with it the segment input, alive to the end of the step.
            self.E[n - 1] = UNREACHABLE
        # S(l), the local cost of the last segment (l, n], for every l at once.
        suffix_max = lambda t: np.maximum.accumulate(t[::-1])[::-1]  # noqa: E731
        rc_after = np.concatenate([suffix_max(self.T_first[2:]), [0, 0]])[: n + 1]  # max T_first[l+2..n]
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
            self.S = np.maximum(self.a_in[:n] + self.f_first[1 : n + 1], kept + tail)
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
        self.first_reader = bounds + 1 if chain.first_reader is None else chain.first_reader.astype(np.int64)
        # The last segment holds a(l) if a later stage saves it, else only while it is read.
        kept = np.where(later[:n], self.a_in[:n], kept)
        S = np.empty(n, dtype=np.int64)
        for l in range(n):
            live = self.in_segment(l, self.unretained)
            if not kept[l]:
                live[l + 1 : self.live_until[l] + 1] += self.a_in[l]
            rc = (self.T_first[l + 2 : n + 1] + live[l + 1 : n]).max(initial=np.iinfo(np.int64).min // 4)
            bw = (T_bw_last[l + 1 : n + 1] - self.released_early(l)[l + 1 : n + 1]).max()
            tail = max(rc - self.Q[l], self.held + bw - self.Q[l])
            S[l] = max(self.a_in[l] + self.f_first[l + 1], kept[l] + tail)
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
        and one of its stages reads a(l)."""
        return not self.carries or (self.lo[r] <= l and self.first_reader[l] <= r)

    # Local costs, each including the segment input a(l) where it is held.
    def recompute_segment(self, l: int, r: int) -> int:
        """Peak of segment (l, r] (forward without saving, recompute, backward)."""
        if not self.allowed(l, r):
            return UNREACHABLE
        return max(int(self.a_in[l]) + self.forward_unsaved(l, r), self.recompute_phase(l, r))

    def forward_unsaved(self, l: int, r: int) -> int:
        """Peak of stages l+1..r run forward without saving, over what is held before (a(l) excluded)."""
        T_ns = self.T_ns[l + 2 : r + 1]
        if self.carries:  # the l-dependent term; O(n), so only where it can be nonzero
            T_ns = T_ns + self.in_segment(l, self.a_in)[l + 1 : r]
        return int(max(self.f_ns[l + 1], T_ns.max(initial=0)))

    def recompute_phase(self, l: int, r: int) -> int:
        """Peak of segment (l, r]'s recompute (saving) and backward, a(l) held throughout."""
        T_bw = self.T_bw[l + 1 : r + 1]
        if self.carries:
            T_bw = T_bw - self.released_early(l)[l + 1 : r + 1]
        bw = T_bw.max() - self.Q[l]
        return int(self.a_in[l]) + int(max(self.E[r] + self.recompute_part(l, r), self.held + bw))

    def recompute_part(self, l: int, r: int) -> int:
        """Peak of segment (l, r]'s recompute over what is held while it runs (a(l) and
        ``E[r]`` aside): stages l+1..J[r]-1 whole, stage J[r] up to its last saved tensor."""
        j = int(self.J[r])
        if j <= l:
            return 0  # nothing in the segment saves anything: nothing runs again
        if j == l + 1:
            return int(self.f_stop[j])
        stop = int(self.T_stop[j])
        if self.carries:
            live = self.in_segment(l, self.unretained)
            prior = int((self.T_rc[l + 2 : j] + live[l + 1 : j - 1]).max(initial=-UNREACHABLE))
            stop += int(live[j - 1])
        else:
            prior = self.range_max[1].query(l + 2, j - 1)  # O(1); 0 when empty, as the terms are >= 0
        return int(max(self.f_s[l + 1], max(prior, stop) - self.Q[l]))

    def recompute_flops(self, l: int, r: int) -> int:
        """FLOPs of segment (l, r]'s recompute (see :meth:`recompute_part`)."""
        j = int(self.J[r])
        flops, stop = self.work_prefix[0], self.work_stop[0]
        return 0 if j <= l else int(flops[j - 1] - flops[l] + stop[j])

    def run_inside(self, c: int, r: int) -> int:
        """Peak of stages c+1..r run normally (saving, then backward) inside the recompute
        of a segment that ends at r: the last part of a nested recompute. a(c) is held
        only while stage c+1 runs, or longer if it saves it (plain chains)."""
        kept = int(self.a_in[c]) if self.keeps_in[c + 1] else 0
        rc = int(self.T_rc[c + 2 : r + 1].max(initial=-UNREACHABLE)) - int(self.Q[c])
        bw = self.held + int(self.T_bw[c + 1 : r + 1].max()) - int(self.Q[c])
        E = int(self.E[r])
        return max(E + int(self.a_in[c] + self.f_s[c + 1]), kept + max(E + rc, bw))

    def stored_segment(self, l: int, r: int) -> tuple[int, int]:
        """Peak of a stored middle segment (l, r] (run normally), and the bytes it keeps until its backward.

        The kept bytes leave out ``a(r)``: the recomputed segment that must
        follow holds it as its input.
        """
        peaks, keeps = self.stored_row(l)
        return int(peaks[r - l - 1]), int(keeps[r - l - 1])

    @_cached_row
    def stored_row(self, l: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`stored_segment` ``(l, r)`` for all ``r`` in ``l+1..n-2`` (vectorised)."""
        n = self.n
        if l + 1 > n - 2:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        kept = int(self.a_in[l]) if self.keeps_in[l + 1] else 0
        cm = np.maximum.accumulate
        rc = np.concatenate([[0], np.maximum(cm(self.T_first[l + 2 : n - 1]), 0)])  # max T_first[l+2..r], at least 0
        fwd = np.maximum(int(self.a_in[l] + self.f_first[l + 1]), kept + rc - self.Q[l])
        bw = kept + self.held + cm(self.T_bw_last[l + 1 : n - 1]) - self.Q[l]
        return np.maximum(fwd, bw), kept + self.HH[l + 1 : n - 1] - self.Q[l]

    @functools.cached_property
    def lists(self) -> tuple[list[int], ...]:
        """Per-stage arrays as Python lists, for the scalar loop of the queue."""
        arrays = (self.a_in, self.f_ns, self.Q, self.E, self.T_ns, self.T_bw)
        return tuple(_as_array(x) for x in arrays)

    @functools.cached_property
    def range_max(self) -> tuple[_SparseMax, _SparseMax, _SparseMax]:
        return _SparseMax(self.T_ns), _SparseMax(self.T_rc), _SparseMax(self.T_bw)

    def last_segment(self, l: int) -> int:
        """Peak of the last segment (l, n], run normally."""
        return int(self.S[l])

    @_cached_row
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
        rc = self._recompute_parts(l, T_rc)
        T_bw = self.T_bw[l + 1 : n + 1]
        if self.carries:
            T_bw = T_bw - self.released_early(l)[l + 1 : n + 1]
        bw = cm(T_bw) - self.Q[l]
        r = np.arange(l + 1, n + 1)
        recompute = a_l + np.maximum(np.maximum(fns, self.E[r] + rc), self.held + bw)
        if self.carries:
            recompute[(self.lo[r] > l) | (self.first_reader[l] > r)] = UNREACHABLE
        return recompute[:-1], self.last_segment(l)

    def _recompute_parts(self, l: int, T_rc: np.ndarray) -> np.ndarray:
        """:meth:`recompute_part` ``(l, r)`` for all ``r`` in ``l+1..n``, given ``T_rc`` of
        stages ``l+2..n`` with what the segment carries added."""
        n = self.n
        j = self.J[l + 1 : n + 1]
        k = np.maximum(j - l - 2, 0)  # stage j's index in T_rc, where j >= l + 2
        before = np.concatenate([[-UNREACHABLE], np.maximum.accumulate(T_rc)])  # max of T_rc[:k]
        stop = self.T_stop[j]
        if len(T_rc):
            stop = stop + (T_rc - self.T_rc[l + 2 : n + 1])[k]
        inside = np.maximum(self.f_s[l + 1], np.maximum(before[k], stop) - self.Q[l])
        return np.where(j >= l + 2, inside, np.where(j == l + 1, self.f_stop[j], 0))

    def recompute_flops_row(self, l: int) -> np.ndarray:
        """:meth:`recompute_flops` ``(l, r)`` for all ``r`` in ``l+1..n``."""
        return self._recompute_row(l, 0)

    def recompute_seconds_row(self, l: int, speed: Speed) -> np.ndarray:
        """The predicted time (integer nanoseconds) of the recompute of segment ``(l, r]``, its
        region included, for all ``r`` in ``l+1..n``: what the step-time model adds for it."""
        flops, ops, written, norm = (self._recompute_row(l, k) for k in range(4))
        seconds = speed.seconds(Work(flops=flops, ops=ops, written_bytes=written, norm_bytes=norm, regions=1))
        return np.round(seconds * 1e9).astype(np.int64)

    @_cached_row
    def _recompute_row(self, l: int, kind: int) -> np.ndarray:
        """Work of kind ``kind`` (0 FLOPs, 1 operators, 2 bytes written, 3 of those by
        normalizations) of the recompute of ``(l, r]`` for all ``r`` in ``l+1..n``."""
        j = self.J[l + 1 : self.n + 1]
        prefix, stop = self.work_prefix[kind], self.work_stop[kind]
        return np.where(j > l, prefix[np.maximum(j - 1, 0)] - prefix[l] + stop[j], 0)



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



def selective_terms_of(chain: Chain) -> SegmentTerms | None:
    """The terms of the chain run selectively, if it has selective costs."""
    return SegmentTerms(chain.selective_view()) if chain.has_selective else None
