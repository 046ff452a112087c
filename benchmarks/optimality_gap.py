"""How far remat's chain solvers are from the exact optimum, on small random op graphs.

For random chains and random DAGs (residual and two-branch blocks) of at most
40 ops, at several budgets along remat's Pareto front, compares the recompute
FLOPs of

* ``remat``: :func:`remat.solvers.checkpoints.min_recompute` (recompute every
  segment before the last kept activation),
* ``remat+store``: the same with ``store=True`` (middle segments may keep
  their saved tensors instead),
* ``remat+nested``: :func:`remat.solvers.nested.min_recompute_nested`
  (recomputes may keep checkpoints of their own and recompute parts again;
  a grid of 4,000 steps up to the budget),
* ``remat values``: :func:`lab.values.least_recompute_front`
  (single values dropped and remade, nested; DAGs planned op by op and stage
  by stage; not yet run by remat's executor),
* ``remat values+polish``: :func:`lab.values.min_recompute_values`
  (the best of those schedules improved by the local search of
  :mod:`lab.polish`),

with the optimum of the integer program of :mod:`lab.ilp` (any
schedule of the op-level model: values dropped and recomputed one by one, any
number of times) at the same budget. Every plan is run through
:func:`lab.opgraph.simulate` to check that it fits the budget.

Run: ``make bench-gap`` (or ``.venv/bin/python benchmarks/optimality_gap.py``).
Writes ``benchmarks/results/optimality_gap.md``. Needs ``highspy`` (extra
``ilp``). About an hour with ``--jobs 2`` on 2 cores (the integer programs of
the larger graphs run to their time limit).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from pathlib import Path

from machine import results_header
from remat.solvers.checkpoints import min_recompute, pareto_front
from lab.ilp import min_recompute_ilp
from remat.solvers.nested import min_recompute_nested
from lab.opgraph import OpGraph, chain_schedule, simulate, to_chain
from lab.values import least_recompute_front, min_recompute_values

RESULTS = Path(__file__).resolve().parent / "results" / "optimality_gap.md"


def budgets(front) -> list[tuple[str, int]]:
    """Three points of the store-enabled front: the first with recompute, the middle, the least peak."""
    if len(front) == 1:
        return [("least peak = store all", front[0].peak_bytes)]
    picks = {"first": 1, "middle": len(front) // 2, "least peak": len(front) - 1}
    seen, out = set(), []
    for name, index in picks.items():
        if index not in seen:
            seen.add(index)
            out.append((name, front[index].peak_bytes))
    return out


def graph_of(kind: str, seed: int) -> OpGraph:
    n = 10 + seed  # 10..39 ops
    return OpGraph.random_chain(n, seed) if kind == "chain" else OpGraph.random_dag(n, seed)


def run_case(kind: str, seed: int, time_limit_s: float) -> list[dict]:
    graph = graph_of(kind, seed)
    chain = to_chain(graph)
    forward = sum(graph.flops)
    start = time.perf_counter()
    values_front = least_recompute_front(graph)
    values_seconds = time.perf_counter() - start
    rows = []
    for where, budget in budgets(pareto_front(chain, store=True)):
        plain = min_recompute(chain, budget)
        store = min_recompute(chain, budget, store=True)
        nested = min_recompute_nested(chain, budget, slots=4000)
        exact = min_recompute_ilp(graph, budget, time_limit_s=time_limit_s)
        for plan in (plain, store, nested):
            if plan is not None:
                cost = simulate(graph, chain_schedule(graph, plan.checkpoints, plan.stored, plan.inner))
                assert cost.peak_bytes <= budget and cost.recompute_flops == plan.recompute_flops
        values = min((p.recompute_flops for p in values_front if p.peak_bytes <= budget), default=None)
        start = time.perf_counter()
        polished = min_recompute_values(graph, budget, values_front)
        polish_seconds = time.perf_counter() - start
        if polished is not None:
            cost = simulate(graph, polished.schedule)
            assert cost.peak_bytes <= budget and cost.recompute_flops == polished.recompute_flops
            polished = polished.recompute_flops
        assert exact.peak_bytes is None or exact.peak_bytes <= budget
        found = [x.recompute_flops for x in (plain, store, nested) if x is not None]
        rows.append(dict(
            kind=kind, ops=graph.n, stages=chain.n, where=where, budget=budget, forward=forward,
            plain=None if plain is None else plain.recompute_flops,
            store=store.recompute_flops, nested=None if nested is None else nested.recompute_flops,
            values=values, values_seconds=values_seconds, polished=polished, polish_seconds=polish_seconds,
            best=min(found + [x for x in (values, polished) if x is not None]),
            ilp=exact.recompute_flops, bound=exact.bound_flops,
            status=exact.status, seconds=exact.seconds,
        ))
    return rows


def _run_case(args: tuple[str, int, float]) -> list[dict]:
    return run_case(*args)


def gap(remat: int | None, row: dict) -> float | None:
    """Extra recompute over the ILP's, as % of one forward pass."""
    if remat is None or row["ilp"] is None:
        return None
    return 100 * (remat - row["ilp"]) / row["forward"]


