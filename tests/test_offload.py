"""Offload of the kept activations: planning, the plan record, and the executor's hooks on CPU.

The CUDA path (pinned host memory, a side stream) needs a GPU:
``benchmarks/gpu_check.py`` runs it. Here the executor's offload hooks run
with :class:`SimulatedOffload`, whose host copies the memory tracker does not
see, as the CUDA allocator does not see pinned host memory.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from chain_helpers import SimulatedOffload
from grad_helpers import assert_grads_equal, step_grads

import remat
from remat import measure_step
from remat.tools import models
from remat.planner.choose import solve
from remat.planner.profiled import ProfiledModel
from remat.execute.engine import segment_starts
from remat.execute.module import RematModule
from remat.execute.offload import CheckpointOffload
from remat.plan import Plan


def mlp():
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), nn.Tanh())])
    return net, torch.randn(256, 64)


def test_offload_on_cpu_warns_and_plans_on_the_device():
    net, x = mlp()
    with pytest.warns(UserWarning, match=r"offload=True does nothing here: the model is on cpu"):
        plan = remat.plan(net, x, offload=True)
    assert not plan.offload
    assert plan.checkpoints == remat.plan(net, x).checkpoints
    with pytest.warns(UserWarning, match="offloaded only from a CUDA device"):
        fast = remat.optimize(net, x, offload=True)
    assert fast.offload is None


def test_offload_is_recorded_in_the_plan_json_and_summary():
    net, x = mlp()
    plan = dataclasses.replace(remat.plan(net, x), offload=True)
    assert Plan.from_json(plan.to_json()) == plan
    assert "offloaded to pinned host memory" in plan.summary()
    assert "on the device" in remat.plan(net, x).summary()
    # A plan saved before the field existed loads as not offloaded.
    data = json.loads(plan.to_json())
    del data["offload"]
    assert Plan.from_json(json.dumps(data)).offload is False


def test_checkpoint_offload_leaves_cpu_tensors_alone():
    net, x = mlp()
    offload = CheckpointOffload()
    fast = remat.execute.CheckpointedSequential(list(net), [2, 4, 6], offload=offload)
    assert_grads_equal(step_grads(net, (x,)), step_grads(fast, (x,)))
    assert not offload._streams  # no CUDA stream was made


def test_offloaded_plan_on_a_traced_model_exact_gradients_and_peak():
    """The least-peak offload plan of a pre-activation ResNet (residual blocks, traced),
    run through the offload hooks."""
    source = models.load("remat:preact_resnet?depth=20", 16)
    model, inputs = source.model, source.example_inputs
    profiled = ProfiledModel.of(model, inputs, None, carried=False)  # as remat.plan(offload=True) does
    offloaded = solve(profiled, None, offload=True)
    # (Offload plans recompute whole segments: with early stop, plans on the device reach as low here.)
    assert offloaded.offload and offloaded.predicted_peak_bytes < offloaded.baseline_peak_bytes
    hooks = SimulatedOffload()
    boundaries = segment_starts(offloaded.stage_pieces, offloaded.checkpoints)
    fast = RematModule(model, profiled.captured, boundaries, offloaded, hooks)
    assert_grads_equal(step_grads(model, inputs), step_grads(fast, inputs))
    # Every segment input but the model's own went to the host, and came back.
    assert len(hooks.moved) == len(boundaries) - 1 > 0
    assert 0 < hooks.loaded <= len(hooks.moved)
    measured = measure_step(fast, inputs).peak_bytes
    predicted = offloaded.predicted_peak_bytes
    assert abs(predicted - measured) <= 0.02 * measured, (predicted, measured)
