"""The :class:`Plan`: which activations to keep, and what that costs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from remat.report import format_bytes, format_table

__all__ = ["Plan"]

_FORMAT = "remat.plan/3"


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checkpoint plan for one model at one input size.

    Attributes:
        stage_names: the chain stages the model was cut into (module paths),
            the loss last.
        stage_pieces: the captured pieces (0-based) each model stage runs, in
            order: with ``cuts``, what a saved plan needs to run the model
            without profiling it again.
        cuts: how the model was cut into pieces: ``"carried"`` (also inside
            blocks, where several tensors live across a cut, and at values the
            model returns that later stages read), ``"carried-unheld"`` (not at
            those: where the loss reads several outputs) or ``"single"`` (only
            where one tensor is live: plans with nested checkpoints, stored or
            selective segments, or offload).
        checkpoints: indices (1..len(stage_names)-1) of the stage outputs kept
            in the forward pass; everything before the last one is recomputed
            in backward.
        predicted_peak_bytes: the training step's peak with the plan (params,
            inputs, gradients and activations).
        baseline_peak_bytes: the same, measured for the unmodified model.
        forward_flops / recompute_flops: the model's forward cost, and what the
            plan adds in backward.
        parameter_bytes / input_bytes: what is live through the whole step.
        solve_seconds / capture_seconds: planning time.
        fingerprint: parameter and input shapes the plan was made for; a
            saved plan is only reused for the same.
        input_shapes: the tensor inputs' shapes and dtypes it was made for
            (to say which differ when a plan is applied to other inputs).
        budget_bytes: the peak budget it was made for (``None``: least peak).
        offload: the kept activations wait in pinned host memory between
            their forward and their recompute (CUDA only); the predicted peak
            counts them off the device.
        costs: ``"flops"``, or ``"profile"`` when the stages were timed on the
            device; then ``recompute_seconds`` is the measured forward time
            of what the plan recomputes.
        inner: checkpoints nested in the recompute of segments,
            ``(l, r, (c1, ..))`` as in ``ChainSolution.inner``: those segments
            are recomputed once more in parts (the stages are then cut only
            where a single tensor is live).
        grad_accumulation: planned (and the baseline measured) for steps
            whose parameter gradients exist from the start.
        stored: starts (0 or a checkpoint) of segments that run normally,
            keeping what their backward needs, rather than being recomputed
            (as ``ChainSolution.stored``; the stages are then cut only where
            a single tensor is live).
        selective: the stages (indices into ``stage_names``, 1-based) that
            run selectively, all in stored segments or the last: each keeps
            its input and what its matmuls, convolutions and attention made,
            and remakes the rest (normalisations, activations, dropout) when
            its backward starts, at no FLOPs (``remat.execute.engine.run_selective``).
        remake: the step runs under :func:`remat.execute.remake.remake_cheap`:
            autograd keeps, instead of each value it needs that an operator
            without FLOPs made (normalisations, activations, adds), how to
            make it again, and the backward remakes it when it is needed.
            Such a plan's ``predicted_peak_bytes`` is a simulated step (fake
            tensors, or the device with ``profile="device"``), not the chain
            cost model's figure, and so is its ``recompute_flops``.
        predicted_seconds / eager_seconds: the step time predicted for the
            plan and for the model as it is, by the step-time model
            (:mod:`remat.chain.time`) at the rates ``time_source`` names
            (measured on the device, or assumed); with ``costs="profile"`` the
            recompute is priced at the stages' measured times. ``None`` where
            no rates are known (a model on the meta device).
        compiled: the backend the plan runs compiled with (``"aot_eager"`` or
            ``"inductor"``, :mod:`remat.execute.compiled`); ``""`` for the eager
            engine. A compiled plan's ``predicted_peak_bytes``, recompute and
            time are one simulated step of its compiled graphs under
            ``aot_eager`` (Inductor's kernels run the same partition).
        optimizer / optimizer_state_bytes: the optimizer the step ends with
            (``""``: none) and the bytes of its state, held all step; the
            predicted and baseline peaks count them, and its ``step()``.
        remade_costly: with ``remake``, the calls of operators that count
            FLOPs (matmuls, attention) whose outputs are remade too, by their
            place among such calls in the forward
            (:func:`remat.execute.remake.costly_calls`).

    Example:
        >>> import torch, remat
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
        >>> plan = remat.plan(net, torch.randn(32, 64))
        >>> plan.predicted_peak_bytes <= plan.baseline_peak_bytes
        True
    """

    stage_names: tuple[str, ...]
    checkpoints: tuple[int, ...]
    predicted_peak_bytes: int
    baseline_peak_bytes: int
    forward_flops: int
    recompute_flops: int
    parameter_bytes: int
    input_bytes: int
    solve_seconds: float
    capture_seconds: float
    fingerprint: str
    method: str = "linear"
    budget_bytes: int | None = None
    offload: bool = False
    costs: str = "flops"
    recompute_seconds: float | None = None
    inner: tuple[tuple[int, int, tuple[int, ...]], ...] = ()
    grad_accumulation: bool = False
    stored: tuple[int, ...] = ()
    selective: tuple[int, ...] = ()
    remake: bool = False
    remade_costly: tuple[int, ...] = ()
    stage_pieces: tuple[tuple[int, ...], ...] = ()
    cuts: str = "carried"
    predicted_seconds: float | None = None
    eager_seconds: float | None = None
    time_source: str = ""
    compiled: str = ""
    optimizer: str = ""
    optimizer_state_bytes: int = 0
    input_shapes: tuple[str, ...] = ()

    @property
    def stores_everything(self) -> bool:
        """The model runs as it is: nothing recomputed, no stage run selectively, nothing remade."""
        return not (self.checkpoints or self.selective or self.remake)

    @property
    def checkpoint_names(self) -> tuple[str, ...]:
        """Readable names of the kept activations: the stage that produces each."""
        return tuple(self.stage_names[i - 1] for i in self.checkpoints)

    @property
    def kept(self) -> str:
        """The kept activations, as the summary and the module's repr show them."""
        return ", ".join(self.checkpoint_names) or "(none: store everything)"

    @property
    def recompute_overhead(self) -> float:
        """Recomputed FLOPs as a fraction of one forward pass."""
        return self.recompute_flops / self.forward_flops if self.forward_flops else 0.0

    @property
    def predicted_slowdown(self) -> float | None:
        """Predicted step time over the model's own (``None`` where not predicted)."""
        if self.predicted_seconds is None or not self.eager_seconds:
            return None
        return self.predicted_seconds / self.eager_seconds

    def summary(self) -> str:
        """A table of what the plan keeps and what it saves and costs."""
        cut = 1 - self.predicted_peak_bytes / self.baseline_peak_bytes if self.baseline_peak_bytes else 0.0
        rows = [
            ["stages", str(len(self.stage_names))],
            ["checkpoints", str(len(self.checkpoints))],
            ["baseline peak (measured)", format_bytes(self.baseline_peak_bytes)],
            ["predicted peak", format_bytes(self.predicted_peak_bytes)],
            ["peak cut", f"{cut:.1%}"],
            ["budget", format_bytes(self.budget_bytes) if self.budget_bytes else "none (least peak)"],
            ["kept activations", "offloaded to pinned host memory" if self.offload else "on the device"],
            ["parameter gradients", "exist all step (accumulation)" if self.grad_accumulation else "made in backward"],
            *(
                [["optimizer", f"{self.optimizer}, state {format_bytes(self.optimizer_state_bytes)} (and its step)"]]
                if self.optimizer
                else []
            ),
            *(
                [["nested checkpoints", f"{sum(len(cs) for _, _, cs in self.inner)} in {len(self.inner)} recomputes"]]
                if self.inner
                else []
            ),
            *([["stored segments", f"{len(self.stored)} run without recompute"]] if self.stored else []),
            *(
                [["selective stages", f"{len(self.selective)} keep only what has FLOPs to remake"]]
                if self.selective
                else []
            ),
            *([["cheap values", "remade in backward (simulated peak)"]] if self.remake else []),
            *([["compiled", f"{self.compiled} (simulated peak)"]] if self.compiled else []),
            *(
                [["remade costly operators", f"{len(self.remade_costly)} (matmuls or attention)"]]
                if self.remade_costly
                else []
            ),
            ["recompute", f"{self.recompute_flops / 1e9:.2f} GFLOP ({self.recompute_overhead:.1%} of forward)"],
            *(
                [["recompute time (measured)", f"{self.recompute_seconds * 1e3:.1f} ms per step"]]
                if self.recompute_seconds is not None
                else []
            ),
            *(
                [[
                    "step time (predicted)",
                    f"{self.predicted_seconds * 1e3:.1f} ms, {self.predicted_slowdown:.2f}x the model's "
                    f"({self.time_source})",
                ]]
                if self.predicted_slowdown is not None
                else []
            ),
            ["capture + solve", f"{self.capture_seconds:.2f} s + {self.solve_seconds:.3f} s"],
        ]
        table = format_table(rows, ["", "value"])
        return f"{table}\nkept: {self.kept}"

    def to_json(self) -> str:
        return json.dumps({"format": _FORMAT, **dataclasses.asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        found = data.pop("format", None)
        if found != _FORMAT:
            made = "made by an older remat: plan again" if str(found).startswith("remat.plan/") else "not a remat plan"
            raise ValueError(f"{made} (format {found!r}, expected {_FORMAT!r})")
        data["stage_names"] = tuple(data["stage_names"])
        data["checkpoints"] = tuple(data["checkpoints"])
        data["inner"] = tuple((l, r, tuple(cs)) for l, r, cs in data.get("inner", ()))
        data["stored"] = tuple(data.get("stored", ()))
        data["selective"] = tuple(data.get("selective", ()))
        data["remade_costly"] = tuple(data.get("remade_costly", ()))
        data["stage_pieces"] = tuple(tuple(stage) for stage in data.get("stage_pieces", ()))
        data["input_shapes"] = tuple(data.get("input_shapes", ()))
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON, to reuse with ``remat.optimize(..., plan=Plan.load(path))``."""
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(Path(path).read_text())
