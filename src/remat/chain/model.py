"""The chain's data types: what profiling measured per stage, and a plan's solution."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Checkpoints nested in recomputed segments: ``(l, r, (c1, .., ck))`` per segment (l, r].
Inner = tuple[tuple[int, int, tuple[int, ...]], ...]

# Arrays with one entry per boundary (0..n) rather than per stage.
_BOUNDARY_FIELDS = (
    "act_bytes", "grad_bytes", "live_until", "later_saver", "carried_grad_bytes", "first_reader", "caller_held",
)
# Per-stage arrays measured again for stages run selectively (``Chain.selective_*``).
_SELECTIVE_FIELDS = ("fwd_save_peak", "saved_bytes", "saves_input", "saves_output", "bwd_peak")
# Per-stage arrays of a recompute that stops at its last saved tensor (``Chain.early_stop``).
_EARLY_STOP_FIELDS = (
    "saves_any", "last_save_peak", "last_save_flops", "last_save_ops", "last_save_written_bytes",
    "last_save_norm_bytes",
)

__all__ = ["Chain", "ChainSolution", "Inner"]


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
        first_reader: the first stage that reads ``a(m)``: ``m + 1``, or a
            later one (T5's position bias, made before the layer norm that
            does not read it). A recomputed segment ``(m, r]`` must reach
            it, so that its checkpoint holds ``a(m)``, as the cost model
            assumes.
        carried_grad_bytes: bytes of the gradients of the activations made
            before ``m`` that are live at boundary ``m``, alive when the
            backward reaches it (each counted once where they share storage).
        caller_held: boundaries ``a(m)``, ``0 < m < n - 1``, that the model
            returns (an encoder's output, which every decoder layer reads):
            the caller holds them from their forward to the end of the step,
            so they are live then whatever the plan, and a recomputed
            segment may not make them again (``live_until[m]`` is ``n - 1``:
            a plan that keeps a later boundary keeps ``m``). ``None``: none.
        stranded_bytes: what stage ``n - 1`` saves for model outputs the
            loss ignores: their backward never runs, so these bytes stay
            from that stage's backward to the end of the step. A chain
            with some has no checkpoint at ``n - 1``: the recompute of stage
            ``n - 1`` would save them again, and its checkpoint would keep its
            input alive with them.
        held_output_bwd_peak: stage ``n - 1``'s ``bwd_peak`` when it runs
            in the last segment, where the caller holds its outputs through
            the backward (``None``: the same as recomputed).
        fwd_ops / fwd_written_bytes / fwd_norm_bytes: operators a stage's
            forward runs, the bytes they write and the part of those
            normalizations write; fwd_cheap_ops / fwd_cheap_written_bytes:
            the part of operators without FLOPs (the step-time model,
            :mod:`remat.chain.time`; ``None`` where not measured).
        selective_*: the same quantities for each stage run *selectively*
            (:func:`remat.execute.engine.run_selective`): its forward keeps its
            input and the outputs of the operators that have FLOPs, and
            its backward first recomputes the rest, at no FLOPs. Only
            stored and last segments run so (``ChainSolution.selective``);
            ``None`` where not measured (no such plans then). The last
            segment runs selectively only if stage ``n - 1`` strands as much
            either way (``selective_stranded_bytes``): the other segments'
            costs count what it strands.
        saves_any / last_save_*: whether the stage saves anything for
            backward, and its forward with saving up to its last saved tensor:
            the peak of new bytes by then, and the FLOPs, operators, bytes
            written and bytes normalizations wrote by then. A recompute stops there, in the last stage of
            its segment that saves anything (NOTE [early stop] in
            :mod:`remat.execute.engine`); ``None`` where not measured: the
            recompute then runs whole segments (``early_stop`` false).
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
    first_reader: np.ndarray | None = None
    caller_held: np.ndarray | None = None
    stranded_bytes: int = 0
    held_output_bwd_peak: int | None = None
    selective_fwd_save_peak: np.ndarray | None = None
    selective_saved_bytes: np.ndarray | None = None
    selective_saves_input: np.ndarray | None = None
    selective_saves_output: np.ndarray | None = None
    selective_bwd_peak: np.ndarray | None = None
    selective_held_output_bwd_peak: int | None = None
    selective_stranded_bytes: int = 0
    fwd_ops: np.ndarray | None = None
    fwd_written_bytes: np.ndarray | None = None
    fwd_cheap_ops: np.ndarray | None = None
    fwd_cheap_written_bytes: np.ndarray | None = None
    fwd_norm_bytes: np.ndarray | None = None
    saves_any: np.ndarray | None = None
    last_save_peak: np.ndarray | None = None
    last_save_flops: np.ndarray | None = None
    last_save_ops: np.ndarray | None = None
    last_save_written_bytes: np.ndarray | None = None
    last_save_norm_bytes: np.ndarray | None = None

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
        stops = [getattr(self, name) for name in _EARLY_STOP_FIELDS]
        if any(x is None for x in stops) and any(x is not None for x in stops):
            raise ValueError(f"Chain's early-stop arrays ({', '.join(_EARLY_STOP_FIELDS)}) are given all together or not at all")
        if self.live_until is not None:
            bounds = np.arange(n + 1)
            if (self.live_until < bounds).any() or (self.live_until[:-1] > n - 1).any():
                raise ValueError("Chain.live_until[m] must lie in m..n-1 (the loss reads only a(n-1))")

    @property
    def carries(self) -> bool:
        """Whether some activation is read past the next stage (multi-tensor boundaries)."""
        return self.live_until is not None and bool((self.live_until > np.arange(self.n + 1)).any())

    def holding(self, held: Sequence[int]) -> Chain:
        """This chain with the caller holding ``a(m)`` for each ``m`` in ``held`` (see ``caller_held``)."""
        n = self.n
        if not held:
            return self
        if any(not 0 < m < n - 1 for m in held):
            raise ValueError(f"caller-held boundaries must lie in 1..{n - 2}, got {sorted(held)}")
        caller_held = np.zeros(n + 1, dtype=bool)
        caller_held[list(held)] = True
        bounds = np.arange(n + 1)
        live_until = bounds.copy() if self.live_until is None else self.live_until.copy()
        live_until[caller_held] = n - 1
        carried = {} if self.carries else dict(
            later_saver=np.zeros(n + 1, dtype=np.int64), carried_grad_bytes=np.zeros(n + 1, dtype=np.int64)
        )
        # A segment may start at a held boundary that it does not read (a decoder's embedding
        # after the encoder's output): the caller holds it, whatever the checkpoint holds.
        first_reader = bounds + 1 if self.first_reader is None else self.first_reader.copy()
        first_reader[caller_held] = bounds[caller_held] + 1
        return dataclasses.replace(
            self, caller_held=caller_held, live_until=live_until, first_reader=first_reader, **carried
        )

    @property
    def held_bytes(self) -> np.ndarray:
        """Per boundary: the bytes of ``a(m)`` where the caller holds it (``caller_held``), else 0."""
        if self.caller_held is None:
            return np.zeros(self.n + 1, dtype=np.int64)
        return np.where(self.caller_held, self.act_bytes, 0).astype(np.int64)

    @property
    def early_stop(self) -> bool:
        """Whether a recompute stops at its last saved tensor (see ``saves_any``)."""
        return self.saves_any is not None

    def last_savers(self) -> np.ndarray:
        """Per boundary ``r`` (0..n): the stage where a recompute of a segment ending at ``r``
        stops, the last stage up to ``r`` that saves anything (0: none); ``r`` itself without
        early stop, when every recompute runs its whole segment."""
        stages = np.arange(self.n + 1)
        if not self.early_stop:
            return stages
        return np.maximum.accumulate(np.where(np.concatenate([[False], self.saves_any]), stages, 0))

    def without_early_stop(self) -> Chain:
        """The chain with recomputes of whole segments."""
        return dataclasses.replace(self, **dict.fromkeys(_EARLY_STOP_FIELDS))

    def run_as(self, *, nested: bool = False, offload: bool = False) -> Chain:
        """The chain as the engine runs a plan with nested checkpoints or offload or neither:
        those recompute whole segments (NOTE [early stop] in :mod:`remat.execute.engine`)."""
        return self.without_early_stop() if (nested or offload) and self.early_stop else self

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
            elif key in (
                "saves_input", "saves_output", "selective_saves_input", "selective_saves_output", "saves_any",
                "caller_held",
            ):
                converted[key] = np.asarray(value, dtype=bool)
            else:
                converted[key] = np.asarray(value, dtype=np.int64)
        return cls(**converted)


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
    :func:`remat.execute.engine.run_selective`): they keep only their inputs and
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
