"""Figures for reports (needs matplotlib: ``pip install 'remat[plot]'``).

matplotlib is imported when a figure is drawn, not with this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from remat.measure import StepMeasurement

__all__ = ["memory_timeline"]

_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]


def memory_timeline(curves: Sequence[tuple[str, StepMeasurement]], path: str | Path, title: str = "") -> Path:
    """Plot live memory over one training step for each ``(label, measurement)`` and save a PNG.

    The y axis is everything live (parameters and inputs included), in MiB or
    GiB, so each curve's top is its step peak; the x axis is the operator
    index. The ops that are forward for every curve are shaded, and a dotted
    line marks where each curve's backward pass starts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(m.peak_bytes for _, m in curves)
    scale, unit = (2**30, "GiB") if top >= 2**30 else (2**20, "MiB")
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
