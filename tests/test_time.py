"""The step-time model: work counted per plan, device rates measured, the fastest plan chosen."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import remat
from chain_helpers import nested_plans, plans_with_stored
from remat.chain.cost import recompute_flops_of
from remat.chain.random import random_chain
from remat.chain.time import Speed, Work, plan_work, recompute_counts
from remat.planner import choose
from remat.planner.choose import PEAK_TOLERANCE
from remat.profile.speed import ASSUMED_CUDA, measure_speed



@pytest.mark.parametrize("seed", range(6))
def test_recompute_counts_price_every_plan_as_the_cost_model_does(seed):
    chain = random_chain(5, seed=seed)
    plans = [(cps, stored, ()) for cps, stored in plans_with_stored(chain.n)]
    plans += [(cps, (), inner) for cps, inner in nested_plans(chain.n)]
    for cps, stored, inner in plans:
        counts = recompute_counts(chain.n, cps, stored, inner)
        assert int(counts @ chain.fwd_flops) == recompute_flops_of(chain, cps, stored, inner), (cps, stored, inner)


def _with_ops(chain):
    n = chain.n
    return dataclasses.replace(
        chain,
        fwd_ops=np.arange(1, n + 1) * 10,
        fwd_written_bytes=np.arange(1, n + 1) * 1000,
        fwd_cheap_ops=np.arange(1, n + 1) * 7,
        fwd_cheap_written_bytes=np.arange(1, n + 1) * 600,
    )


def test_plan_work_counts_recomputes_regions_and_selective_stages():
    chain = _with_ops(random_chain(6, seed=1))
    # Segments (0, 2] recomputed, (2, 4] stored with stage 3 selective, (4, 6] the last.
    work = plan_work(chain, (2, 4), stored=(2,), selective_stages=(3,))
    assert work.flops == int(chain.fwd_flops[:2].sum())
    assert work.ops == 10 + 20 + 7 * 3  # stages 1, 2 recomputed; stage 3's cheap operators run again
    assert work.written_bytes == 1000 + 2000 + 600 * 3
    # One region for the recomputed segment, one checkpoint call for the selective stage.
    assert work.regions == 1 and work.checkpoint_calls == 1
    assert work.intercepted_ops == 2 * 30 and work.recorded_ops == 0
    assert plan_work(chain, ()) == Work()
    # Nested: (0, 4] recomputed, and (0, 2] once more inside it: two more, all checkpoint calls.
    nested = plan_work(chain, (4,), inner=((0, 4, (1, 2)),))
    assert nested.regions == 0 and nested.checkpoint_calls == 3
    assert nested.flops == int(chain.fwd_flops[:4].sum() + chain.fwd_flops[:2].sum())
    # Offloaded checkpoints run under torch's checkpoint too.
    offloaded = plan_work(chain, (2, 4), offload=True)
    assert offloaded.regions == 0 and offloaded.checkpoint_calls == 2


def test_speed_prices_each_kind_of_work():
    speed = Speed(1e9, 1e8, 1e-6, 1e-4, 1e-5, 2e-5)
    assert speed.seconds(Work(flops=10**9)) == pytest.approx(1.0)
    assert speed.seconds(Work(written_bytes=10**8, ops=10**6)) == pytest.approx(2.0)
    assert speed.seconds(Work(regions=10, intercepted_ops=100, recorded_ops=50)) == pytest.approx(1e-3 + 1e-3 + 1e-3)
    # A checkpoint call costs a region's unless measured apart.
    assert speed.seconds(Work(checkpoint_calls=10)) == pytest.approx(1e-3)
    apart = dataclasses.replace(speed, seconds_per_checkpoint_call=3e-4)
    assert apart.seconds(Work(regions=1, checkpoint_calls=10)) == pytest.approx(1e-4 + 3e-3)
    assert Work(1, 2, 3) + Work(1, 1, 1) - Work(2, 3, 4) == Work()


def test_cpu_rates_are_measured_once_and_leave_the_generator_alone():
    rng = torch.get_rng_state()
    speed = measure_speed("cpu")
    assert torch.equal(rng, torch.get_rng_state())
    assert measure_speed("cpu") is speed
    assert speed.source.startswith("measured (cpu")
    # Ordered as on any device: an operator costs more than a FLOP or a byte, a region more than an operator.
    assert 1 / speed.flops_per_second < speed.seconds_per_op < speed.seconds_per_region
    assert 1 / speed.bytes_per_second < speed.seconds_per_op
    assert speed.seconds_per_intercepted_op > 0 and speed.seconds_per_recorded_op > 0
    assert speed.seconds_per_checkpoint_call > speed.seconds_per_op


def test_devices_without_rates():
    with pytest.raises(ValueError, match="costs='flops'"):
        measure_speed("meta")
    if not torch.cuda.is_available():
        assert measure_speed("cuda") is ASSUMED_CUDA and "assumed" in ASSUMED_CUDA.source


def _net_and_input():
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [torch.nn.Linear(256, 256), torch.nn.LayerNorm(256), torch.nn.GELU()]
    return torch.nn.Sequential(*layers), torch.randn(64, 256)


def test_every_plan_carries_a_predicted_time():
    net, x = _net_and_input()
    least = remat.plan(net, x)
    assert least.predicted_seconds > 0 and least.eager_seconds > 0 and least.time_source.startswith("measured")
    assert least.predicted_slowdown >= 1.0 or least.stores_everything
    assert "step time (predicted)" in least.summary()
    again = remat.Plan.from_json(least.to_json())
    assert (again.predicted_seconds, again.eager_seconds, again.time_source) == (
        least.predicted_seconds, least.eager_seconds, least.time_source
    )
    for plan in remat.pareto(net, x):
        assert plan.predicted_seconds is not None
        assert plan.predicted_seconds >= plan.eager_seconds - 1e-12  # a plan only adds work


def test_a_budget_plan_is_the_fastest_fitting_plan_of_the_front():
    net, x = _net_and_input()
    front = remat.pareto(net, x, remake=False)
    budget = front[len(front) // 2].predicted_peak_bytes
    chosen = remat.plan(net, x, budget=budget)
    assert chosen.predicted_peak_bytes <= budget
    fitting = [p for p in front if p.predicted_peak_bytes <= budget]
    assert chosen.predicted_seconds <= min(p.predicted_seconds for p in fitting) + 1e-12


def test_the_least_peak_gives_way_to_a_faster_plan_within_the_tolerance(monkeypatch):
    # Weights and their gradients (there all step) dominate: keeping fewer activations lowers
    # the peak by a few KiB of 36 MiB, for recompute regions that cost time.
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [torch.nn.Linear(1024, 1024), torch.nn.GELU()]
    net, x = torch.nn.Sequential(*layers), torch.randn(2, 1024)
    tolerant = remat.plan(net, x, grad_accumulation=True)
    monkeypatch.setattr(choose, "PEAK_TOLERANCE", 0.0)
    strict = remat.plan(net, x, grad_accumulation=True)
    assert strict.predicted_peak_bytes < tolerant.predicted_peak_bytes
    assert tolerant.predicted_peak_bytes <= strict.predicted_peak_bytes * (1 + PEAK_TOLERANCE)
    assert tolerant.stores_everything and tolerant.predicted_seconds < strict.predicted_seconds
