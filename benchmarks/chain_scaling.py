"""Solve time of the least-peak chain solvers vs chain length, and peak vs baselines.

Run: ``python benchmarks/chain_scaling.py`` (or ``make bench``). Prints a
markdown table and writes it to ``benchmarks/results/chain_scaling.md`` with
the command, torch version, machine and date at the top.

Acceptance targets: ``linear`` solves 100,000 stages in < 1 s; ``dp`` solves
1,000 stages in < 10 s. Chains are ``random_chain(n, seed=0)`` (heterogeneous).
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import sys
import time

import torch

from remat.solvers.baselines import sqrt_segments, store_all, uniform_segments
from remat.solvers.checkpoints import min_peak
from remat.chain.random import random_chain
from machine import cpu_name

LINEAR_SIZES = [100, 300, 1_000, 3_000, 10_000, 30_000, 100_000]
DP_SIZES = [100, 300, 1_000, 3_000]
TARGETS = {("linear", 100_000): 1.0, ("dp", 1_000): 10.0}
RESULTS = pathlib.Path(__file__).parent / "results" / "chain_scaling.md"


def timed(fn, repeat: int) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def load_average() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"


def main() -> str:
    load = load_average()  # solve times are wall times: a busy machine inflates them
    rows, verdicts = [], []
    sizes = sorted(set(LINEAR_SIZES) | set(DP_SIZES))
    for n in sizes:
        chain = random_chain(n, seed=0)
        base = {
            "store_all": store_all(chain).peak_bytes,
            "sqrt": sqrt_segments(chain).peak_bytes,
            "uniform_8": uniform_segments(chain, 8).peak_bytes,
        }
        times, peak = {}, None
        for method, method_sizes in (("linear", LINEAR_SIZES), ("dp", DP_SIZES)):
            if n not in method_sizes:
                times[method] = "-"
                continue
            seconds, sol = timed(lambda: min_peak(chain, method), repeat=3)
            times[method] = f"{seconds:.3f}"
            if peak is not None:
                assert sol.peak_bytes == peak, "dp and linear disagree"
            peak = sol.peak_bytes
            target = TARGETS.get((method, n))
            if target is not None:
                met = seconds < target
                verdicts.append(f"- `{method}` at n = {n:,}: {seconds:.3f} s (target < {target:g} s): "
                                f"**{'met' if met else 'NOT met'}**")
        rows.append(
            f"| {n:,} | {times['linear']} | {times['dp']} | {mib(peak)} | {mib(base['store_all'])} "
            f"| {mib(base['sqrt'])} | {mib(base['uniform_8'])} | {base['store_all'] / peak:.2f}x "
            f"| {base['sqrt'] / peak:.2f}x |"
        )
    header = [
        "# Chain solver scaling",
        "",
        "- command: `python benchmarks/chain_scaling.py`",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores; load average before the run: {load}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "- chains: `random_chain(n, seed=0)`; times: wall seconds, best of 3",
        "",
        "| n | linear (s) | dp (s) | least peak (MiB) | store-all (MiB) | sqrt(n) (MiB) "
        "| uniform 8 (MiB) | store-all / least | sqrt / least |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    text = "\n".join([*header, *rows, "", "Acceptance targets:", "", *sorted(verdicts), ""])
    return text


if __name__ == "__main__":
    report = main()
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(f"written to {RESULTS}", file=sys.stderr)
