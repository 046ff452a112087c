"""Figures for reports (needs matplotlib: ``pip install 'remat[plot]'``).

matplotlib is imported when a figure is drawn, not with this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from remat.measure.step import StepMeasurement
from remat.plan import Plan

__all__ = ["memory_timeline", "pareto_front"]

_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]


def _pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _unit(top_bytes: int) -> tuple[int, str]:
    """Bytes per unit, and its name: GiB from 1 GiB up, else MiB."""
    return (2**30, "GiB") if top_bytes >= 2**30 else (2**20, "MiB")


def memory_timeline(curves: Sequence[tuple[str, StepMeasurement]], path: str | Path, title: str = "") -> Path:
    """Plot live memory over one training step for each ``(label, measurement)`` and save a PNG.

    The y axis is everything live (parameters and inputs included), in MiB or
    GiB, so each curve's top is its step peak; the x axis is the operator
    index. The ops that are forward for every curve are shaded, and a dotted
    line marks where each curve's backward pass starts.
    """
    plt = _pyplot()
    scale, unit = _unit(max(m.peak_bytes for _, m in curves))
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    forward_end = min(m.forward_ops for _, m in curves)  # shaded: forward for every curve
    ax.axvspan(0, forward_end, color="0.92", zorder=0)
    for (label, m), color in zip(curves, _COLORS):
        base = m.parameter_bytes + m.input_bytes
        live = [base / scale] + [(base + b) / scale for _, b in m.timeline]
        ax.plot(range(len(live)), live, color=color, linewidth=1.6, label=f"{label} (peak {m.peak_bytes / scale:.2f} {unit})")
        ax.axvline(m.forward_ops, color=color, linestyle=":", linewidth=1.2)
    ax.text(forward_end / 2, 1.01, "forward", transform=ax.get_xaxis_transform(), ha="center", va="bottom")
    backward_start = max(m.forward_ops for _, m in curves)
    ax.text(backward_start, 1.01, "  backward \u2192", transform=ax.get_xaxis_transform(), ha="left", va="bottom")
    ax.set_xlabel("operator index in the training step (dotted: start of each backward pass)")
    ax.set_ylabel(f"live memory ({unit})")
    ax.set_xlim(0, max(len(m.timeline) for _, m in curves))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title, pad=20)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def pareto_front(plans: Sequence[Plan], path: str | Path, title: str = "") -> Path:
    """Plot a Pareto front (:func:`remat.pareto`) and save a PNG.

    One point per plan: x is its recompute as a percentage of one forward
    pass, y its predicted step peak (parameters, inputs, activations and
    gradients) in MiB or GiB. The no-recompute end ("store everything", or
    the least peak with no recompute FLOPs where stages run selectively) and
    the least-peak end are labelled.
    """
    if not plans:
        raise ValueError("a Pareto front needs at least one plan")
    plt = _pyplot()
    scale, unit = _unit(max(p.predicted_peak_bytes for p in plans))
    x = [100 * p.recompute_overhead for p in plans]
    y = [p.predicted_peak_bytes / scale for p in plans]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.plot(x, y, color=_COLORS[1], linewidth=1.4, marker="o", markersize=5,
            label=f"least recompute for each peak ({len(plans)} plans)")
    first = "store everything" if plans[0].stores_everything else "no recompute"
    ends = [(0, first, _COLORS[0], (8, 6), "left"),
            (len(plans) - 1, "least peak", _COLORS[2], (6, -20), "right")]
    for index, name, color, offset, align in ends[: 1 if len(plans) == 1 else 2]:
        ax.plot(x[index], y[index], "o", color=color, markersize=9, zorder=3,
                label=f"{name}: {y[index]:.2f} {unit}, {x[index]:.0f}% recompute")
        ax.annotate(name, (x[index], y[index]), textcoords="offset points", xytext=offset, ha=align,
                    color=color, fontweight="bold")
    ax.set_xlabel("recompute (% of one forward pass)")
    ax.set_ylabel(f"predicted step peak ({unit})")
    ax.set_xlim(left=min(-2.0, -0.03 * max(x)), right=max(x) * 1.08 + 1)
    ax.set_ylim(bottom=0, top=max(y) * 1.12)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