LABELS = {"plain": "remat", "store": "remat+store", "nested": "remat+nested", "values": "remat values",
          "polished": "remat values+polish"}


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summary(rows: list[dict], kind: str) -> list[str]:
    """Gaps over the budgets the ILP solved to optimality (a time-limited incumbent proves nothing)."""
    every = [r for r in rows if r["kind"] == kind]
    rows = [r for r in every if r["status"] == "optimal"]
    lines = [f"### {kind}s: {len({(r['ops'], r['forward']) for r in every})} graphs, {len(every)} budgets, "
             f"{len(rows)} solved to optimality (gaps below are over those)", ""]
    lines.append("| solver | max gap (% fwd) | mean gap (% fwd) | budgets equal to the ILP | budgets within 3% fwd "
                 "| max gap where ILP > 0 (x ILP) |")
    lines.append("|---|---|---|---|---|---|")
    names = ["plain", "store", "nested", "values", "polished", "best"]
    for name in names:
        gaps = [gap(r[name], r) for r in rows if gap(r[name], r) is not None]
        equal = sum(1 for r in rows if r[name] is not None and r[name] == r["ilp"])
        ratios = [r[name] / r["ilp"] - 1 for r in rows if r[name] is not None and r["ilp"]]
        within = sum(1 for g in gaps if g <= 3)
        lines.append(f"| {LABELS.get(name, f'best of the {len(names) - 1}')} | {fmt(max(gaps, default=None))} "
                     f"| {fmt(statistics.mean(gaps) if gaps else None)} "
                     f"| {equal} of {len(rows)} | {within} of {len(rows)} | {fmt(100 * max(ratios, default=0), 0)}% |")
    solve_times = {r["ops"]: r["values_seconds"] for r in every}
    lines += ["", f"remat values: whole front per graph in max {max(solve_times.values()):.1f} s, "
              f"mean {statistics.mean(solve_times.values()):.1f} s"]
    polish_times = [r["polish_seconds"] for r in every]
    lines += ["", f"remat values+polish: per budget in max {max(polish_times):.1f} s, "
              f"mean {statistics.mean(polish_times):.1f} s"]
    limited = [r for r in every if r["status"] == "time_limit" and None not in (r["polished"], r["ilp"])]
    if limited:
        below = sum(1 for r in limited if r["polished"] < r["ilp"])
        lines += ["", f"Where the ILP stopped at its time limit ({len(limited)} budgets), remat values+polish "
                  f"recomputes less than its incumbent at {below}."]
    seconds = [r["seconds"] for r in every]
    statuses = {s: sum(1 for r in every if r["status"] == s) for s in ("optimal", "time_limit", "infeasible")}
    lines += ["", f"ILP solve time: max {max(seconds):.1f} s, mean {statistics.mean(seconds):.1f} s; "
              f"status: {statuses}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=30, help="graphs of each kind (default 30)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per ILP solve (default 60)")
    parser.add_argument("--jobs", type=int, default=1, help="cases solved at once, one per core (default 1)")
    args = parser.parse_args()
    start = time.perf_counter()
    cases = [(kind, seed, args.time_limit) for seed in range(args.cases) for kind in ("chain", "dag")]
    rows = []
    with multiprocessing.Pool(args.jobs) as pool:
        for (kind, seed, _), case_rows in zip(cases, pool.imap(_run_case, cases)):
            rows += case_rows
            print(f"{kind} seed {seed}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    command = "python benchmarks/optimality_gap.py" + (
        f" --cases {args.cases}" if args.cases != 30 else "") + (
        f" --time-limit {args.time_limit:g}" if args.time_limit != 60 else "") + (
        f" --jobs {args.jobs}" if args.jobs != 1 else "")
    lines = [
        *results_header("Optimality gap of remat's chain solvers against an exact ILP", command, "bench-gap"),
        "",
        "Random op chains (`OpGraph.random_chain(n, seed)`) and DAGs (`OpGraph.random_dag(n, seed)`),",
        "n = 10 + seed ops, seeds 0..{}; budgets: three plans of the `store=True` Pareto front".format(args.cases - 1),
        "(the first that recomputes, the middle one, the least peak). Gap: remat's recompute minus the",
        "ILP optimum, in % of one forward pass's FLOPs (the ILP's schedules may drop and recompute single",
        "values, several times: see `benchmarks/lab/ilp.py`). `-` in remat: no plan of that family fits.",
        "`remat values` (`benchmarks/lab/values.py`) plans such value-level schedules too, and",
        "`remat values+polish` improves them by local search (`benchmarks/lab/polish.py`);",
        "remat's executor does not run them yet.",
        f"Total time {time.perf_counter() - start:.0f} s.",
        "",
        "## Summary",
        "",
        *summary(rows, "chain"),
        "",
        *summary(rows, "dag"),
        "",
        "## Every case",
        "",
        "| kind | ops | stages | budget | budget (KiB) | remat | remat+store | remat+nested | remat values "
        "| remat values+polish | ILP | ILP status | ILP s | gap remat (% fwd) | gap remat+store (% fwd) "
        "| gap remat+nested (% fwd) | gap remat values (% fwd) | gap remat values+polish (% fwd) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['ops']} | {r['stages']} | {r['where']} | {r['budget'] / 1024:.0f} "
            f"| {fmt(r['plain'], 0)} "
            f"| {r['store']} | {fmt(r['nested'], 0)} | {fmt(r['values'], 0)} | {fmt(r['polished'], 0)} "
            f"| {r['ilp'] if r['ilp'] is not None else '-'} | {r['status']} | {r['seconds']:.1f} "
            f"| {fmt(gap(r['plain'], r))} | {fmt(gap(r['store'], r))} | {fmt(gap(r['nested'], r))} "
            f"| {fmt(gap(r['values'], r))} | {fmt(gap(r['polished'], r))} |"
        )
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: lines.index("## Every case")]))


if __name__ == "__main__":
    main()
